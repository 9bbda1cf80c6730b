#!/usr/bin/env python
"""Cohort throughput (pairs/s) on the CPU: batch 1 / 4 / 16 of the ``fast`` preset on ACDC pairs,
for the solver alone and for ``nadmm-register --pairs`` end to end, eager and compiled.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cohort.py --json benchmarks/records/cohort_cpu.json
        [--data ../shared/data/acdc] [--batches 1,4,16] [--rounds 3] [--cli-rounds 2]
        [--pairs 16] [--no-compile] [--no-cli]

Pairs: the report split of ACDC (:func:`nadmm_torch.data.acdc.split`, 20 patients), ES → ED,
preprocessed by the protocol (1.5 mm in-plane, 128 × 128, ``(Z, 128, 128)``). Batching needs
pairs of one grid and spacing, which the report split barely has (Z is 6–16 slices, spacing 5
or 10 mm: at most 5 pairs share a grid), so two cohorts are timed:

* ``common``: the first ``--pairs`` (16) report pairs, each centre-cropped / zero-padded along
  the slice axis to 10 slices, spacing ``(10, 1.5, 1.5)`` mm for all: a cohort acquired with one
  protocol, where batch 16 is a real batch of 16. Both the solver and the CLI run it.
* ``native``: all 20 report pairs on their own grids (the CLI only): grouping by grid gives
  batches of at most 5, so batch 16 is no bigger than batch 8 would be.

Solver alone: ``nt.register(F[i:i+b], M[i:i+b], spacing=..., preset="fast")`` over the cohort,
``b`` = each batch size, the cohort's wall time per configuration; ``--rounds`` rounds, the
configurations alternating within each round (their order rotated per round), so a machine whose
speed drifts (it is shared) hits every configuration alike; the table gives medians. With
compile, ``compile=True`` per batch size: the first call (compilation included) is timed
separately, then the compiled solver joins the rounds. Every batched displacement is compared
with batch 1's (largest difference, voxels).

CLI: ``nadmm-register --pairs CSV -o OUT --batch-size b --force -q`` in a fresh process (the
wall time includes starting Python and importing torch, reading, warping, metrics and writing
every output), ``--cli-rounds`` rounds alternating the batch sizes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import nadmm_torch as nt
from nadmm_torch.data.acdc import load_pair, read_acdc_pairs, split
from nadmm_torch.io import Geometry, write_image

REPO = Path(__file__).resolve().parents[1]
COMMON_Z = 10
COMMON_SPACING = (10.0, 1.5, 1.5)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="output record")
    p.add_argument("--data", default=None,
                   help="ACDC folder (default: ../shared/data/acdc beside the repository or "
                   "its parent)")
    p.add_argument("--batches", type=_ints, default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=3, help="solver rounds (default 3)")
    p.add_argument("--cli-rounds", type=int, default=2, help="CLI rounds (default 2)")
    p.add_argument("--pairs", type=int, default=16, help="pairs of the common-grid cohort")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--no-cli", action="store_true", help="the solver alone")
    p.add_argument("--preset", default="fast")
    return p.parse_args(argv)


def _fit_z(x: torch.Tensor, z: int) -> torch.Tensor:
    """Centre-crop or zero-pad ``(1, 1, Z, H, W)`` along Z to ``z`` slices."""
    n = x.shape[2]
    if n >= z:
        a = (n - z) // 2
        return x[:, :, a:a + z].contiguous()
    out = x.new_zeros(*x.shape[:2], z, *x.shape[3:])
    a = (z - n) // 2
    out[:, :, a:a + n] = x
    return out


def load_cohorts(data: str, n_common: int, native_too: bool = True):
    """``(native pairs, common-grid pairs)``: the report split's ACDC pairs (``native_too``:
    all of them, else the first ``n_common``)."""
    rows = read_acdc_pairs(data)
    _, report = split(rows)
    native = [load_pair(data, pid) for pid in (report if native_too else report[:n_common])]
    common = []
    for p in native[:n_common]:
        common.append({k: _fit_z(getattr(p, k), COMMON_Z)
                       for k in ("fixed", "moving", "fixed_labels", "moving_labels")}
                      | {"spacing": COMMON_SPACING, "patient": p.patient})
    native = [{k: getattr(p, k) for k in ("fixed", "moving", "fixed_labels", "moving_labels",
                                          "spacing", "patient")} for p in native]
    return native, common


def _solver_run(common: list[dict], b: int, preset: str, compile_: bool):
    """Register the cohort ``b`` pairs per call; returns ``(seconds, displacements)``."""
    F = torch.cat([p["fixed"] for p in common])
    M = torch.cat([p["moving"] for p in common])
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(common), b):
        out.append(nt.register(F[i:i + b], M[i:i + b], spacing=COMMON_SPACING, preset=preset,
                               compile=compile_))
    return time.perf_counter() - t0, torch.cat(out)


def bench_solver(common, batches, rounds, preset, with_compile) -> dict:
    configs = [("eager", b) for b in batches]
    compile_first = {}
    reference = None
    diffs = {}
    _solver_run(common[:1], 1, preset, False)  # warm-up (allocator, FFT plans)
    if with_compile:
        for b in batches:  # the first call per batch size compiles
            t0 = time.perf_counter()
            _solver_run(common[:b], b, preset, True)
            compile_first[b] = time.perf_counter() - t0
            print(f"compile, batch {b}: first call {compile_first[b]:.1f} s", flush=True)
            configs.append(("compiled", b))
    times = {c: [] for c in configs}
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for mode, b in order:
            seconds, d = _solver_run(common, b, preset, mode == "compiled")
            times[(mode, b)].append(seconds)
            if mode == "eager" and b == 1 and reference is None:
                reference = d
            if reference is not None and (mode, b) != ("eager", 1):
                diffs[(mode, b)] = max(diffs.get((mode, b), 0.0),
                                       float((d - reference).abs().max()))
            print(f"solver round {r + 1}: {mode} batch {b}: {seconds:.2f} s", flush=True)
    rows = []
    base = statistics.median(times[("eager", 1)])
    for mode, b in configs:
        med = statistics.median(times[(mode, b)])
        row = {"mode": mode, "batch": b, "pairs": len(common), "times_s": times[(mode, b)],
               "median_s": med, "pairs_per_s": len(common) / med, "speedup_vs_batch1": base / med,
               "max_abs_diff_vs_batch1_eager": diffs.get((mode, b), 0.0)}
        if mode == "compiled":
            eager = statistics.median(times[("eager", b)])
            row["first_call_s"] = compile_first[b]
            row["time_vs_eager"] = med / eager
            saved = (eager - med) / len(common)  # seconds saved per pair
            row["break_even_pairs"] = (compile_first[b] / saved) if saved > 0 else None
        rows.append(row)
    return {"rows": rows}


def write_cohort(folder: Path, pairs: list[dict]) -> Path:
    """NIfTI files and a pairs CSV (with labels) for the CLI."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fixed", "moving", "fixed_labels", "moving_labels", "id"])
        for p in pairs:
            geo = Geometry.default(p["fixed"].shape[2:], p["spacing"])
            names = []
            for k in ("fixed", "moving", "fixed_labels", "moving_labels"):
                name = f"{p['patient']}_{k}.nii.gz"
                write_image(p[k], geo, folder / name)
                names.append(name)
            w.writerow(names + [p["patient"]])
    return folder / "pairs.csv"


def _cli_once(csv_path: Path, out: Path, b: int, preset: str) -> float:
    cmd = [sys.executable, "-m", "nadmm_torch.cli", "--pairs", str(csv_path), "-o", str(out),
           "--batch-size", str(b), "--preset", preset, "--force", "-q", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return seconds


def bench_cli(cohorts: dict[str, list[dict]], batches, rounds, preset, tmp: Path) -> dict:
    csvs = {name: write_cohort(tmp / name, pairs) for name, pairs in cohorts.items()}
    configs = [(name, b) for name in cohorts for b in batches]
    times = {c: [] for c in configs}
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for name, b in order:
            seconds = _cli_once(csvs[name], tmp / f"out_{name}_{b}", b, preset)
            times[(name, b)].append(seconds)
            print(f"CLI round {r + 1}: {name} batch {b}: {seconds:.1f} s", flush=True)
    rows = []
    for name, b in configs:
        n = len(cohorts[name])
        med = statistics.median(times[(name, b)])
        base = statistics.median(times[(name, batches[0])])
        sizes = sorted({json.loads((tmp / f"out_{name}_{b}" / p["patient"] / "summary.json")
                                   .read_text())["metrics"]["batch_size"] for p in cohorts[name]})
        rows.append({"cohort": name, "batch": b, "pairs": n, "times_s": times[(name, b)],
                     "median_s": med, "pairs_per_s": n / med,
                     "speedup_vs_batch1": base / med, "batch_sizes_used": sizes})
    return {"rows": rows}


def markdown(doc: dict) -> str:
    lines = ["| what | cohort | batch | pairs/s | × batch 1 | notes |", "|---|---|---|---|---|---|"]
    for r in doc["solver"]["rows"]:
        note = f"max diff vs batch 1 {r['max_abs_diff_vs_batch1_eager']:.1e} vx"
        if r["mode"] == "compiled":
            be = r["break_even_pairs"]
            note += (f"; first call {r['first_call_s']:.0f} s, {r['time_vs_eager']:.2f}× eager "
                     f"time, pays after {'never' if be is None else f'{be:.0f} pairs'}")
        lines.append(f"| solver, {r['mode']} | common ({r['pairs']}) | {r['batch']} | "
                     f"{r['pairs_per_s']:.2f} | {r['speedup_vs_batch1']:.2f} | {note} |")
    for r in doc.get("cli", {}).get("rows", []):
        lines.append(f"| CLI end to end | {r['cohort']} ({r['pairs']}) | {r['batch']} | "
                     f"{r['pairs_per_s']:.2f} | {r['speedup_vs_batch1']:.2f} | batches of "
                     f"{','.join(map(str, r['batch_sizes_used']))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.data is None:
        found = [d for d in (REPO.parent / "shared" / "data" / "acdc",
                             REPO.parent.parent / "shared" / "data" / "acdc")
                 if (d / "pairs.csv").is_file()]
        if not found:
            print("no ACDC data found; pass --data DIR", file=sys.stderr)
            return 1
        args.data = str(found[0])
    load0 = os.getloadavg()
    native, common = load_cohorts(args.data, args.pairs, native_too=not args.no_cli)
    doc = {
        "what": "cohort throughput, fast preset, ACDC report split (see benchmarks/cohort.py)",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                    "load_average_start": load0,
                    "note": "shared with other jobs: configurations interleaved per round"},
        "common_grid": {"z": COMMON_Z, "spacing": COMMON_SPACING,
                        "patients": [p["patient"] for p in common]},
        "native_shapes": {p["patient"]: [list(p["fixed"].shape[2:]), list(p["spacing"])]
                          for p in native},
        "preset": args.preset,
    }
    doc["solver"] = bench_solver(common, args.batches, args.rounds, args.preset,
                                 not args.no_compile)
    if not args.no_cli:
        with tempfile.TemporaryDirectory(prefix="nadmm-cohort-") as tmp:
            doc["cli"] = bench_cli({"common": common, "native": native}, args.batches,
                                   args.cli_rounds, args.preset, Path(tmp))
    doc["machine"]["load_average_end"] = os.getloadavg()
    table = markdown(doc)
    doc["table"] = table
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
