#!/usr/bin/env python
"""Figure of a ``benchmarks/acdc.py`` result: Dice per pair, our method against demons.

Usage::

    python benchmarks/plot_acdc.py --json OUT.json [OUT2.json ...] --out FIG.png
        [--ours nadmm-fast-l2-o2] [--against demons] [--data DIR]

Left: a scatter of per-pair mean Dice (x: ``--against``, y: ``--ours``; points above the
diagonal are pairs where ours is better), report-split pairs marked where ``--data`` gives the
split. Right: box plots of per-pair Dice of every method in the file(s).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nadmm_torch.data.acdc import read_acdc_pairs, split  # noqa: E402


def load(paths: list[str]) -> dict[str, dict[str, dict]]:
    """``method -> patient -> record`` over all files (first record of a patient wins)."""
    out: dict[str, dict[str, dict]] = {}
    for p in paths:
        for m, recs in json.loads(Path(p).read_text())["pairs"].items():
            for r in recs:
                out.setdefault(m, {}).setdefault(r["patient"], r)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", required=True, nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ours", default="nadmm-fast-l2-o2")
    ap.add_argument("--against", default="demons")
    ap.add_argument("--data", default=None, help="folder with pairs.csv (marks the report split)")
    args = ap.parse_args(argv)
    recs = load(args.json)
    for m in (args.ours, args.against):
        if m not in recs:
            raise SystemExit(f"method {m!r} not in the JSON; it has {sorted(recs)}")
    common = sorted(set(recs[args.ours]) & set(recs[args.against]))
    report = set(split(read_acdc_pairs(args.data))[1]) if args.data else set()

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.6]})
    for subset, style in (("tune", dict(c="tab:blue", label="tuning split")),
                          ("report", dict(c="tab:red", label="report split"))):
        pts = [p for p in common if (p in report) == (subset == "report")]
        if pts:
            ax.scatter([recs[args.against][p]["dice"] for p in pts],
                       [recs[args.ours][p]["dice"] for p in pts], s=18, alpha=0.8, **style)
    lo = min(min(recs[m][p]["dice"] for p in common) for m in (args.ours, args.against)) - 0.02
    ax.plot([lo, 1], [lo, 1], "k--", lw=0.8)
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1)
    wins = sum(recs[args.ours][p]["dice"] > recs[args.against][p]["dice"] for p in common)
    ax.set_xlabel(f"{args.against}: Dice per pair")
    ax.set_ylabel(f"{args.ours}: Dice per pair")
    ax.set_title(f"{args.ours} better on {wins} of {len(common)} pairs")
    ax.legend(loc="lower right")
    ax.set_aspect("equal")

    methods = [m for m in recs if recs[m]]
    bx.boxplot([[r["dice"] for r in recs[m].values()] for m in methods])
    bx.set_xticks(range(1, len(methods) + 1), methods, rotation=60, ha="right", fontsize=8)
    bx.set_ylabel("Dice per pair (mean of RV, Myo, LV)")
    bx.set_title("ACDC ES→ED, per-pair Dice")
    bx.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(common)} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
