#!/usr/bin/env python
"""OpenMP wait policy and thread count under competing load: ``fast`` on an ACDC pair.

Usage::

    python benchmarks/threads.py --json OUT.json [--rounds 3] [--load 0,2] [--data DIR]

PyTorch's CPU kernels run in OpenMP parallel regions (libgomp in the PyPI wheels). By default
libgomp's idle threads *spin* before they sleep; while other processes compete for the cores, a
spinning thread waits for a sibling that the scheduler has parked, at every one of the solver's
thousands of small parallel regions. This script times ``nt.register(..., preset="fast")`` in
fresh subprocesses (the policy is read when libgomp loads) for each OpenMP setting × torch
threads (1, 2), with ``--load`` busy-looping competitor processes running (0: the machine as it
is), round-robin over ``--rounds`` so a drifting machine hits every setting alike. The median of
5 calls after a warm-up per subprocess; the table gives the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=100000": {"GOMP_SPINCOUNT": "100000"},
}

CHILD = r"""
import json, statistics, sys, time, torch
import nadmm_torch as nt
from nadmm_torch.data.acdc import load_pair
from nadmm_torch.data.sample import load_sample
data, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
try:
    p = load_pair(data, "patient001")
except Exception:
    p = load_sample()
nt.register(p.fixed, p.moving, spacing=p.spacing)
ts = []
for _ in range(5):
    t0 = time.perf_counter()
    nt.register(p.fixed, p.moving, spacing=p.spacing)
    ts.append(time.perf_counter() - t0)
print(json.dumps(statistics.median(ts)))
"""


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def _time(setting: str, threads: int, data: str) -> float:
    env = {**os.environ, **SETTINGS[setting]}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", CHILD, data, str(threads)], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--load", default="0,2")
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help=f"comma list of OpenMP settings (default all: {', '.join(SETTINGS)})")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                          "data" / "acdc"))
    args = ap.parse_args(argv)
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        ap.error(f"--settings: unknown {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    times: dict[str, list[float]] = {}
    for load in (int(v) for v in args.load.split(",")):
        stop = mp.Event()
        procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(load)]
        for p in procs:
            p.start()
        try:
            for _ in range(args.rounds):
                for setting in args.settings.split(","):
                    for threads in (1, 2):
                        key = f"load {load} | {setting} | {threads} threads"
                        times.setdefault(key, []).append(_time(setting, threads, args.data))
                        print(key, f"{times[key][-1]:.3f} s", flush=True)
        finally:
            stop.set()
            for p in procs:
                p.join()
    lines = ["| competing busy processes | OpenMP setting | torch threads | s / pair (median) |",
             "|---|---|---|---|"]
    summary = {k: statistics.median(v) for k, v in times.items()}
    for k, v in summary.items():
        load, setting, threads = k.split(" | ")
        lines.append(f"| {load.split()[1]} | {setting} | {threads.split()[0]} | {v:.3f} |")
    table = "\n".join(lines)
    print(table)
    Path(args.json).write_text(json.dumps(dict(times=times, summary=summary, table=table,
                                               cpus=os.cpu_count(),
                                               date=time.strftime("%Y-%m-%d")), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
