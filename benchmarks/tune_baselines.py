#!/usr/bin/env python
"""Grid search of the demons and SyN baselines on the ACDC *tuning* split.

Usage::

    python benchmarks/tune_baselines.py --data DIR [--methods demons,syn]
        [--record benchmarks/records/tune_baselines.json] [--syn-subset 20] [--threads 2]

Grids (ES→ED protocol of :mod:`nadmm_torch.data.acdc`, scored by ``evaluate_pair``):

* demons: field smoothing σ ∈ {0.5, 1.0, 1.5} voxels × iterations per level
  {(15, 10, 5), (30, 20, 10), (60, 40, 20)} (in-plane pyramid 4/2/1), on every tuning pair;
  ``--extended`` adds σ 0.25 and (8, 5, 3) iterations around the best corner of that grid
  (and, for SyN, step 0.5 and doubled iterations past its best corner);
* SyN (SyNOnly, mean squares): gradient step ∈ {0.1, 0.25} × iterations
  {(50, 35, 25, 10), (100, 70, 50, 20)}, on ``--syn-subset`` tuning pairs (every k-th of the
  sorted tuning IDs, k = len / subset) because SyN costs 10–30 s a pair on 2 cores.

The record (written after every configuration, so a run can be interrupted and resumed with
``--resume``) holds, per configuration, the summary and per-pair Dice; ``best`` holds the
configuration with the highest mean Dice per method. The report split is never touched.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nadmm_torch.baselines import available, demons_register, syn_register
from nadmm_torch.data.acdc import (
    evaluate_pair,
    evenly_spaced,
    load_pair,
    read_acdc_pairs,
    split,
    summarize,
)

DEMONS_GRID = [
    {"sigma": s, "iterations": list(it)}
    for s, it in itertools.product((0.5, 1.0, 1.5), ((15, 10, 5), (30, 20, 10), (60, 40, 20)))
]
# --extended: the grid's best corner (least smoothing, fewest iterations) pushed further.
DEMONS_GRID_EXTENDED = [
    {"sigma": 0.25, "iterations": [15, 10, 5]},
    {"sigma": 0.25, "iterations": [8, 5, 3]},
    {"sigma": 0.5, "iterations": [8, 5, 3]},
]
# --extended: SyN's best corner (largest step, most iterations) pushed further.
SYN_GRID_EXTENDED = [
    {"grad_step": 0.5, "iterations": [100, 70, 50, 20]},
    {"grad_step": 0.25, "iterations": [200, 140, 100, 40]},
]
SYN_GRID = [
    {"grad_step": g, "iterations": list(it)}
    for g, it in itertools.product((0.1, 0.25), ((50, 35, 25, 10), (100, 70, 50, 20)))
]


def config_key(method: str, cfg: dict) -> str:
    return method + ":" + json.dumps(cfg, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True, help="folder holding pairs.csv")
    ap.add_argument("--methods", default="demons,syn")
    default_record = Path(__file__).parent / "records" / "tune_baselines.json"
    ap.add_argument("--record", default=str(default_record))
    ap.add_argument("--demons-subset", type=int, default=None, help="tuning pairs for demons")
    ap.add_argument("--syn-subset", type=int, default=20, help="tuning pairs for SyN")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--resume", action="store_true", help="skip configurations in the record")
    ap.add_argument(
        "--extended", action="store_true", help="add the *_GRID_EXTENDED configurations"
    )
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    have = available(methods)
    methods = [m for m in methods if have[m] or print(f"skipping {m}: not importable")]
    rows = read_acdc_pairs(args.data)
    tune, _report = split(rows)
    pair_ids = {
        "demons": evenly_spaced(tune, args.demons_subset),
        "syn": evenly_spaced(tune, args.syn_subset),
    }
    record_path = Path(args.record)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record = {"configs": {}, "best": {}}
    if args.resume and record_path.is_file():
        record = json.loads(record_path.read_text())
    record["setup"] = {
        "data": str(args.data),
        "split": "tune (nadmm_torch.data.acdc.split, seed 0)",
        "pairs": {m: pair_ids[m] for m in methods},
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "note": "seconds are wall time on a shared machine (other jobs running)",
    }
    cache = {}

    def pair(pid):
        if pid not in cache:
            cache[pid] = load_pair(args.data, pid)
        return cache[pid]

    def write():
        best = {}
        for entry in record["configs"].values():
            m = entry["method"]
            if m not in best or entry["summary"]["dice_mean"] > best[m]["summary"]["dice_mean"]:
                best[m] = {"config": entry["config"], "summary": entry["summary"]}
        record["best"] = best
        tmp = record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(record_path)

    for m in methods:
        grid = DEMONS_GRID if m == "demons" else SYN_GRID
        if args.extended:
            grid = grid + (DEMONS_GRID_EXTENDED if m == "demons" else SYN_GRID_EXTENDED)
        for cfg in grid:
            key = config_key(m, cfg)
            if key in record["configs"]:
                continue
            recs = []
            for pid in tqdm(pair_ids[m], desc=key, unit="pair", leave=False):
                p = pair(pid)
                t0 = time.perf_counter()
                if m == "demons":
                    d = demons_register(
                        p.fixed, p.moving, p.spacing, iterations=cfg["iterations"],
                        sigma=cfg["sigma"],
                    )  # fmt: skip
                else:
                    d = syn_register(
                        p.fixed, p.moving, p.spacing, iterations=cfg["iterations"],
                        grad_step=cfg["grad_step"], threads=args.threads,
                    )  # fmt: skip
                seconds = time.perf_counter() - t0
                r = {"patient": pid, **evaluate_pair(p, d), "seconds": seconds}
                recs.append(r)
            s = summarize(recs)
            record["configs"][key] = {
                "method": m,
                "config": cfg,
                "summary": s,
                "pairs": [{k: r[k] for k in ("patient", "dice", "hd", "fold_percent", "seconds")}
                          for r in recs],
            }  # fmt: skip
            print(
                f"{key}: Dice {s['dice_mean']:.4f} ± {s['dice_sd']:.4f}, HD {s['hd_mean']:.2f}, "
                f"fold {s['fold_percent_mean']:.4f} %, {s['seconds_mean']:.2f} s/pair "
                f"({s['n_pairs']} pairs)",
                flush=True,
            )
            write()
    write()
    print("\nbest on the tuning split:")
    for m, b in record["best"].items():
        s = b["summary"]
        print(
            f"  {m}: {json.dumps(b['config'])}  Dice {s['dice_mean']:.4f} ± {s['dice_sd']:.4f}"
            f"  HD {s['hd_mean']:.2f}  {s['seconds_mean']:.2f} s/pair ({s['n_pairs']} pairs)"
        )
    print(f"wrote {record_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
