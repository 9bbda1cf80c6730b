#!/usr/bin/env python
"""Peak memory and time of backpropagating through a preset (``--preset``, default ``paper``, the
schedule the recorded figures used; ``fast`` is lighter), with and without gradient
checkpointing.

Usage::

    python benchmarks/memory.py --json OUT.json [--sizes acdc,paper] [--modes off,on]
        [--device cpu|cuda] [--threads 1] [--max-gb 15] [--timeout 300] [--data DIR]
        [--preset paper]

For each (size, checkpoint mode): ``NADMMRegistration(preset, learnable={"lambda", "theta"},
checkpoint=...)`` registers one ACDC pair, the loss ``MSE(warp(moving, d), fixed)`` is
backpropagated (gradients reach λ and θ) and we report the wall time of forward and backward
and the peak memory: CPU = peak resident set size above the level before the run, sampled
every 2 ms in a thread (``benchmarks/speed.py``'s ``PeakRSS``); CUDA =
``torch.cuda.max_memory_allocated`` above the allocation before the run.

Sizes are those of ``benchmarks/speed.py`` (its ``make_size`` is reused): ``acdc`` is the
protocol grid ``(Z, 128, 128)``; ``paper`` is ``96 × 128 × 128`` (the pair resampled to 1.5 mm
along the slice axis and padded / cropped to 96 slices); ``ZxYxX`` any grid.

Before measuring, each run does one forward + backward on a tiny 4 × 32 × 32 grid, because
the first call pages in kernels and libraries (about 0.35 GB of RSS on CPU, in both modes).
On CPU the child runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors leave the RSS
(otherwise glibc's heap keeps them and the peak depends on the history of the process); this
costs some system time, so CPU times here are a little above ``benchmarks/speed.py``'s.
Every configuration runs in a fresh subprocess, so one run's allocator state cannot hide or
inflate the next one's peak. A configuration that exceeds ``--max-gb`` (killed from inside by
the sampling thread) or ``--timeout`` seconds is recorded as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import PeakRSS, load_images, make_size  # noqa: E402  (sibling benchmark module)

import nadmm_torch as nt  # noqa: E402

EXIT_MEMORY = 3  # child exit status when it stopped itself over --max-gb


def _watch_memory(limit_bytes: int, monitor: PeakRSS) -> None:
    """Stop the process (exit status EXIT_MEMORY) once its RSS exceeds the limit: the
    machine is shared, so an over-budget run must not push others into swap / the OOM
    killer."""

    def run() -> None:
        while True:
            if monitor.rss() > limit_bytes:
                os._exit(EXIT_MEMORY)
            time.sleep(0.01)

    threading.Thread(target=run, daemon=True).start()


def measure(args: argparse.Namespace, size: str, checkpoint: bool) -> dict:
    """One forward + backward through ``args.preset``; time and peak memory."""
    device = torch.device(args.device)
    fixed, moving, spacing, source = load_images(args)
    fixed, moving, spacing = make_size(size, fixed, moving, spacing)
    fixed, moving = fixed.to(device), moving.to(device)
    reg = nt.NADMMRegistration(
        args.preset, data_term="l2", order=2, learnable={"lambda", "theta"}, checkpoint=checkpoint
    ).to(device)
    # Warm-up on a tiny grid: the first call pages in kernels and libraries (~0.35 GB of RSS
    # on CPU, the same with or without checkpointing), which is not memory of the solver.
    # Tiny, so that the heap it leaves behind cannot absorb the measured run's allocations.
    small = torch.rand(1, 1, 4, 32, 32, device=device)
    warm = nt.NADMMRegistration(
        args.preset, learnable={"lambda", "theta"}, checkpoint=checkpoint
    ).to(device)
    warm(small, small.roll(1, -1), spacing).pow(2).mean().backward()
    del warm, small
    monitor = PeakRSS()
    if device.type == "cpu":
        _watch_memory(int(args.max_gb * 2**30), monitor)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    with monitor:
        t0 = time.perf_counter()
        d = reg(fixed, moving, spacing)
        loss = (nt.warp(moving, d) - fixed).pow(2).mean()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
    grad_ok = all(
        p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in reg.parameters()
    )
    rec = {
        "size": size,
        "shape": list(fixed.shape[2:]),
        "spacing": list(spacing),
        "checkpoint": checkpoint,
        "device": str(device),
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "total_s": t2 - t0,
        "peak_rss_gb": monitor.used / 2**30,
        "grad_finite": grad_ok,
        "fold_percent": float(nt.fold_percent(d.detach())[0]),
        "source": source,
        "status": "ok",
    }
    if device.type == "cuda":
        rec["peak_cuda_gb"] = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2**30
    return rec


def run_child(args: argparse.Namespace, size: str, checkpoint: bool) -> dict:
    """Run :func:`measure` in a fresh interpreter; a timeout / memory stop becomes a record."""
    cmd = [
        sys.executable, __file__, "--child", "--sizes", size,
        "--modes", "on" if checkpoint else "off", "--device", args.device,
        "--threads", str(args.threads), "--max-gb", str(args.max_gb),
        "--patient", args.patient, "--preset", args.preset,
    ] + (["--data", args.data] if args.data else [])  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.device == "cpu":
        # glibc keeps freed 2-32 MB blocks in its heap once its dynamic mmap threshold has
        # risen, so RSS would record fragmentation, not live tensors (measured at 10x128x128:
        # checkpointed peaks of 0.44 / 0.13 / 0.00 GB for three identical runs in one process).
        # A fixed threshold serves every tensor over 64 KB by mmap, returned to the OS on free.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    skipped = {"size": size, "checkpoint": checkpoint, "device": args.device}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**skipped, "status": f"skipped: over the {args.timeout:.0f} s timeout"}
    if out.returncode == EXIT_MEMORY:
        return {**skipped, "status": f"skipped: peak RSS over {args.max_gb:g} GB"}
    if out.returncode != 0:
        return {**skipped, "status": f"failed (exit {out.returncode}): {out.stderr[-500:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(records: list[dict]) -> str:
    mem_key = "peak_cuda_gb" if any("peak_cuda_gb" in r for r in records) else "peak_rss_gb"
    lines = [
        "| size | checkpoint | forward (s) | backward (s) | total (s) | peak memory (GB) "
        "| status |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in records:
        shape = "×".join(str(v) for v in r.get("shape", [])) or r["size"]
        if r["status"] == "ok":
            lines.append(
                f"| {shape} | {'on' if r['checkpoint'] else 'off'} | {r['forward_s']:.1f} | "
                f"{r['backward_s']:.1f} | {r['total_s']:.1f} | {r[mem_key]:.2f} | ok |"
            )
        else:
            lines.append(
                f"| {shape} | {'on' if r['checkpoint'] else 'off'} | – | – | – | – | "
                f"{r['status']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", help="output JSON (records are merged into it by size and mode)")
    ap.add_argument("--sizes", default="acdc,paper", help="comma list: acdc, paper, ZxYxX")
    ap.add_argument("--modes", default="off,on", help="checkpointing: comma list of off, on")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-gb", type=float, default=15.0, help="CPU: stop a run over this RSS")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    ap.add_argument("--data", default="../shared/data/acdc")
    ap.add_argument("--patient", default="patient001")
    # The recorded figures (README) were run with the paper's schedule (then called "fast").
    ap.add_argument("--preset", default="paper", help="solver preset (default: %(default)s)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [s for s in args.sizes.split(",") if s]
    modes = [m == "on" for m in args.modes.split(",") if m]
    if args.child:  # one configuration, JSON on the last stdout line
        print(json.dumps(measure(args, sizes[0], modes[0])))
        return 0

    records: list[dict] = []
    if args.json and Path(args.json).is_file():  # merge: sizes can be measured one at a time
        records = json.loads(Path(args.json).read_text()).get("records", [])
    for size in sizes:
        for ck in modes:
            rec = run_child(args, size, ck)
            records = [
                r for r in records if (r["size"], r["checkpoint"]) != (size, ck)
            ] + [rec]
            print(table([rec]).splitlines()[-1], flush=True)
            if args.json:
                meta = {
                    "device": args.device,
                    "threads": args.threads,
                    "cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__,
                    "loss": "MSE(warp(moving, d), fixed); learnable λ, θ",
                    "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")
                    if args.device == "cpu" else None,
                }
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print()
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
