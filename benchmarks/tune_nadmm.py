#!/usr/bin/env python
"""Grid search of λ and θ per (preset, data term, order) on the ACDC *tuning* split.

Usage::

    python benchmarks/tune_nadmm.py --data DIR [--data-terms l2,l1] [--orders 1,2,3]
        [--presets fast,accurate] [--subset 12] [--record benchmarks/records/tune_nadmm.json]
        [--resume] [--per-level [--per-level-subset 60]]

Search (ES→ED protocol of :mod:`nadmm_torch.data.acdc`, scored by mean Dice of
``evaluate_pair``; ties within 0.001 go to the lower mean Hausdorff distance):

* ``fast`` and ``paper``: λ × θ on a log grid (:data:`LAMBDA_GRID` per data term ×
  :data:`THETA_GRID`), extended by ×3 steps past an edge where the best setting lies on it;
* ``accurate``: λ × {1/3, 1, 3} around the best ``paper`` setting of the same data term and
  order, at its θ (extended like ``fast``; the tolerance-stopped solver is ~3× dearer).
  (``paper`` entries were tuned as ``fast`` before ``fast`` got its own schedule.)

``--per-level`` (after the grid, for each configuration that has a ``best``): a coordinate search
of one λ and one θ multiplier per pyramid level that has warps, starting from the grid's best
(all multipliers 1): each multiplier in turn is tried ×3 and ×1/3 and taken where it raises the
mean Dice by more than :data:`PER_LEVEL_MIN_GAIN`, until no move helps; then the same with ×√3,
×1/√3. On ``--per-level-subset`` tuning pairs (default: all 60, a larger set than the grid's, as
four more parameters are fitted). Result per configuration in ``best_per_level``: per-level
``lam``/``theta`` tuples, and the Dice of the start and of the result on those pairs.

Configurations with any folded voxel are not eligible. Pairs: ``--subset`` tuning patients
spread evenly over the sorted tuning IDs (the report split is never touched). The record is
written after every configuration (processes may share it, e.g. one per data term);
``--resume`` skips those already in it. ``best`` holds the
selected (λ, θ) per ``preset-data_term-o{order}``; ``nadmm_torch/config.py`` copies them.
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
    read_acdc_pairs,
    split,
    summarize,
)

LAMBDA_GRID = {"l2": (0.3, 1.0, 3.0), "l1": (0.01, 0.03, 0.1)}
THETA_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
EXTEND = 3
PER_LEVEL_STEPS = (3.0, 3.0**0.5)
PER_LEVEL_MIN_GAIN = 5e-4


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


def per_level_search(record: dict, save, k: str, pairs, lam: float, theta: float) -> dict:
    """Coordinate search of per-level λ/θ multipliers around ``(lam, theta)``; see the doc."""
    preset, data_term, order = k.split("-")
    cfg = nt.preset_config(preset, data_term, int(order[1:]))
    active = [lv for lv, w in enumerate(cfg.warps) if w > 0]

    def values(base: float, mult: dict) -> tuple[float, ...]:
        # a level without warps is never solved: it takes the next coarser active one's value
        out, last = [], 1.0
        for lv in range(cfg.levels):
            last = mult.get(lv, last)
            out.append(base * last)
        return tuple(out)

    def score(m: tuple[float, ...]) -> dict:
        lam_m, theta_m = dict(zip(active, m[: len(active)])), dict(zip(active, m[len(active):]))
        lams, thetas = values(lam, lam_m), values(theta, theta_m)
        name = (f"{k}:per-level:lam={','.join(f'{v:.4g}' for v in lams)}:"
                f"theta={','.join(f'{v:.4g}' for v in thetas)}:pairs={len(pairs)}")
        return cached_evaluate(record, save, name, pairs, k, lams, thetas)

    def value(entry: dict) -> float:
        s = entry["summary"]
        return s["dice_mean"] if s["fold_percent_max"] == 0.0 else -1.0

    best = tuple(1.0 for _ in range(2 * len(active)))
    start = score(best)
    for step in PER_LEVEL_STEPS:
        improved = True
        while improved:
            improved = False
            for i in range(len(best)):
                for f in (step, 1.0 / step):
                    m = tuple(round(x * f, 6) if j == i else x for j, x in enumerate(best))
                    if value(score(m)) > value(score(best)) + PER_LEVEL_MIN_GAIN:
                        best, improved = m, True
    entry = score(best)
    return {"lam": entry["lam"], "theta": entry["theta"], "multipliers": best,
            "levels": active, "pairs": len(pairs),
            "dice_mean": entry["summary"]["dice_mean"], "hd_mean": entry["summary"]["hd_mean"],
            "start_dice_mean": start["summary"]["dice_mean"],
            "start_hd_mean": start["summary"]["hd_mean"]}


def run_grid(record: dict, save, k: str, pairs, points) -> list[dict]:
    """Evaluate (λ, θ) points for configuration ``k`` (``preset-term-oN``), cached in record."""
    return [
        cached_evaluate(record, save, f"{k}:lam={lam:.4g}:theta={theta:.4g}", pairs, k, lam, theta)
        for lam, theta in points
    ]


def cached_evaluate(record: dict, save, name: str, pairs, k: str, lam, theta) -> dict:
    """The record's entry ``name`` for configuration ``k`` at (λ, θ), evaluated (and saved) if
    it is not there yet."""
    if name not in record["configs"]:
        preset, data_term, order = k.split("-")
        result = evaluate(pairs, preset, data_term, int(order[1:]), lam, theta)
        record["configs"][name] = dict(result, lam=lam, theta=theta)
        save()
    entry = record["configs"][name]
    s = entry["summary"]
    print(f"{name}: dice {s['dice_mean']:.4f} hd {s['hd_mean']:.2f} "
          f"fold_max {s['fold_percent_max']:.4f}", flush=True)
    return entry


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
    ap.add_argument("--per-level", action="store_true",
                    help="after the grid: per-level λ/θ search (see above)")
    ap.add_argument("--per-level-subset", type=int, default=60)
    ap.add_argument("--skip-grid", action="store_true",
                    help="with --per-level and --resume: start from the recorded grid bests")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = read_acdc_pairs(args.data)
    tune, _ = split(rows)
    patients = evenly_spaced(tune, args.subset)
    pairs = [load_pair(args.data, p) for p in patients]
    record_path = Path(args.record)
    record = {"configs": {}, "best": {}, "best_per_level": {}}
    if args.resume and record_path.exists():
        record = json.loads(record_path.read_text())
        record.setdefault("best_per_level", {})
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
                for part in ("configs", "best", "best_per_level"):
                    record[part] = {**on_disk.get(part, {}), **record[part]}
            tmp = record_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, record_path)

    for data_term in args.data_terms.split(","):
        for order in (int(o) for o in args.orders.split(",")):
            for preset in args.presets.split(","):
                if args.skip_grid:
                    continue
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
    if args.per_level:
        level_pairs = [load_pair(args.data, p) for p in evenly_spaced(tune, args.per_level_subset)]
        for data_term in args.data_terms.split(","):
            for order in (int(o) for o in args.orders.split(",")):
                for preset in args.presets.split(","):
                    k = key(preset, data_term, order)
                    if k not in record["best"]:
                        print(f"skip per-level {k}: no grid result")
                        continue
                    base = record["best"][k]
                    record["best_per_level"][k] = per_level_search(
                        record, save, k, level_pairs, base["lam"], base["theta"])
                    save()
                    print(f"best per level {k}: {record['best_per_level'][k]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
