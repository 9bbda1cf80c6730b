#!/usr/bin/env python
"""Folding guarantee, measured: voxels with det J ≤ 0 over ACDC pairs × settings.

Usage::

    python benchmarks/folding.py [--data DIR] [--json OUT.json] [--max-pairs N]
        [--presets fast,accurate] [--data-terms l2,l1] [--orders 1,2,3]
        [--lam-factors 1,0.1,10] [--device cpu|cuda] [--threads N] [--shard I/N]
    python benchmarks/folding.py --merge PART1.json PART2.json ... --json OUT.json

For every ES→ED pair of ``--data`` (the protocol of :mod:`nadmm_torch.data.acdc`) and every
(preset, data term, order, λ factor), registers with λ = factor × the preset's tuned λ and
counts the voxels with ``det(I + ∇d) ≤ 0`` (:func:`nadmm_torch.jacobian_determinant`, central
differences, the same code as the ACDC evaluation's fold percentage). Prints a markdown table
(one row per setting: pairs, folded voxels, pairs with a fold, smallest det J, mean Dice,
mean time) and writes every record and the table to ``--json`` (rewritten after each pair, so
an interrupted run keeps what it finished).

``--shard I/N`` runs every N-th pair starting at the I-th (0-based), so N processes can split
the pairs; ``--merge`` joins their JSON files (records concatenated, table recomputed).

Exit status: 0 when no voxel folded anywhere, 1 otherwise (so CI can run a slice of it).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import nadmm_torch as nt
from nadmm_torch.data.acdc import evaluate_pair, load_pair, read_acdc_pairs

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "acdc"


def _csv(kind):
    def parse(s: str) -> tuple:
        try:
            return tuple(kind(v) for v in s.split(",") if v.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {kind.__name__}: {s!r}"
            ) from e

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder with pairs.csv (ACDC)")
    ap.add_argument("--json", default=None, help="output JSON file (default: none)")
    ap.add_argument("--max-pairs", type=int, default=None, help="first N pairs (default: all)")
    ap.add_argument("--presets", type=_csv(str), default=("fast", "accurate"))
    ap.add_argument("--data-terms", type=_csv(str), default=("l2", "l1"))
    ap.add_argument("--orders", type=_csv(int), default=(1, 2, 3))
    ap.add_argument("--lam-factors", type=_csv(float), default=(1.0, 0.1, 10.0),
                    help="multiples of the preset's tuned λ")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--shard", default=None, help="I/N: every N-th pair from the I-th (0-based)")
    ap.add_argument("--merge", nargs="+", default=None, help="JSON files of shards to join")
    args = ap.parse_args(argv)
    if args.shard is not None:
        try:
            i, n = (int(v) for v in args.shard.split("/"))
        except ValueError:
            ap.error(f"--shard: expected I/N, got {args.shard!r}")
        if not 0 <= i < n:
            ap.error(f"--shard: expected 0 <= I < N, got {args.shard!r}")
        args.shard = (i, n)
    for p in args.presets:
        if p not in nt.PRESETS:
            ap.error(f"--presets: unknown preset {p!r}; expected some of {sorted(nt.PRESETS)}")
    for t in args.data_terms:
        if t not in ("l2", "l1"):
            ap.error(f"--data-terms: unknown data term {t!r}; expected l2 and/or l1")
    if any(o < 1 for o in args.orders):
        ap.error(f"--orders: expected integers >= 1, got {args.orders}")
    if any(not (f > 0 and math.isfinite(f)) for f in args.lam_factors):
        ap.error(f"--lam-factors: expected positive finite numbers, got {args.lam_factors}")
    return args


def settings_grid(args: argparse.Namespace) -> list[dict]:
    """One dict per (preset, data term, order, λ factor), with the λ actually used."""
    out = []
    for preset in args.presets:
        for data_term in args.data_terms:
            for order in args.orders:
                cfg = nt.preset_config(preset, data_term, order)
                for factor in args.lam_factors:
                    out.append(dict(preset=preset, data_term=data_term, order=order,
                                    lam_factor=factor, lam=cfg.scaled("lam", factor)))
    return out


def measure(pair, setting: dict, device: torch.device) -> dict:
    """Register one pair with one setting; count folds."""
    fixed, moving = pair.fixed.to(device), pair.moving.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    d = nt.register(fixed, moving, spacing=pair.spacing, preset=setting["preset"],
                    data_term=setting["data_term"], order=setting["order"], lam=setting["lam"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    det = nt.jacobian_determinant(d)
    rec = dict(
        patient=pair.patient,
        **setting,
        voxels=int(det.numel()),
        folds=int((det <= 0).sum()),
        min_det=float(det.min()),
        time_s=elapsed,
    )
    ev = evaluate_pair(pair, d.cpu())
    rec["dice"] = ev["dice"]
    rec["fold_percent"] = ev["fold_percent"]  # the evaluation's own count, as a cross-check
    return rec


def summarize(records: list[dict]) -> list[dict]:
    keys = ("preset", "data_term", "order", "lam_factor")
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    rows = []
    for key, rs in groups.items():
        rows.append(dict(
            zip(keys, key),
            lam=rs[0]["lam"],
            pairs=len(rs),
            voxels=sum(r["voxels"] for r in rs),
            folds=sum(r["folds"] for r in rs),
            pairs_with_folds=sum(r["folds"] > 0 for r in rs),
            min_det=min(r["min_det"] for r in rs),
            dice=sum(r["dice"] for r in rs) / len(rs),
            time_s=sum(r["time_s"] for r in rs) / len(rs),
        ))
    return rows


def _levels(value) -> str:
    """A λ for the table: one number, or one per pyramid level (coarse → fine) joined by /."""
    if isinstance(value, (list, tuple)):
        return "/".join(format(v, ".3g") for v in value)
    return format(value, "g")


def markdown_table(rows: list[dict]) -> str:
    head = ("| preset | data term | order | λ factor | λ | pairs | voxels with det J ≤ 0 | "
            "pairs with folds | min det J | mean Dice | mean time (s) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['data_term']} | {r['order']} | {r['lam_factor']:g} | "
            f"{_levels(r['lam'])} | {r['pairs']} | {r['folds']} | {r['pairs_with_folds']} | "
            f"{r['min_det']:.3g} | {r['dice']:.3f} | {r['time_s']:.2f} |"
        )
    total = sum(r["folds"] for r in rows)
    runs = sum(r["pairs"] for r in rows)
    lines.append("")
    lines.append(f"Total: {total} folded voxels in {runs} registrations.")
    return "\n".join(lines)


def write_doc(path: str | Path, meta: dict, records: list[dict]) -> None:
    """The JSON document: ``meta``, every record, the summary rows and the table (atomic)."""
    rows = summarize(records)
    doc = dict(meta, records=records, summary=rows,
               total_folds=sum(r["folds"] for r in records), table=markdown_table(rows))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")  # atomic: never a half-written JSON
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)


def merge(paths: list[str], out: str | None) -> int:
    """Join shard JSON files: records concatenated (in file order), table recomputed."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    records = [r for d in docs for r in d["records"]]
    print(markdown_table(summarize(records)))
    if out:
        meta = {k: v for k, v in docs[0].items()
                if k not in ("records", "summary", "total_folds", "table")}
        meta["patients"] = [p for d in docs for p in d.get("patients", [])]
        meta["merged_from"] = [str(p) for p in paths]
        write_doc(out, meta, records)
    return 1 if any(r["folds"] for r in records) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows_csv = read_acdc_pairs(args.data)
    patients = [r["patient"] for r in rows_csv][: args.max_pairs]
    if args.shard is not None:
        patients = patients[args.shard[0]::args.shard[1]]
    grid = settings_grid(args)
    records: list[dict] = []
    meta = dict(
        data=str(args.data), device=str(device), torch=torch.__version__,
        threads=torch.get_num_threads(), platform=platform.platform(),
        settings=[dict(s) for s in grid], patients=patients,
    )

    for i, pid in enumerate(patients):
        pair = load_pair(args.data, pid)
        for setting in grid:
            rec = measure(pair, setting, device)
            records.append(rec)
            if rec["folds"]:
                print(f"FOLD: {pid} {setting}: {rec['folds']} voxels, min det {rec['min_det']:.4f}",
                      file=sys.stderr)
        print(f"[{i + 1}/{len(patients)}] {pid}: {sum(r['folds'] for r in records)} folds so far",
              file=sys.stderr)
        if args.json:
            write_doc(args.json, meta, records)
    print(markdown_table(summarize(records)))
    return 1 if any(r["folds"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
