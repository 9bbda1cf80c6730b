"""Smoke test of ``benchmarks/brain2d.py`` on a synthetic two-subject folder (so the script
cannot rot between the runs that fill its table), plus its scoring on known answers. Needs
SimpleITK and antspyx (the affine stage); skipped without them. No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_benchmark_smoke import _load


def _subject(folder: Path, n: int, shift: float) -> None:
    sitk = pytest.importorskip("SimpleITK")
    y, x = np.mgrid[0:48, 0:40].astype(np.float32)
    r = np.hypot(y - 24 - shift, x - 20 + shift / 2)
    image = np.where(r < 14, 800.0, 0.0) + np.where(r < 7, 600.0, 0.0)
    labels = np.where(r < 14, 1002, 0) + np.where(r < 7, 4 - 1002, 0)  # ids 0, 4, 1002
    for sub, arr in (("images", image.astype(np.float32)), ("labels", labels.astype(np.int16))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        name = f"SUBJ-{n}_slice1.nii.gz" if sub == "images" else f"SUBJ-{n}_labels_slice1.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / sub / name))


def test_brain2d_benchmark_runs_on_synthetic_subjects(tmp_path, capsys):
    pytest.importorskip("ants")
    brain2d = _load("brain2d")
    data = tmp_path / "data"
    for n, shift in ((1, 0.0), (2, 2.0)):  # 2 ordered pairs
        _subject(data, n, shift)
    out, cache = tmp_path / "b.json", tmp_path / "cache"
    argv = ["--data", str(data), "--json", str(out), "--cache", str(cache),
            "--methods", "affine,nadmm-fast-l2-o2,demons", "--demons-iterations", "5,3,2",
            "--threads", "1"]
    assert brain2d.main(argv) == 0
    doc = json.loads(out.read_text())
    assert len(doc["config"]["pairs"]) == 2 and len(list(cache.glob("*.npz"))) == 2
    for m in ("affine", "nadmm-fast-l2-o2", "demons"):
        s = doc["summary"][m]
        assert s["n_pairs"] == 2 and 0 <= s["dice_mean"] <= 1
        assert s["dice_cortical_mean"] >= 0 and s["dice_subcortical_mean"] >= 0
    assert "| nadmm-fast-l2-o2 |" in doc["table"] and "| demons |" in capsys.readouterr().out
    argv[argv.index("--methods") + 1] = "affine"
    before = {p: p.stat().st_mtime_ns for p in cache.glob("*.npz")}
    assert brain2d.main(argv + ["--quick"]) == 0  # the affine stage comes from the cache
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.npz")} == before
    assert json.loads(out.read_text())["config"]["pairs"] == [["SUBJ-1", "SUBJ-2"],
                                                               ["SUBJ-2", "SUBJ-1"]]


def test_scoring_counts_labels_with_enough_pixels_and_splits_cortical():
    brain2d = _load("brain2d")
    fixed = np.zeros((20, 20), np.int64)
    fixed[2:10, 2:10] = 1005          # cortical, 64 px
    fixed[12:18, 12:18] = 17          # subcortical, 36 px
    fixed[0, 0:5] = 30                # 5 px: fewer than 10, not scored
    moving = fixed.copy()
    moving[12:18, 12:15] = 0          # subcortical half lost: Dice 2·18 / (18 + 36) = 2/3
    stage = {"fixed_labels": fixed, "moving_labels": moving}
    rec = brain2d.evaluate(stage, None)
    assert rec["n_labels"] == 2
    assert rec["dice_cortical"] == pytest.approx(1.0)
    assert rec["dice_subcortical"] == pytest.approx(2 / 3)
    assert rec["dice"] == pytest.approx((1 + 2 / 3) / 2)
    # a one-pixel shift by the displacement: warp_labels over the remapped ids 0..K-1
    d = torch.zeros(1, 2, 20, 20)
    d[:, 1] = 1.0  # moving(x + 1): the labels move one pixel left
    shifted = brain2d.evaluate({"fixed_labels": fixed, "moving_labels": fixed}, d)
    assert shifted["dice_cortical"] == pytest.approx(2 * 56 / 128)
    assert shifted["fold_percent"] == 0.0
