"""CI slice of ``benchmarks/folding.py``: one ACDC pair, the fast preset, l2 order 2,
λ × 0.1 and × 10; no voxel may fold. Skipped where the ACDC data folder is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "acdc"


@pytest.mark.skipif(
    not (DATA / "pairs.csv").is_file(),
    reason=f"ACDC data folder {DATA} (with pairs.csv) is absent",
)
def test_folding_benchmark_slice_has_no_folds(tmp_path):
    out = tmp_path / "folding.json"
    cmd = [
        sys.executable, str(REPO / "benchmarks" / "folding.py"), "--data", str(DATA),
        "--max-pairs", "1", "--presets", "fast", "--data-terms", "l2", "--orders", "2",
        "--lam-factors", "0.1,10", "--json", str(out), "--threads", "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert len(doc["records"]) == 2
    assert [r["lam_factor"] for r in doc["records"]] == [0.1, 10.0]
    for r in doc["records"]:
        assert r["folds"] == 0 and r["min_det"] > 0 and r["fold_percent"] == 0.0, r
        assert r["voxels"] > 0 and 0.5 < r["dice"] <= 1.0  # a real registration was scored
    assert "| fast | l2 | 2 | 0.1 |" in proc.stdout
    assert "Total: 0 folded voxels in 2 registrations." in proc.stdout


@pytest.mark.skipif(
    not (DATA / "pairs.csv").is_file(),
    reason=f"ACDC data folder {DATA} (with pairs.csv) is absent",
)
def test_folding_shards_cover_the_pairs_once_and_merge(tmp_path):
    """``--shard 0/2`` and ``1/2`` of the first 3 pairs: 2 + 1 pairs, disjoint; ``--merge``
    joins them into one table of 3 registrations."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [
        sys.executable, str(REPO / "benchmarks" / "folding.py"), "--data", str(DATA),
        "--max-pairs", "3", "--presets", "fast", "--data-terms", "l2", "--orders", "2",
        "--lam-factors", "1", "--threads", "1",
    ]
    parts = []
    for i in range(2):
        out = tmp_path / f"part{i}.json"
        proc = subprocess.run(base + ["--shard", f"{i}/2", "--json", str(out)],
                              capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        parts.append(json.loads(out.read_text()))
    p0, p1 = ([r["patient"] for r in p["records"]] for p in parts)
    assert len(p0) == 2 and len(p1) == 1 and not set(p0) & set(p1)
    merged = tmp_path / "merged.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "folding.py"), "--merge",
           str(tmp_path / "part0.json"), str(tmp_path / "part1.json"), "--json", str(merged)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(merged.read_text())
    assert len(doc["records"]) == 3 and doc["summary"][0]["pairs"] == 3
    assert "Total: 0 folded voxels in 3 registrations." in proc.stdout
