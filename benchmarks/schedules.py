#!/usr/bin/env python
"""Where the iterations go: Dice and time of solver schedules on an ACDC split.

Usage::

    python benchmarks/schedules.py --split tune --json OUT.json [--data DIR] [--threads 1]
        [--candidates '[{"preset": "fast", "warps": [7, 5, 1], "iterations": [5, 5, 8]}, ...]']

Each candidate is a dict of ``nt.register`` keywords (a preset and any overrides). For every pair
of the split (ES→ED protocol of :mod:`nadmm_torch.data.acdc`) the candidates run in turn (so a
slow phase of a shared machine hits all of them), scored by the protocol's mean Dice and the
fold count; time is the median seconds per pair and its ratio to the first candidate's
(median of per-pair ratios). The default candidates are the ones that chose ``balanced``: the
``fast`` schedule with a finest-level warp of K = 3, 5 or 8 iterations, with fewer coarse warps,
and ``paper`` for reference. Choose on ``--split tune``; report on ``--split report``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import nadmm_torch as nt
from nadmm_torch.data.acdc import LABELS, load_pair, read_acdc_pairs, split

DEFAULT_CANDIDATES = [
    {"preset": "fast"},
    {"preset": "fast", "warps": [7, 5, 1], "iterations": [5, 5, 3]},
    {"preset": "fast", "warps": [7, 5, 1], "iterations": [5, 5, 5]},
    {"preset": "fast", "warps": [7, 5, 1], "iterations": [5, 5, 8]},
    {"preset": "fast", "warps": [7, 5, 2], "iterations": [5, 5, 3]},
    {"preset": "fast", "warps": [5, 3, 1], "iterations": [5, 5, 5]},
    {"preset": "fast", "warps": [7, 3, 1], "iterations": [5, 3, 8]},
    {"preset": "paper"},
]


def name(candidate: dict) -> str:
    return json.dumps(candidate, sort_keys=True)


def run(pairs, candidates: list[dict]) -> dict:
    """Per candidate: per-pair records ``{patient, dice, folded, seconds}``."""
    out: dict[str, list[dict]] = {name(c): [] for c in candidates}
    for c in candidates:  # warm-up
        nt.register(pairs[0].fixed, pairs[0].moving, spacing=pairs[0].spacing, **c)
    for p in pairs:
        for c in candidates:
            t0 = time.perf_counter()
            d = nt.register(p.fixed, p.moving, spacing=p.spacing, **c)
            seconds = time.perf_counter() - t0
            warped = nt.warp_labels(p.moving_labels, d)
            dice = float(np.nanmean(nt.dice(warped, p.fixed_labels, LABELS)[0].numpy()))
            out[name(c)].append(dict(patient=p.patient, dice=dice, seconds=seconds,
                                     folded=float(nt.fold_percent(d)[0]) > 0))
    return out


def summarise(per: dict[str, list[dict]]) -> dict:
    first = next(iter(per.values()))
    return {
        k: dict(
            dice_mean=statistics.fmean(r["dice"] for r in recs),
            seconds_median=statistics.median(r["seconds"] for r in recs),
            time_ratio_to_first=statistics.median(
                r["seconds"] / f["seconds"] for r, f in zip(recs, first)),
            folded_pairs=sum(r["folded"] for r in recs),
        )
        for k, recs in per.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--split", choices=("tune", "report"), required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                          "data" / "acdc"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--candidates", default=None, help="JSON list of register keyword dicts")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    candidates = json.loads(args.candidates) if args.candidates else DEFAULT_CANDIDATES
    tune, report = split(read_acdc_pairs(args.data))
    ids = tune if args.split == "tune" else report
    per = run([load_pair(args.data, p) for p in ids], candidates)
    summary = summarise(per)
    lines = ["| schedule | Dice | s / pair | × first | folded pairs |", "|---|---|---|---|---|"]
    for k, v in summary.items():
        lines.append(f"| `{k}` | {v['dice_mean']:.4f} | {v['seconds_median']:.3f} | "
                     f"{v['time_ratio_to_first']:.2f} | {v['folded_pairs']} |")
    table = "\n".join(lines)
    print(table)
    doc = dict(split=args.split, patients=ids, candidates=candidates, summary=summary,
               pairs=per, table=table, threads=args.threads, torch=torch.__version__,
               date=time.strftime("%Y-%m-%d"))
    Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
