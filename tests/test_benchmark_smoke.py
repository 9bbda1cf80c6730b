"""Smoke test of ``benchmarks/speed.py`` on a tiny grid of the bundled sample, so the
benchmark cannot rot between the runs that fill the README. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_writes_its_table(tmp_path, capsys):
    speed = _load("speed")
    out = tmp_path / "speed.json"
    rc = speed.main([
        "--json", str(out), "--data", str(tmp_path / "no_data"), "--sizes", "8x32x32",
        "--presets", "fast,paper", "--batch", "1,2", "--repeats", "1", "--no-demons",
    ])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["source"].startswith("bundled sample")
    methods = [(r["method"], r["batch"]) for r in doc["rows"]]
    assert methods == [("nadmm-fast-l2-o2", 1), ("nadmm-fast-l2-o2", 2),
                       ("nadmm-paper-l2-o2", 1), ("nadmm-paper-l2-o2", 2)]
    for r in doc["rows"]:
        assert r["shape"] == [8, 32, 32]
        assert r["seconds_per_pair"] > 0 and len(r["times"]) == 1
        assert abs(r["pairs_per_second"] * r["seconds_per_pair"] - 1) < 1e-9
        if r["method"].startswith("nadmm-fast"):  # the floor is estimated for fast only
            assert 0 < r["floor_seconds_per_pair"] and r["floor_ratio"] > 0
        else:
            assert "floor_ratio" not in r
    assert doc["bandwidth_bytes_per_second"] > 0
    assert doc["table"].count("| 8x32x32 8×32×32 |") == 4
    assert "nadmm-fast-l2-o2" in capsys.readouterr().out


def test_interleaved_timing_alternates_both_methods():
    pytest.importorskip("SimpleITK")
    speed = _load("speed")
    from nadmm_torch.data.sample import load_sample

    s = load_sample()
    fixed, moving = s.fixed[..., 32:96, 32:96], s.moving[..., 32:96, 32:96]
    out = speed.interleaved(fixed, moving, s.spacing, "crop", rounds=2)
    assert out["rounds"] == 2 and len(out["times"]["fast"]) == len(out["times"]["demons"]) == 2
    assert out["ratio"] == pytest.approx(out["fast_seconds"] / out["demons_seconds"])


def test_cohort_benchmark_writes_its_table(tmp_path, capsys):
    """``benchmarks/cohort.py``, solver part, two ACDC pairs (skipped without the data)."""
    data = REPO.parent / "shared" / "data" / "acdc"
    data = data if data.is_dir() else REPO.parent.parent / "shared" / "data" / "acdc"
    if not (data / "pairs.csv").is_file():
        pytest.skip(f"ACDC data not found ({data})")
    cohort = _load("cohort")
    out = tmp_path / "cohort.json"
    assert cohort.main(["--json", str(out), "--data", str(data), "--batches", "1,2",
                        "--rounds", "1", "--pairs", "2", "--no-compile", "--no-cli"]) == 0
    doc = json.loads(out.read_text())
    assert [(r["mode"], r["batch"]) for r in doc["solver"]["rows"]] == [("eager", 1),
                                                                        ("eager", 2)]
    assert doc["solver"]["rows"][1]["max_abs_diff_vs_batch1_eager"] < 1e-3
    assert "| solver, eager | common (2) | 2 |" in capsys.readouterr().out


@pytest.mark.skipif(not (REPO / ".." / "shared" / "data" / "acdc" / "pairs.csv").is_file(),
                    reason="ACDC data folder ../shared/data/acdc (with pairs.csv) is absent")
def test_acdc_tune_benchmark_scores_every_variant(tmp_path):
    bench = _load("acdc_tune")
    out = tmp_path / "acdc_tune.json"
    assert bench.main(["--tune-pairs", "2", "--report-pairs", "1", "--epochs", "1",
                       "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["rows"]) == ["defaults", "scan only", "scan + descent", "descent only"]
    assert len(doc["rows"]["scan only"]["scan"]) >= 5 and not doc["rows"]["descent only"]["scan"]
    assert all(0 < r["dice"] <= 1 for r in doc["rows"].values())
