"""``nadmm-register --pairs --batch-size N``: pairs of one grid registered together give what
they get one by one, and every per-pair behaviour of a cohort (resume, failures, interrupts,
log lines) holds with batches."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import nadmm_torch
from nadmm_torch import cli
from nadmm_torch.io import Geometry, write_image
from tests.test_cli import FAST, _assert_one_line_error, _known_field, _run, _write_pair
from tests.test_cli_tune_inverse import _write_pairs


def _mixed_cohort(tmp_path: Path) -> Path:
    """Six pairs: four 2D 64 x 64 slices (two with a fixed mask) and a 3D pair both ways."""
    _write_pairs(tmp_path, n=4)  # fixed1..4, moving1..4 (+ labels), 1.5 mm
    mask = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    mask[..., 8:56, 8:56] = 1
    write_image(mask, Geometry.default((64, 64), (1.5, 1.5)), tmp_path / "mask.nii.gz")
    vol = tmp_path / "vol"
    vol.mkdir()
    _write_pair(vol)
    rows = [["fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "id"]]
    for z in range(1, 5):
        rows.append([f"fixed{z}.nii.gz", f"moving{z}.nii.gz", f"fixed_labels{z}.nii.gz",
                     f"moving_labels{z}.nii.gz", "mask.nii.gz" if z > 2 else "", f"s{z}"])
    rows.append(["vol/fixed.nii.gz", "vol/moving.nii.gz", "vol/fixed_labels.nii.gz",
                 "vol/moving_labels.nii.gz", "", "v1"])
    rows.append(["vol/moving.nii.gz", "vol/fixed.nii.gz", "vol/moving_labels.nii.gz",
                 "vol/fixed_labels.nii.gz", "", "v2"])
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _recording(calls: list):
    """Stand-in solver recording each call's batch shape and spacing."""
    def solver(fixed, moving, **kw):
        calls.append((tuple(fixed.shape), kw.get("spacing"), kw.get("mask") is not None))
        return _known_field(fixed, moving)

    return solver


def test_batched_results_equal_one_by_one(tmp_path, capsys):
    """The real solver (fast preset, a few iterations in 3D), with --inverse: batch 4 writes
    what batch 1 writes, to float tolerance."""
    csv_path = _mixed_cohort(tmp_path)
    outs = {}
    for b in (1, 4):
        outs[b] = tmp_path / f"out{b}"
        rc, _, err = _run(["--pairs", csv_path, "-o", outs[b], "--batch-size", b, "--inverse",
                           *FAST], capsys)
        assert rc == 0, err
    for pid in ("s1", "s2", "s3", "s4", "v1", "v2"):
        one, many = (json.loads((outs[b] / pid / "summary.json").read_text()) for b in (1, 4))
        assert one["metrics"]["batch_size"] == 1
        assert many["metrics"]["batch_size"] == 2  # s1 s2, s3 s4 (masked), v1 v2 (3D)
        assert one["resume_key"] == many["resume_key"]
        for name in ("displacement.nii.gz", "inverse_displacement.nii.gz", "warped.nii.gz"):
            a, b_ = _array(outs[1] / pid / name), _array(outs[4] / pid / name)
            np.testing.assert_allclose(b_, a, atol=1e-4, err_msg=f"{pid}/{name}")
        assert np.abs(_array(outs[1] / pid / "displacement.nii.gz")).max() > 0.1  # not trivial
        np.testing.assert_array_equal(_array(outs[4] / pid / "warped_labels.nii.gz"),
                                      _array(outs[1] / pid / "warped_labels.nii.gz"))
        d1, d4 = (m["metrics"]["dice_after"]["mean"] for m in (one, many))
        assert abs(d1 - d4) < 1e-6, pid


def test_batched_affine_equals_one_by_one(tmp_path, capsys):
    """With --affine (the affine stage pair by pair, the deformable one batched)."""
    csv_path = _write_pairs(tmp_path, n=3)
    for b in (1, 3):
        rc, _, err = _run(["--pairs", csv_path, "-o", tmp_path / f"out{b}", "--batch-size", b,
                           "--affine", *FAST], capsys)
        assert rc == 0, err
    ids = [r["id"] for r in csv.DictReader(open(tmp_path / "out1" / "summary.csv"))]
    for pid in ids:
        a, b = (tmp_path / f"out{n}" / pid for n in (1, 3))
        np.testing.assert_allclose(_array(b / "displacement.nii.gz"),
                                   _array(a / "displacement.nii.gz"), atol=1e-3)  # mm
        assert (b / "affine.tfm").read_text() == (a / "affine.tfm").read_text()
        assert json.loads((b / "summary.json").read_text())["metrics"]["batch_size"] == 3


def test_mixed_shapes_spacings_and_masks_are_batched_apart(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(nadmm_torch, "register", _recording(calls))
    csv_path = _mixed_cohort(tmp_path)
    with open(csv_path, "a", newline="") as fh:  # a 2D pair at another spacing
        s = sitk.ReadImage(str(tmp_path / "fixed1.nii.gz"))
        s.SetSpacing((1.25, 1.25))
        sitk.WriteImage(s, str(tmp_path / "fixed_fine.nii.gz"))
        sitk.WriteImage(s, str(tmp_path / "moving_fine.nii.gz"))
        csv.writer(fh).writerow(["fixed_fine.nii.gz", "moving_fine.nii.gz", "", "", "", "fine"])
    rc, _, err = _run(["--pairs", csv_path, "-o", tmp_path / "out", "--batch-size", "3"],
                      capsys)
    assert rc == 0, err
    vol_shape = tuple(_array(tmp_path / "vol" / "fixed.nii.gz").shape)
    assert sorted((c[0][0], c[0][2:], c[2]) for c in calls) == sorted([
        (2, (64, 64), False),  # s1, s2
        (2, (64, 64), True),  # s3, s4: masked
        (2, vol_shape, False),  # v1, v2
        (1, (64, 64), False),  # fine: another spacing
    ])
    assert sorted(c[1] for c in calls if len(c[0]) == 4) == [(1.25, 1.25), (1.5, 1.5),
                                                            (1.5, 1.5)]
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert [r["id"] for r in rows] == ["s1", "s2", "s3", "s4", "v1", "v2", "fine"]  # CSV order
    assert all(r["status"] == "done" for r in rows)
    # Per-pair log lines off a terminal, one per pair, numbered as they finish.
    lines = [ln for ln in err.splitlines() if ": done" in ln]
    assert len(lines) == 7 and lines[0].startswith("nadmm-register: [1/7] ")


def test_batch_of_one_grid_is_split_by_batch_size(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(nadmm_torch, "register", _recording(calls))
    csv_path = _write_pairs(tmp_path, n=5, labels=False)
    rc, _, err = _run(["--pairs", csv_path, "-o", tmp_path / "out", "--batch-size", "2"],
                      capsys)
    assert rc == 0, err
    assert [c[0][0] for c in calls] == [2, 2, 1]
    monkeypatch.setattr(cli, "default_batch_size", lambda device: 4)
    rc, _, err = _run(["--pairs", csv_path, "-o", tmp_path / "out2"], capsys)
    assert rc == 0, err
    assert [c[0][0] for c in calls[3:]] == [4, 1]


def test_a_failing_pair_in_a_batch_fails_alone(tmp_path, monkeypatch, capsys):
    """A batch whose solve fails is registered again pair by pair: the error lands on the pair
    that caused it, the others finish."""
    csv_path = _write_pairs(tmp_path, n=4)
    bad = tmp_path / "moving3.nii.gz"  # a recognisable moving image
    image = sitk.ReadImage(str(bad))
    sitk.WriteImage(image * 1000.0, str(bad))
    calls: list = []

    def solver(fixed, moving, **kw):
        calls.append(fixed.shape[0])
        if (moving.flatten(1).amax(1) > 100).any():
            raise RuntimeError("the solver diverged")
        return _known_field(fixed, moving)

    monkeypatch.setattr(nadmm_torch, "register", solver)
    out = tmp_path / "out"
    rc, stdout, err = _run(["--pairs", csv_path, "-o", out, "--batch-size", "4"], capsys)
    _assert_one_line_error(rc, stdout, err.splitlines()[-1] + "\n", "1 of 4 pairs failed")
    assert calls == [4, 1, 1, 1, 1]
    assert "failed (RuntimeError: the solver diverged): registering them one by one" in err
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["status"] for r in rows] == ["done", "done", "failed", "done"]
    assert rows[2]["message"] == "RuntimeError: the solver diverged"
    failed_id = rows[2]["id"]
    assert not (out / failed_id).exists()
    for r in rows:
        if r["status"] == "done":
            summary = json.loads((out / r["id"] / "summary.json").read_text())
            assert summary["metrics"]["batch_size"] == 1
    assert not [n for n in os.listdir(out) if n.startswith(".nadmm-tmp")]


def test_resume_with_batches(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(nadmm_torch, "register", _recording(calls))
    csv_path = _write_pairs(tmp_path, n=4)
    out = tmp_path / "out"
    run = ["--pairs", csv_path, "-o", out, "--batch-size", "4"]
    assert _run(run, capsys)[0] == 0 and [c[0][0] for c in calls] == [4]
    ids = [r["id"] for r in csv.DictReader(open(out / "summary.csv"))]
    (out / ids[1] / "summary.json").unlink()  # as if it had never finished
    image = sitk.ReadImage(str(tmp_path / "moving4.nii.gz"))  # an input changed
    sitk.WriteImage(image * 2.0, str(tmp_path / "moving4.nii.gz"))
    rc, stdout, err = _run(run, capsys)
    assert rc == 0, err
    assert [c[0][0] for c in calls] == [4, 2]  # the two to redo, in one batch
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["status"] for r in rows] == ["skipped", "done", "skipped", "done"]
    assert "2 registered, 2 skipped" in stdout
    assert "input(s) changed since the stored result: moving" in err
    # A different batch size is no reason to register again.
    rc, stdout, _ = _run([*run[:-1], "1"], capsys)
    assert rc == 0 and len(calls) == 2 and "0 registered, 4 skipped" in stdout


def test_interrupted_batch_leaves_no_partial_pair(tmp_path, monkeypatch, capsys):
    calls: list = []

    def interrupted_on_second(fixed, moving, **kw):
        calls.append(fixed.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _known_field(fixed, moving)

    monkeypatch.setattr(nadmm_torch, "register", interrupted_on_second)
    csv_path = _write_pairs(tmp_path, n=4)
    out = tmp_path / "out"
    rc, _, err = _run(["--pairs", csv_path, "-o", out, "--batch-size", "2"], capsys)
    assert rc == 130 and "interrupted" in err
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["status"] for r in rows] == ["done", "done"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [r["id"] for r in rows] + ["summary.csv", "summary.md"])


def test_compile_notice_names_the_batch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nadmm_torch, "register", _known_field)
    monkeypatch.setattr(cli, "_COMPILED", set())
    csv_path = _write_pairs(tmp_path, n=3, labels=False)
    rc, _, err = _run(["--pairs", csv_path, "-o", tmp_path / "out", "--compile",
                       "--batch-size", "3"], capsys)
    assert rc == 0, err
    assert "compiling the solver for shape 64x64 (batch of 3) on cpu" in err
    assert "the first call for shape 64x64 (batch of 3) took " in err
    assert err.count("compiling the solver") == 1


@pytest.mark.parametrize("value", ["0", "-2", "four"])
def test_bad_batch_size_names_the_flag(tmp_path, capsys, value):
    csv_path = _write_pairs(tmp_path, n=1, labels=False)
    rc, stdout, err = _run(["--pairs", csv_path, "-o", tmp_path / "out", "--batch-size", value],
                           capsys)
    assert rc == 2
    _assert_one_line_error(1, stdout, err, "--batch-size")
    assert "positive" in err and not (tmp_path / "out").exists()


def test_batch_size_needs_pairs(tmp_path, capsys):
    paths = _write_pair(tmp_path)
    rc, stdout, err = _run([paths["fixed"], paths["moving"], "-o", tmp_path / "out",
                            "--batch-size", "2"], capsys)
    _assert_one_line_error(rc, stdout, err, "--batch-size applies to cohort mode")
    assert not (tmp_path / "out").exists()
    assert "--batch-size" in cli.build_parser().format_help()
