"""nadmm-register and nadmm-demo, used as a new user would: files in, files out."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import nadmm_torch
from nadmm_torch import cli, demo
from nadmm_torch.io import Geometry, write_image

REPO = Path(__file__).resolve().parents[1]
FAST = ["--set", "iterations=2", "--set", "warps=2"]  # keeps the real solver well under 1 s


# -- data --------------------------------------------------------------------------------------


def _pair():
    """(fixed, moving, fixed_labels, moving_labels, array spacing): the bundled ACDC sample
    cropped in-plane to 64 x 64 around the heart, else a synthetic ellipsoid pair."""
    try:
        from nadmm_torch.data.sample import load_sample

        s = load_sample()
        crop = (..., slice(32, 96), slice(32, 96))
        return (s.fixed[crop].contiguous(), s.moving[crop].contiguous(),
                s.fixed_labels[crop].contiguous(), s.moving_labels[crop].contiguous(),
                tuple(float(v) for v in s.spacing))
    except Exception:  # noqa: BLE001 - no sample in this checkout
        z, y, x = np.meshgrid(np.arange(8), np.arange(64), np.arange(64), indexing="ij")

        def blob(cy, cx, r):
            return ((y - cy) ** 2 + (x - cx) ** 2 + (2 * (z - 4)) ** 2) < r**2

        def make(r):
            lab = np.zeros((8, 64, 64), np.int64)
            lab[blob(32, 30, r + 6)] = 2
            lab[blob(32, 30, r)] = 3
            lab[blob(30, 46, r)] = 1
            img = lab * 0.3 + 0.05 * np.sin(x / 3.0)
            return torch.tensor(img, dtype=torch.float32)[None, None], torch.tensor(lab)[None, None]

        f, fl = make(11)
        m, ml = make(8)
        return f, m, fl, ml, (10.0, 1.5, 1.5)


def _rotated_geometry(shape, spacing) -> Geometry:
    """Rotation by 90 degrees in-plane plus a flip of the slice axis; non-zero origin."""
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    return Geometry(size=tuple(reversed(shape)), spacing=tuple(reversed(spacing)),
                    origin=(12.5, -40.0, 7.0), direction=tuple(direction.ravel()))


def _write_pair(folder: Path, crop_moving: bool = False) -> dict[str, Path]:
    f, m, fl, ml, spacing = _pair()
    geo = _rotated_geometry(f.shape[2:], spacing)
    paths = {k: folder / f"{k}.nii.gz" for k in ("fixed", "moving", "fixed_labels",
                                                   "moving_labels")}
    write_image(f, geo, paths["fixed"])
    write_image(fl, geo, paths["fixed_labels"])
    if crop_moving:
        # The moving image on another grid: 4 voxels cropped on each side in x, origin moved
        # so that every kept voxel stays at the same physical point.
        origin = np.asarray(geo.origin) + geo.index_to_physical @ np.array([4.0, 0.0, 0.0])
        mgeo = Geometry(size=(geo.size[0] - 8, *geo.size[1:]), spacing=geo.spacing,
                        origin=tuple(origin), direction=geo.direction)
        m, ml = m[..., 4:-4].contiguous(), ml[..., 4:-4].contiguous()
    else:
        mgeo = geo
    write_image(m, mgeo, paths["moving"])
    write_image(ml, mgeo, paths["moving_labels"])
    return paths


def _known_field(fixed: torch.Tensor, moving: torch.Tensor, *, spacing=None, **kw):
    """Stand-in solver: a smooth, clearly non-zero field (about 3 voxels in-plane)."""
    shape = fixed.shape[2:]
    axes = torch.meshgrid(*[torch.linspace(0, 1, n) for n in shape], indexing="ij")
    if len(shape) == 3:
        z, y, x = axes
        d = torch.stack([0.4 * torch.sin(np.pi * y) * torch.sin(np.pi * x),
                         3.0 * torch.sin(np.pi * x) * torch.sin(np.pi * y),
                         -2.5 * torch.sin(2 * np.pi * y) * torch.sin(np.pi * x)])
    else:
        y, x = axes
        d = torch.stack([3.0 * torch.sin(np.pi * x) * torch.sin(np.pi * y),
                         -2.5 * torch.sin(2 * np.pi * y) * torch.sin(np.pi * x)])
    return d[None].expand(fixed.shape[0], *d.shape).to(fixed)  # one per batch element


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    pa, pb = a == label, b == label
    return 2.0 * (pa & pb).sum() / max(pa.sum() + pb.sum(), 1)


def _run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _sitk_warp_labels(out: Path, moving_labels: Path, fixed: Path) -> np.ndarray:
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))  # as-is, straight from disk
    transform = sitk.DisplacementFieldTransform(field)
    warped = sitk.Resample(sitk.ReadImage(str(moving_labels)), sitk.ReadImage(str(fixed)),
                           transform, sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(warped)


def _check_interop(out: Path, paths: dict[str, Path]) -> None:
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
    theirs = _sitk_warp_labels(out, paths["moving_labels"], paths["fixed"])
    fixed = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["fixed_labels"])))
    summary = json.loads((out / "summary.json").read_text())
    for lab in (1, 2, 3):
        d_ours, d_sitk = _dice(ours, fixed, lab), _dice(theirs, fixed, lab)
        assert abs(d_ours - d_sitk) < 0.01, (lab, d_ours, d_sitk)
        assert abs(summary["metrics"]["dice_after"][str(lab)] - d_ours) < 1e-9
        assert _dice(ours, theirs, lab) > 0.95


# -- interop -----------------------------------------------------------------------------------


def test_displacement_applies_in_simpleitk_with_resampled_moving(tmp_path, monkeypatch, capsys):
    """Known non-trivial field, rotated/flipped grid, moving on another grid than fixed."""
    monkeypatch.setattr(nadmm_torch, "register", _known_field)
    paths = _write_pair(tmp_path, crop_moving=True)
    out = tmp_path / "out"
    rc, stdout, err = _run([paths["fixed"], paths["moving"], "-o", out,
                            "--moving-labels", paths["moving_labels"],
                            "--fixed-labels", paths["fixed_labels"]], capsys)
    assert rc == 0, err
    assert "resampling the moving image into the fixed grid" in err
    assert "Dice" in stdout
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz")))
    assert np.abs(field).max() > 3.0  # mm: the field is far from the identity
    _check_interop(out, paths)
    fixed_affine = nib.load(paths["fixed"]).affine
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "jacobian_determinant.nii.gz"):
        assert np.allclose(nib.load(out / name).affine, fixed_affine, atol=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["moving_resampled_to_fixed_grid"] is True
    assert set(summary["versions"]) >= {"nadmm_torch", "torch", "SimpleITK"}


def test_real_solver_interop_with_simpleitk_and_ants(tmp_path, capsys):
    paths = _write_pair(tmp_path)
    out = tmp_path / "out"
    rc, stdout, err = _run([paths["fixed"], paths["moving"], "-o", out, *FAST, "--quiet",
                            "--moving-labels", paths["moving_labels"],
                            "--fixed-labels", paths["fixed_labels"]], capsys)
    assert rc == 0, err
    assert stdout == "" and err == ""  # --quiet
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert m["dice_after"]["mean"] > m["dice_before"]["mean"]
    assert m["displacement_max_mm"] > 1.0
    _check_interop(out, paths)
    try:
        import ants
    except Exception:  # noqa: BLE001 - optional
        return
    fixed = ants.image_read(str(paths["fixed_labels"]))
    warped = ants.apply_transforms(fixed, ants.image_read(str(paths["moving_labels"])),
                                   transformlist=[str(out / "displacement.nii.gz")],
                                   interpolator="nearestNeighbor")
    theirs = warped.numpy().transpose(2, 1, 0)
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
    f = fixed.numpy().transpose(2, 1, 0)
    for lab in (1, 2, 3):
        assert abs(_dice(theirs, f, lab) - _dice(ours, f, lab)) < 0.01


def test_2d_images(tmp_path, capsys):
    f, m, fl, ml, spacing = _pair()
    k = int(torch.argmax((fl[0, 0] > 0).sum((1, 2))))
    geo = Geometry(size=(64, 64), spacing=(1.5, 1.5), origin=(3.0, -2.0),
                   direction=(0.0, 1.0, 1.0, 0.0))
    for name, t in (("f", f[:, :, k]), ("m", m[:, :, k]), ("fl", fl[:, :, k]),
                    ("ml", ml[:, :, k])):
        write_image(t, geo, tmp_path / f"{name}.nrrd")
    out = tmp_path / "out"
    rc, _, err = _run([tmp_path / "f.nrrd", tmp_path / "m.nrrd", "-o", out, *FAST, "--plot",
                       "--moving-labels", tmp_path / "ml.nrrd", "--fixed-labels",
                       tmp_path / "fl.nrrd"], capsys)
    assert rc == 0, err
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    assert field.GetDimension() == 2 and field.GetNumberOfComponentsPerPixel() == 2
    assert (out / "registration.png").stat().st_size > 1000
    theirs = _sitk_warp_labels(out, tmp_path / "ml.nrrd", tmp_path / "f.nrrd")
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
    fixed = fl[0, 0, k].numpy()
    for lab in (1, 2, 3):
        assert abs(_dice(theirs, fixed, lab) - _dice(ours, fixed, lab)) < 0.02


def test_single_slice_3d_file_is_registered_in_2d(tmp_path, capsys):
    f, m, fl, ml, spacing = _pair()
    k = int(torch.argmax((fl[0, 0] > 0).sum((1, 2))))
    sl = slice(k, k + 1)
    geo = _rotated_geometry((1, *f.shape[3:]), spacing)
    for name, t in (("f", f[:, :, sl]), ("m", m[:, :, sl]), ("fl", fl[:, :, sl]),
                    ("ml", ml[:, :, sl])):
        write_image(t, geo, tmp_path / f"{name}.nii.gz")
    out = tmp_path / "out"
    rc, _, err = _run([tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", "-o", out, *FAST,
                       "--moving-labels", tmp_path / "ml.nii.gz", "--fixed-labels",
                       tmp_path / "fl.nii.gz"], capsys)
    assert rc == 0, err
    assert "registering in 2D" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["dice_after"]["mean"] > summary["metrics"]["dice_before"]["mean"]
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.mha")))
    assert field.shape == (1, *f.shape[3:], 3) and np.abs(field).max() > 0.5
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(out / "displacement.mha")))
    theirs = sitk.GetArrayFromImage(sitk.Resample(
        sitk.ReadImage(str(tmp_path / "ml.nii.gz")), sitk.ReadImage(str(tmp_path / "f.nii.gz")),
        transform, sitk.sitkNearestNeighbor, 0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
    fixed = fl[:, :, sl].numpy()[0, 0]
    for lab in (1, 2, 3):
        assert abs(_dice(theirs, fixed, lab) - _dice(ours, fixed, lab)) < 0.02


# -- round trip --------------------------------------------------------------------------------


def test_identity_registration_leaves_image_unchanged(tmp_path, capsys):
    f, *_, spacing = _pair()
    geo = _rotated_geometry(f.shape[2:], spacing)
    src = tmp_path / "img.nii.gz"
    write_image((f * 1000).round().to(torch.int16), geo, src)
    out = tmp_path / "out"
    rc, _, err = _run([src, src, "-o", out, *FAST], capsys)
    assert rc == 0, err
    a, b = nib.load(src), nib.load(out / "warped.nii.gz")
    assert np.allclose(a.affine, b.affine, atol=1e-5)
    assert a.shape == b.shape
    np.testing.assert_allclose(b.get_fdata(), a.get_fdata(), atol=0.05)  # of a 0..1000 range
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["fold_percent"] == 0.0
    assert summary["metrics"]["displacement_max_mm"] < 0.01


# -- errors ------------------------------------------------------------------------------------


def _assert_one_line_error(rc, out, err, contains):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nadmm-register: error: ")
    assert contains in lines[0], lines[0]


def test_error_messages(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nadmm_torch, "register", _known_field)
    paths = _write_pair(tmp_path)
    out = tmp_path / "out"
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    write_image(torch.rand(1, 1, 20, 20), Geometry.default((20, 20)), tmp_path / "flat.nii.gz")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        ([tmp_path / "missing.nii.gz", paths["moving"], "-o", out], "not found"),
        ([corrupt, paths["moving"], "-o", out], "cannot read"),
        ([paths["fixed"], tmp_path / "flat.nii.gz", "-o", out], "dimension mismatch"),
        ([paths["fixed"], paths["moving"], "-o", blocker / "sub"], "output"),
        ([paths["fixed"], paths["moving"], "-o", blocker], "not a directory"),
        ([paths["fixed"], paths["moving"], "-o", out, "--set", "iterations"], "KEY=VALUE"),
        ([paths["fixed"], paths["moving"], "-o", out, "--compile", "fastest"], "compile: expected"),
        ([paths["fixed"], "-o", out], "required"),
        ([paths["fixed"], paths["moving"]], "required"),
        ([paths["fixed"], paths["moving"], "-o", out, "--moving-labels", corrupt], "cannot read"),
        ([paths["fixed"], paths["moving"], "-o", out, "--device", "cuda:7"]
         if not torch.cuda.is_available() else [tmp_path / "x", tmp_path / "y", "-o", out],
         "not"),
    ]
    for argv, contains in cases:
        rc, stdout, err = _run(argv, capsys)
        _assert_one_line_error(rc, stdout, err, contains)
        assert not out.exists(), argv  # nothing written, not even the folder


def test_compile_flag_reaches_the_solver(tmp_path, monkeypatch, capsys):
    seen = []

    def recording(fixed, moving, **kw):
        seen.append(kw.get("compile", False))
        return _known_field(fixed, moving, **kw)

    monkeypatch.setattr(nadmm_torch, "register", recording)
    paths = _write_pair(tmp_path)
    for flag, expected in (([], False), (["--compile"], True),
                           (["--compile", "reduce-overhead"], "reduce-overhead")):
        out = tmp_path / f"out{len(seen)}"
        rc, _, err = _run([paths["fixed"], paths["moving"], "-o", out, "-q", *flag], capsys)
        assert rc == 0, err
        assert seen[-1] == expected
        settings = json.loads((out / "summary.json").read_text())["settings"]
        assert settings.get("compile", False) == expected


def test_no_partial_outputs_when_the_solver_fails(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("solver exploded\nwith a second line")

    monkeypatch.setattr(nadmm_torch, "register", broken)
    paths = _write_pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    rc, stdout, err = _run([paths["fixed"], paths["moving"], "-o", out], capsys)
    _assert_one_line_error(rc, stdout, err, "solver exploded with a second line")
    assert sorted(os.listdir(out)) == ["keep.txt"]

    def fails_while_writing(*args, **kwargs):  # a failure after some files are written
        raise OSError("disk full")

    monkeypatch.setattr(nadmm_torch, "register", _known_field)
    monkeypatch.setattr("nadmm_torch.io.displacement_to_itk", fails_while_writing)
    rc, stdout, err = _run([paths["fixed"], paths["moving"], "-o", out], capsys)
    _assert_one_line_error(rc, stdout, err, "disk full")
    assert sorted(os.listdir(out)) == ["keep.txt"]


def test_help_and_version(capsys):
    assert cli.main(["--help"]) == 0
    assert "--pairs" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0


# -- cohort ------------------------------------------------------------------------------------


def _cohort(tmp_path: Path) -> Path:
    paths = _write_pair(tmp_path)
    csv_path = tmp_path / "pairs.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fixed", "moving", "fixed_labels", "moving_labels", "id"])
        for pid in ("a", "b", "c"):
            w.writerow([p.name for p in paths.values()] + [pid])  # paths relative to the CSV
    return csv_path


def test_cohort_is_resumable(tmp_path, monkeypatch, capsys):
    calls = []

    def counting(fixed, moving, **kw):
        calls.extend([1] * fixed.shape[0])  # one per pair (a batch registers several)
        return _known_field(fixed, moving)

    monkeypatch.setattr(nadmm_torch, "register", counting)
    csv_path = _cohort(tmp_path)
    out = tmp_path / "cohort"
    rc, stdout, err = _run(["--pairs", csv_path, "-o", out], capsys)
    assert rc == 0, err
    assert len(calls) == 3
    for pid in ("a", "b", "c"):
        assert (out / pid / "summary.json").is_file()
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["status"] for r in rows] == ["done"] * 3
    assert float(rows[0]["dice_after"]) > 0
    assert "mean ± sd" in (out / "summary.md").read_text()

    (out / "b" / "summary.json").unlink()  # as if b had never finished
    rc, stdout, err = _run(["--pairs", csv_path, "-o", out], capsys)
    assert rc == 0, err
    assert len(calls) == 4  # only b ran again
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["status"] for r in rows] == ["skipped", "done", "skipped"]
    assert "1 registered, 2 skipped" in stdout


def test_cohort_interrupt_leaves_no_partial_pair(tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted_on_second(fixed, moving, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _known_field(fixed, moving)

    monkeypatch.setattr(nadmm_torch, "register", interrupted_on_second)
    csv_path = _cohort(tmp_path)
    out = tmp_path / "cohort"
    # One pair per solver call: the second pair is interrupted (tests/test_cohort_batch.py
    # interrupts a batch).
    rc, stdout, err = _run(["--pairs", csv_path, "-o", out, "--batch-size", "1"], capsys)
    assert rc == 130
    assert "interrupted" in err
    assert (out / "a" / "summary.json").is_file()
    assert not (out / "b").exists() and not (out / "c").exists()
    assert not [n for n in os.listdir(out) if n.startswith(".nadmm-tmp")]


def test_cohort_sigint_in_a_real_process(tmp_path):
    """A real Ctrl-C (SIGINT) to the process while the second pair is registering."""
    csv_path = _cohort(tmp_path)
    out = tmp_path / "cohort"
    script = textwrap.dedent(f"""
        import signal, sys, time
        # A background job (nohup, CI runners) may inherit SIGINT ignored; a terminal would not.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import nadmm_torch
        from test_cli import _known_field
        calls = []
        def slow(fixed, moving, **kw):
            calls.append(1)
            if len(calls) == 2:
                open({str(tmp_path / "in_second")!r}, "w").close()
                time.sleep(60)
            return _known_field(fixed, moving)
        nadmm_torch.register = slow
        from nadmm_torch.cli import main
        sys.exit(main(["--pairs", {str(csv_path)!r}, "-o", {str(out)!r}, "--quiet",
                       "--batch-size", "1"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180  # generous: a loaded CI machine imports torch slowly
        while not (tmp_path / "in_second").exists() and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert (tmp_path / "in_second").exists(), "the second registration never started"
        proc.send_signal(signal.SIGINT)  # now inside the second registration
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert err.strip().splitlines()[-1].startswith("nadmm-register: error: interrupted")
    assert (out / "a" / "summary.json").is_file()
    assert not (out / "b").exists()
    assert not [n for n in os.listdir(out) if n.startswith(".nadmm-tmp")]


def test_cohort_continues_past_a_failed_pair(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nadmm_torch, "register", _known_field)
    csv_path = _cohort(tmp_path)
    with open(csv_path, "a") as fh:
        fh.write("fixed.nii.gz,missing.nii.gz,,,broken\n")
    out = tmp_path / "cohort"
    rc, stdout, err = _run(["--pairs", csv_path, "-o", out, "--quiet"], capsys)
    _assert_one_line_error(rc, stdout, err, "1 of 4 pairs failed")
    rows = {r["id"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["broken"]["status"] == "failed" and "not found" in rows["broken"]["message"]
    assert all(rows[k]["status"] == "done" for k in "abc")
    assert not (out / "broken").exists()


def test_cohort_bad_csv(tmp_path, capsys):
    bad = tmp_path / "pairs.csv"
    bad.write_text("fixed,labels\na.nii.gz,b.nii.gz\n")
    rc, stdout, err = _run(["--pairs", bad, "-o", tmp_path / "o"], capsys)
    _assert_one_line_error(rc, stdout, err, "lacks column")
    rc, stdout, err = _run(["--pairs", tmp_path / "none.csv", "-o", tmp_path / "o"], capsys)
    _assert_one_line_error(rc, stdout, err, "not found")


# -- demo --------------------------------------------------------------------------------------


def test_demo_writes_a_figure(tmp_path, monkeypatch, capsys):
    pytest.importorskip("nadmm_torch.data.sample")
    monkeypatch.setattr(nadmm_torch, "register", _known_field)
    out = tmp_path / "demo.png"
    assert demo.main(["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Dice" in text and "->" in text and "det J" in text and "time" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
