"""Smoke test of ``benchmarks/brain2d_tune.py`` (leave-one-subject-out ``nt.tune`` vs grid) on
three tiny synthetic subjects whose affine stage is pre-filled in the cache (so neither ANTs
nor the image files are needed), plus its fold split on a known answer. No timing asserted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.synthetic import brain2d_folder, brain2d_subject
from tests.test_benchmark_smoke import _load


def test_folds_leave_one_subject_out():
    bt = _load("brain2d_tune")
    ids = ["a", "b", "c", "d", "e"]
    folds = bt.folds(ids)
    assert [f["held_out"] for f in folds] == ids
    for f in folds:
        assert len(f["tune"]) == 12 and len(f["test"]) == 8
        assert all(f["held_out"] not in p for p in f["tune"])
        assert all(f["held_out"] in p for p in f["test"])
        assert len(set(f["tune"]) | set(f["test"])) == 20


def test_brain2d_tune_runs_on_synthetic_subjects(tmp_path, capsys):
    bt = _load("brain2d_tune")
    subjects = {f"SUBJ-{n}": brain2d_subject(s) for n, s in ((1, 0.0), (2, 2.0), (3, -1.5))}
    data, cache = brain2d_folder(tmp_path, subjects)
    out = tmp_path / "t.json"
    argv = ["--data", str(data), "--cache", str(cache), "--json", str(out), "--folds", "0",
            "--epochs", "1", "--val-pairs", "1", "--lam-mults", "1/3,1", "--theta-mults",
            "1,10", "--unlabelled"]
    assert bt.main(argv) == 0
    doc = json.loads(out.read_text())
    (fold,) = doc["folds"]
    assert fold["held_out"] == "SUBJ-1"
    for m in ("defaults", "grid", "tuned", "tuned-nolabels"):
        assert 0 <= fold[m]["dice"] <= 1 and len(fold[m]["per_pair"]) == 4
        assert fold[m]["fold_percent"] >= 0
    # the grid's choice is the best mean Dice over the fold's 2 tuning pairs, and its held-out
    # Dice is that grid point's on the 4 test pairs
    grid = doc["grid"]["fast"]
    tune = ["SUBJ-2__to__SUBJ-3", "SUBJ-3__to__SUBJ-2"]
    best = max(grid, key=lambda k: np.mean([grid[k][p][0] for p in tune]))
    assert [float(v) for v in best.split(",")] == pytest.approx(
        [fold["grid"]["lam_mult"], fold["grid"]["theta_mult"]], rel=1e-5)
    test = [p for p in grid[best] if "SUBJ-1" in p]
    assert fold["grid"]["dice"] == np.mean([grid[best][p][0] for p in test])
    assert fold["defaults"]["dice"] == np.mean([grid["1.0,1.0"][p][0] for p in test])
    assert fold["grid"]["registrations"] == 4 * 2
    # the tuned settings start from the defaults (epoch 0 of the history) and are per level
    assert fold["tuned"]["history"][0]["epoch"] == 0 and len(fold["tuned"]["lam"]) == 3
    assert "| fast | SUBJ-1 | tuned |" in capsys.readouterr().out
    # a second run reusing that grid chooses and scores the same without registering it again
    again = tmp_path / "again.json"
    argv2 = list(argv)
    argv2[argv2.index("--json") + 1] = str(again)
    assert bt.main(argv2 + ["--grid-from", str(out)]) == 0
    doc2 = json.loads(again.read_text())
    assert doc2["folds"][0]["grid"] == fold["grid"] and doc2["grid"] == doc["grid"]
