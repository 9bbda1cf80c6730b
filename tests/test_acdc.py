"""ACDC ES→ED protocol: loading, crop, split, evaluation, baselines' field conversion, the
benchmark script, and the bundled sample.

Tests that need the data folder (``../shared/data/acdc`` relative to the repository root) are
skipped where it is absent; the sample and conversion tests run everywhere.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nadmm_torch as nt
from nadmm_torch.data import load_sample
from nadmm_torch.data.acdc import (
    crop_or_pad,
    evaluate_pair,
    foreground_centre,
    load_pair,
    load_volume,
    read_acdc_pairs,
    resample_inplane,
    split,
    summarize,
)
from nadmm_torch.ops.warp import warp

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "acdc"

needs_data = pytest.mark.skipif(
    not (DATA / "pairs.csv").is_file(),
    reason=f"ACDC data folder {DATA} (with pairs.csv) is absent",
)


# ---------------------------------------------------------------- no data needed


def test_crop_or_pad_centres_and_pads():
    vol = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6) + 1
    out = crop_or_pad(vol, (2, 3), size=4)
    assert out.shape == (2, 4, 4)
    # output index k <- input index centre - 2 + k
    assert out[0, 2, 2] == vol[0, 2, 3]
    assert out[1, 0, 0] == vol[1, 0, 1]
    padded = crop_or_pad(vol, (0, 0), size=4)
    assert np.all(padded[:, :2] == 0) and np.all(padded[:, :, :2] == 0)
    assert padded[0, 2, 2] == vol[0, 0, 0]


def test_resample_inplane_identity_and_size():
    rng = np.random.default_rng(0)
    vol = rng.random((3, 10, 12)).astype(np.float32)
    same = resample_inplane(vol, (1.5, 1.5), order=1)
    assert np.allclose(same, vol)
    lab = rng.integers(0, 4, (3, 10, 12)).astype(np.uint8)
    out = resample_inplane(lab, (1.2, 2.0), order=0)
    assert out.shape == (3, round(10 * 1.2 / 1.5), round(12 * 2.0 / 1.5))
    assert out.dtype == np.uint8
    with pytest.raises(ValueError, match="order"):
        resample_inplane(vol, (1.5, 1.5), order=3)


def test_resample_matches_simpleitk():
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(2)
    lab = rng.integers(0, 4, (2, 37, 41)).astype(np.uint8)
    img = rng.random((2, 37, 41)).astype(np.float32)
    sp = (1.367, 1.5625)
    for arr, interp, order in ((lab, sitk.sitkNearestNeighbor, 0), (img, sitk.sitkLinear, 1)):
        mine = resample_inplane(arr, sp, order=order)
        s = sitk.GetImageFromArray(arr)
        s.SetSpacing((sp[1], sp[0], 1.0))
        size = (mine.shape[2], mine.shape[1], mine.shape[0])
        ref = sitk.Resample(
            s, size, sitk.Transform(), interp, (0, 0, 0), (1.5, 1.5, 1.0),
            s.GetDirection(), 0, s.GetPixelID(),
        )  # fmt: skip
        ref = sitk.GetArrayFromImage(ref)
        if order == 0:
            assert np.array_equal(mine, ref)
        else:
            assert np.allclose(mine, ref, atol=1e-5)


def test_split_is_fixed_and_stratified():
    groups = {f"patient{i:03d}": g for i, g in enumerate(["A"] * 10 + ["B"] * 7, start=1)}
    tune, report = split(groups, n_report_per_group=3)
    assert (tune, report) == split(dict(reversed(list(groups.items()))), n_report_per_group=3)
    assert not set(tune) & set(report)
    assert sorted(tune + report) == sorted(groups)
    assert sum(groups[p] == "A" for p in report) == 3
    assert sum(groups[p] == "B" for p in report) == 3
    assert split(groups, n_report_per_group=3, seed=1) != (tune, report)


def test_sample_loads():
    s = load_sample()
    z = s.fixed.shape[2]
    for t in (s.fixed, s.moving, s.fixed_labels, s.moving_labels):
        assert t.shape == (1, 1, z, 128, 128)
    assert s.fixed.dtype == torch.float32 and s.fixed_labels.dtype == torch.int64
    assert len(s.spacing) == 3 and s.spacing[1:] == (1.5, 1.5)
    assert s.patient.startswith("patient")
    assert set(torch.unique(s.fixed_labels).tolist()) == {0, 1, 2, 3}
    rec = evaluate_pair(s, None)
    assert 0.3 < rec["dice"] < 0.95
    assert rec["fold_percent"] == 0.0
    # identity displacement = unregistered
    rec0 = evaluate_pair(s, torch.zeros(1, 3, *s.fixed.shape[2:]))
    assert rec0["dice"] == pytest.approx(rec["dice"])
    assert rec0["hd"] == pytest.approx(rec["hd"])


def test_evaluate_pair_validates_shape():
    s = load_sample()
    with pytest.raises(ValueError, match="displacement"):
        evaluate_pair(s, torch.zeros(1, 2, *s.fixed.shape[2:]))


def test_summarize():
    recs = [
        {"dice": 0.5, "dice_rv": 0.4, "dice_myo": 0.5, "dice_lv": 0.6, "hd": 10.0,
         "fold_percent": 0.0, "seconds": 1.0},
        {"dice": 0.7, "dice_rv": 0.6, "dice_myo": 0.7, "dice_lv": 0.8, "hd": math.nan,
         "fold_percent": 1.0, "seconds": 3.0},
    ]  # fmt: skip
    s = summarize(recs)
    assert s["dice_mean"] == pytest.approx(0.6)
    assert s["dice_sd"] == pytest.approx(0.1)  # population sd
    assert s["hd_mean"] == 10.0 and s["seconds_mean"] == 2.0 and s["n_pairs"] == 2


def test_itk_field_conversion_matches_simpleitk_resampling():
    """Our warp with the converted field equals SimpleITK's resampling with the ITK field."""
    sitk = pytest.importorskip("SimpleITK")
    from nadmm_torch.baselines import itk_field_to_displacement

    rng = np.random.default_rng(3)
    shape, sp = (5, 20, 24), (8.0, 1.5, 1.2)
    moving = rng.random(shape).astype(np.float32)
    # smooth field, small enough that every sample stays inside the grid
    zz, yy, xx = np.meshgrid(*[np.linspace(0, np.pi, n) for n in shape], indexing="ij")
    u = np.stack(
        [np.sin(yy) * np.sin(xx) * 1.5, np.cos(zz) * np.sin(xx) * 1.5, np.sin(zz) * 2.0], -1
    )  # components (x, y, z) in mm
    margin = (slice(None), slice(2, -2), slice(2, -2))
    field = sitk.GetImageFromArray(u.astype(np.float64), isVector=True)
    field.SetSpacing(sp[::-1])
    m = sitk.GetImageFromArray(moving)
    m.SetSpacing(sp[::-1])
    tx = sitk.DisplacementFieldTransform(sitk.Image(field))
    ref = sitk.GetArrayFromImage(sitk.Resample(m, m, tx, sitk.sitkLinear, 0.0))
    d = itk_field_to_displacement(u, sp)
    assert d.shape == (1, 3, *shape)
    ours = warp(torch.from_numpy(moving)[None, None], d)[0, 0].numpy()
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")) + d[0].numpy()
    inside = np.all(
        [(coords[i] >= 0) & (coords[i] <= shape[i] - 1) for i in range(3)], axis=0
    )  # sitk pads with 0 outside, we replicate the border: compare inside only
    assert inside[margin].mean() > 0.5
    assert np.allclose(ours[inside], ref[inside], atol=1e-4)


def test_demons_on_sample_improves_dice():
    pytest.importorskip("SimpleITK")
    from nadmm_torch.baselines import demons_register

    s = load_sample()
    d = demons_register(s.fixed, s.moving, s.spacing, iterations=(10, 5, 0), sigma=1.0)
    assert d.shape == (1, 3, *s.fixed.shape[2:]) and d.dtype == torch.float32
    assert evaluate_pair(s, d)["dice"] > evaluate_pair(s, None)["dice"] + 0.05


# ---------------------------------------------------------------- data folder needed


@needs_data
def test_read_pairs_and_load_volume():
    rows = read_acdc_pairs(DATA)
    assert len(rows) > 0
    r = rows[0]
    assert {"patient", "group", "ed_file", "es_file", "spacing_z_mm"} <= set(r)
    assert isinstance(r["spacing_y_mm"], float)
    img, lab = load_volume(DATA / r["ed_file"])
    assert img.shape == lab.shape and img.dtype == np.float32 and lab.dtype == np.uint8


@needs_data
@pytest.mark.acdc
def test_load_pair_shapes_crop_and_fingerprint():
    rows = read_acdc_pairs(DATA)
    for r in rows[:: max(1, len(rows) // 3)][:3]:
        pair = load_pair(DATA, r["patient"])
        ed_img, ed_lab = load_volume(DATA / r["ed_file"])
        z = ed_img.shape[0]
        for t in (pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels):
            assert t.shape == (1, 1, z, 128, 128)
        assert pair.spacing == (r["spacing_z_mm"], 1.5, 1.5)
        assert pair.patient == r["patient"] and pair.group == r["group"]
        # the crop is centred on the ED foreground centroid (within the rounding)
        fg = torch.nonzero(pair.fixed_labels[0, 0] > 0).double()
        centroid = fg[:, 1:].mean(0)
        assert torch.all((centroid - 64).abs() <= 0.5 + 1e-9), centroid
        # ... and that centroid is the one of the resampled native ED labels
        res = resample_inplane(ed_lab, (r["spacing_y_mm"], r["spacing_x_mm"]), order=0)
        assert foreground_centre(res) == tuple(
            int(v) for v in np.floor(np.argwhere(res > 0)[:, 1:].mean(0) + 0.5)
        )
        # the crop did not cut the heart
        assert int((pair.fixed_labels > 0).sum()) == int((res > 0).sum())
        rec = evaluate_pair(pair, None)
        assert 0.2 < rec["dice"] < 0.95 and 2.0 < rec["hd"] < 40.0


@needs_data
def test_split_of_data_folder():
    rows = read_acdc_pairs(DATA)
    tune, report = split(rows)
    assert not set(tune) & set(report)
    assert len(tune) + len(report) == len(rows)
    groups = {r["patient"]: r["group"] for r in rows}
    for g in set(groups.values()):
        n = sum(v == g for v in groups.values())
        assert sum(groups[p] == g for p in report) == min(4, n)
    if load_sample().patient in groups:
        assert load_sample().patient in tune  # the bundled sample does not leak


@needs_data
def test_benchmark_smoke(tmp_path):
    out = tmp_path / "acdc.json"
    cmd = [
        sys.executable, str(REPO / "benchmarks" / "acdc.py"), "--data", str(DATA),
        "--json", str(out), "--methods", "unregistered,nadmm-fast-l2-o2", "--max-pairs", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert set(doc) >= {"summary", "pairs"}
    s = doc["summary"]["unregistered"]
    for k in (
        "dice_mean", "dice_sd", "dice_rv", "dice_myo", "dice_lv", "hd_mean",
        "fold_percent_mean", "seconds_mean", "n_pairs", "device",
    ):  # fmt: skip
        assert k in s
    assert s["n_pairs"] == 2
    recs = doc["pairs"]["unregistered"]
    assert len(recs) == 2
    for k in ("patient", "dice_rv", "dice_myo", "dice_lv", "dice", "hd", "fold_percent", "seconds"):
        assert k in recs[0]
    assert "| unregistered |" in proc.stdout
    ours = doc["pairs"]["nadmm-fast-l2-o2"]
    assert [r["patient"] for r in ours] == [r["patient"] for r in recs]
    for before, after in zip(recs, ours):
        assert after["dice"] > before["dice"] + 0.05, (before, after)
        assert after["fold_percent"] == 0.0


@needs_data
@pytest.mark.acdc
@pytest.mark.parametrize("data_term,order", [("l2", 2), ("l1", 1), ("l2", 3)])
def test_registration_raises_dice_on_real_pairs_without_folding(data_term, order):
    rows = read_acdc_pairs(DATA)
    _, report = split(rows)
    for patient in report[::7]:  # 3 pairs: DCM, HCM, NOR
        pair = load_pair(DATA, patient)
        d = nt.register(pair.fixed, pair.moving, spacing=pair.spacing, data_term=data_term,
                        order=order)
        before, after = evaluate_pair(pair, None), evaluate_pair(pair, d)
        assert after["dice"] > before["dice"] + 0.05, (patient, before["dice"], after["dice"])
        assert after["hd"] < before["hd"], patient
        assert after["fold_percent"] == 0.0, patient


@pytest.mark.slow
def test_syn_field_conversion_matches_ants_apply_transforms():
    """SyN's converted field warps like ``ants.apply_transforms`` with ANTs' own transform."""
    ants = pytest.importorskip("ants")
    pytest.importorskip("SimpleITK")
    from nadmm_torch.baselines import syn_register

    s = load_sample()
    d = syn_register(s.fixed, s.moving, s.spacing, iterations=(20, 10), grad_step=0.25)
    assert d.shape == (1, 3, *s.fixed.shape[2:])
    assert evaluate_pair(s, d)["dice"] > evaluate_pair(s, None)["dice"]
    # run ANTs directly (same settings, deterministic) and resample with its transforms
    sp = tuple(reversed(s.spacing))
    f = ants.from_numpy(np.ascontiguousarray(s.fixed[0, 0].numpy().T), (0.0,) * 3, sp)
    m = ants.from_numpy(np.ascontiguousarray(s.moving[0, 0].numpy().T), (0.0,) * 3, sp)
    reg = ants.registration(
        f, m, type_of_transform="SyNOnly", initial_transform="Identity",
        syn_metric="meansquares", reg_iterations=(20, 10), grad_step=0.25,
    )  # fmt: skip
    ref = ants.apply_transforms(f, m, reg["fwdtransforms"]).numpy().T
    ours = warp(s.moving, d)[0, 0].numpy()
    shape = ours.shape
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")) + d[0].numpy()
    inside = np.all([(coords[i] >= 0) & (coords[i] <= shape[i] - 1) for i in range(3)], axis=0)
    assert inside.mean() > 0.5
    assert np.allclose(ours[inside], ref[inside], atol=1e-3)
