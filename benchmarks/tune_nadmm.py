#!/usr/bin/env python
"""Grid search of λ and θ per (preset, data term, order) on the ACDC *tuning* split.

Usage::

    python benchmarks/tune_nadmm.py --data DIR [--data-terms l2,l1] [--orders 1,2,3]
        [--presets fast,accurate] [--subset 12] [--record benchmarks/records/tune_nadmm.json]
        [--resume]

Search (ES→ED protocol of :mod:`nadmm_torch.data.acdc`, scored by mean Dice of
``evaluate_pair``; ties within 0.001 go to the lower mean Hausdorff distance):

* ``fast`` and ``paper``: λ × θ on a log grid (:data:`LAMBDA_GRID` per data term ×
  :data:`THETA_GRID`), extended by ×3 steps past an edge where the best setting lies on it;
* ``accurate``: λ × {1/3, 1, 3} around the best ``paper`` setting of the same data term and
  order, at its θ (extended like ``fast``; the tolerance-stopped solver is ~3× dearer).
  (``paper`` entries were tuned as ``fast`` before ``fast`` got its own schedule.)

Configurations with any folded voxel are not eligible. Pairs: ``--subset`` tuning patients
spread evenly over the sorted tuning IDs (the report split is never touched). The record is
written after every configuration (processes may share it, e.g. one per data term);
``--resume`` skips those already in it. ``best`` holds the
selected (λ, θ) per ``preset-data_term-o{order}``; ``nadmm_torch/presets.py`` copies them.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path

import torch

import nadmm_torch as nt
from nadmm_torch.data.acdc import (
    evaluate_pair,
    evenly_spaced,
    load_pair,
    read_pairs,
    split,
    summarize,
)

LAMBDA_GRID = {"l2": (0.3, 1.0, 3.0), "l1": (0.01, 0.03, 0.1)}
THETA_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
EXTEND = 3


def key(preset: str, data_term: str, order: int) -> str:
    return f"{preset}-{data_term}-o{order}"


def select(entries: list[dict]) -> dict | None:
    """Highest mean Dice among fold-free entries; within 0.001, the lower HD."""
    ok = [e for e in entries if e["summary"]["fold_percent_max"] == 0.0]
    if not ok:
        return None
    top = max(e["summary"]["dice_mean"] for e in ok)
    near = [e for e in ok if e["summary"]["dice_mean"] >= top - 1e-3]
    return min(near, key=lambda e: e["summary"]["hd_mean"])


def evaluate(pairs, preset, data_term, order, lam, theta) -> dict:
    records = []
    for pair in pairs:
        t0 = time.perf_counter()
        d = nt.register(pair.fixed, pair.moving, spacing=pair.spacing, preset=preset,
                        data_term=data_term, order=order, lam=lam, theta=theta)
        seconds = time.perf_counter() - t0
        records.append(dict(evaluate_pair(pair, d), seconds=seconds))
    summary = summarize(records)
    summary["fold_percent_max"] = max(r["fold_percent"] for r in records)
    return {"summary": summary, "dice": [r["dice"] for r in records]}


def run_grid(record: dict, save, k: str, pairs, points) -> list[dict]:
    """Evaluate (λ, θ) points for configuration ``k`` (``preset-term-oN``), cached in record."""
    preset, data_term, order = k.split("-")
    entries = []
    for lam, theta in points:
        name = f"{k}:lam={lam:.4g}:theta={theta:.4g}"
        if name not in record["configs"]:
            result = evaluate(pairs, preset, data_term, int(order[1:]), lam, theta)
            record["configs"][name] = dict(result, lam=lam, theta=theta)
            save()
        entry = record["configs"][name]
        s = entry["summary"]
        print(f"{name}: dice {s['dice_mean']:.4f} hd {s['hd_mean']:.2f} "
              f"fold_max {s['fold_percent_max']:.4f} {s['seconds_mean']:.2f} s", flush=True)
        entries.append(entry)
    return entries


def extension(entries: list[dict]) -> list[tuple[float, float]]:
    """New grid points past the edge on which the best entry lies (none if it is inside)."""
    best = select(entries)
    if best is None:
        return []
    lams = sorted({e["lam"] for e in entries})
    thetas = sorted({e["theta"] for e in entries})
    new_lams = [lams[0] / 3] if best["lam"] == lams[0] else []
    new_lams += [lams[-1] * 3] if best["lam"] == lams[-1] and len(lams) > 1 else []
    new_thetas = [thetas[0] / 3] if best["theta"] == thetas[0] else []
    new_thetas += [thetas[-1] * 3] if best["theta"] == thetas[-1] and len(thetas) > 1 else []

    def near(values, centre):  # within a factor 3 of the best value
        return [v for v in values if max(v / centre, centre / v) < 3.01]

    points = [(lam, t) for lam in new_lams for t in near(thetas, best["theta"]) + new_thetas]
    points += [(lam, t) for lam in near(lams, best["lam"]) for t in new_thetas]
    return points


def main(argv: list[str] | None = None) -> int:
    default_record = Path(__file__).resolve().parent / "records" / "tune_nadmm.json"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True, help="folder holding pairs.csv")
    ap.add_argument("--data-terms", default="l2,l1")
    ap.add_argument("--orders", default="1,2,3")
    ap.add_argument("--presets", default="fast,accurate")
    ap.add_argument("--subset", type=int, default=12, help="tuning pairs used")
    ap.add_argument("--record", default=str(default_record))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = read_pairs(args.data)
    tune, _ = split(rows)
    patients = evenly_spaced(tune, args.subset)
    pairs = [load_pair(args.data, p) for p in patients]
    record_path = Path(args.record)
    record = {"configs": {}, "best": {}}
    if args.resume and record_path.exists():
        record = json.loads(record_path.read_text())
    record["setup"] = {
        "data": str(args.data), "patients": patients,
        "split": "tune (nadmm_torch.data.acdc.split, seed 0)",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "lambda_grid": LAMBDA_GRID, "theta_grid": THETA_GRID,
    }

    def save() -> None:
        # Several processes (e.g. one per data term) may share the record: merge under a lock.
        with open(record_path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if record_path.exists():
                on_disk = json.loads(record_path.read_text())
                for part in ("configs", "best"):
                    record[part] = {**on_disk.get(part, {}), **record[part]}
            tmp = record_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, record_path)

    for data_term in args.data_terms.split(","):
        for order in (int(o) for o in args.orders.split(",")):
            for preset in args.presets.split(","):
                if preset in ("fast", "paper"):
                    grid = [(lam, th) for lam in LAMBDA_GRID[data_term] for th in THETA_GRID]
                else:
                    base = record["best"].get(key("paper", data_term, order))
                    if base is None:
                        print(f"skip {key(preset, data_term, order)}: no paper result yet")
                        continue
                    grid = [(base["lam"] * a, base["theta"]) for a in (1 / 3, 1, 3)]
                k = key(preset, data_term, order)
                entries = run_grid(record, save, k, pairs, grid)
                # A best λ or θ on the edge of the grid: extend the grid past it (×3 per
                # step, at most EXTEND steps per axis), so the optimum is bracketed.
                for _ in range(EXTEND):
                    points = extension(entries)
                    if not points:
                        break
                    entries += run_grid(record, save, k, pairs, points)
                best = select(entries)
                if best is not None:
                    record["best"][key(preset, data_term, order)] = {
                        "lam": best["lam"], "theta": best["theta"],
                        "dice_mean": best["summary"]["dice_mean"],
                        "hd_mean": best["summary"]["hd_mean"],
                    }
                    save()
                    print(f"best {key(preset, data_term, order)}: "
                          f"{record['best'][key(preset, data_term, order)]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
