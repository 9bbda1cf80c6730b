"""Smoke test of ``benchmarks/brain2d_baselines_tune.py`` (demons and SyN tuned on the
leave-one-subject-out folds of ``brain2d_tune.py``): its grid, its choice per fold, its per-pair
run cache, on three tiny subjects whose affine stage is pre-filled in the cache (synthetic, and
three real brain2d slices shrunk ×6 where ``../shared/data/brain2d`` is present). Registrations
need SimpleITK and antspyx (skipped without them). No timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import brain2d_folder, brain2d_subject
from tests.test_benchmark_smoke import _load

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "brain2d"
TINY = ["--demons-sigmas", "0.5,2", "--demons-iterations", "5/3/2", "--syn-radii", "2",
        "--syn-grad-steps", "0.25", "--syn-iterations", "4/2/1", "--folds", "0"]


def test_grid_puts_the_anchor_first_once():
    bt = _load("brain2d_baselines_tune")
    points = bt.grid(bt.parse_args([]))
    assert points["demons"][0] == bt.ANCHORS["demons"] == dict(sigma=1.0,
                                                               iterations=(100, 60, 30))
    assert len(points["demons"]) == 6 * 4  # σ 1.0, 100/60/30 is in the grid: not repeated
    assert points["syn"][0] == bt.ANCHORS["syn"] and len(points["syn"]) == 1 + 2 * 4
    keys = [bt.point_key("syn", s) for s in points["syn"]]
    assert keys[0] == "syn_r4_g0.2_f3_t0_its100-70-50" and len(set(keys)) == len(keys)
    assert points["affine"] == [{}] and "nadmm-fast" not in points
    assert bt.grid(bt.parse_args(["--nadmm-presets", "fast"]))["nadmm-fast"] == [
        dict(preset="fast")]
    with pytest.raises(SystemExit, match="unknown baseline"):
        bt.grid(bt.parse_args(["--methods", "elastix"]))


def test_choice_reads_only_the_tuning_pairs_and_keeps_the_anchor_on_ties():
    bt = _load("brain2d_baselines_tune")
    a, b, c = ("s1", "s2"), ("s2", "s1"), ("s1", "s3")
    cells = {"anchor": {a: [0.5, 0, 1], b: [0.5, 0, 1], c: [0.9, 0, 1]},
             "x": {a: [0.6, 0, 1], b: [0.4, 0, 1], c: [0.1, 0, 1]},
             "y": {a: [0.7, 0, 1], b: [0.1, 0, 1], c: [0.99, 0, 1]}}
    assert bt.choose(cells, [a, b]) == "anchor"  # 0.5 = 0.5 > 0.4: the first of equals
    assert bt.choose(cells, [a]) == "y"
    with pytest.raises(ValueError, match="tuning pair"):
        bt.choose(cells, [])
    entries = [dict(per_pair=[0.6, 0.5]), dict(per_pair=[0.2])]
    ref = [dict(per_pair=[0.5, 0.5]), dict(per_pair=[0.3])]
    wins, n, delta = bt.compare(entries, ref)
    assert (wins, n) == (1, 3) and delta == pytest.approx((0.1 + 0 - 0.1) / 3)


def _fake_record(path: Path, ids: list[str]) -> None:
    """A ``brain2d_tune.py`` record with one fold (the first subject held out)."""
    entry = dict(dice=0.5, fold_percent=0.0, per_pair=[0.4, 0.5, 0.6, 0.5])
    path.write_text(json.dumps(dict(folds=[dict(held_out=ids[0], preset="fast",
                                                defaults=entry, tuned=entry)])))


def _run_and_check(bt, tmp_path: Path, subjects: dict, capsys) -> dict:
    data, cache = brain2d_folder(tmp_path, subjects)
    ids = list(subjects)
    _fake_record(tmp_path / "rec.json", ids)
    out, runs = tmp_path / "b.json", tmp_path / "runs"
    argv = ["--data", str(data), "--cache", str(cache), "--runs", str(runs), "--json", str(out),
            "--nadmm-presets", "fast", "--nadmm-records", str(tmp_path / "rec.json"), *TINY]
    assert bt.main(argv) == 0
    doc = json.loads(out.read_text())
    (fold,) = doc["folds"]
    assert fold["held_out"] == ids[0] and len(fold["test"]) == 4
    for row in ("affine", "demons anchor", "demons tuned", "syn anchor", "syn tuned",
                "nadmm-fast defaults"):
        assert 0 <= fold[row]["dice"] <= 1 and len(fold[row]["per_pair"]) == 4, row
        assert fold[row]["fold_percent"] >= 0
    # the tuned choice: the best mean Dice over the 2 tuning pairs; scored on the 4 test pairs
    tune = [f"{ids[1]}__to__{ids[2]}", f"{ids[2]}__to__{ids[1]}"]
    for family in ("demons", "syn"):
        cells = doc["grid"][family]
        assert len(cells) == (3 if family == "demons" else 2)  # the anchor and the grid
        best = max(cells, key=lambda k: np.mean([cells[k][p][0] for p in tune]))
        assert fold[f"{family} tuned"]["key"] == best
        assert fold[f"{family} tuned"]["dice"] == pytest.approx(
            np.mean([cells[best][p][0] for p in fold["test"]]))
        assert fold[f"{family} tuned"]["registrations"] == len(cells) * 2
    assert doc["rows"]["nadmm-fast tuned [rec]"][0]["dice"] == 0.5
    printed = capsys.readouterr().out
    assert "| syn tuned |" in printed and "| nadmm-fast tuned [rec] |" in printed
    assert "vs syn tuned: ahead on | Δ | vs demons tuned: ahead on" in doc["table"]
    # a second run registers nothing again (every result comes from --runs) and agrees
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")}
    assert len(before) == (3 + 2 + 1 + 1) * 6
    again = tmp_path / "again.json"
    argv[argv.index("--json") + 1] = str(again)
    assert bt.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")} == before
    assert json.loads(again.read_text())["folds"] == doc["folds"]
    return doc


def test_baselines_tune_runs_on_synthetic_subjects(tmp_path, capsys):
    pytest.importorskip("SimpleITK")
    pytest.importorskip("ants")
    bt = _load("brain2d_baselines_tune")
    subjects = {f"SUBJ-{n}": brain2d_subject(s) for n, s in ((1, 0.0), (2, 2.0), (3, -1.5))}
    _run_and_check(bt, tmp_path, subjects, capsys)


@pytest.mark.skipif(not (DATA / "images").is_dir(), reason=f"no brain2d data at {DATA}")
def test_baselines_tune_runs_on_three_real_slices_shrunk(tmp_path, capsys):
    sitk = pytest.importorskip("SimpleITK")
    pytest.importorskip("ants")
    bt = _load("brain2d_baselines_tune")
    subjects = {}
    for sid, (img, lab) in list(bt.brain2d.subjects(DATA).items())[:3]:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(img))).astype(np.float32)[::6, ::6]
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(lab))).astype(np.int64)[::6, ::6]
        subjects[sid] = (np.ascontiguousarray(image), np.ascontiguousarray(labels))
    doc = _run_and_check(bt, tmp_path, subjects, capsys)
    # real anatomy: every deformable row beats the (here: no) affine stage
    fold = doc["folds"][0]
    assert all(fold[r]["dice"] > fold["affine"]["dice"] for r in ("demons anchor", "syn anchor"))
