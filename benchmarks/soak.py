#!/usr/bin/env python
"""Soak test: many small random registrations in one process, watching memory.

Usage::

    python benchmarks/soak.py [--n 1000] [--every 100] [--json OUT.json] [--device cpu|cuda]
        [--seed 0] [--threads N]

Run ``i`` registers a random pair of smooth blobs, 2D (24-48 px) or 3D (4-8 × 16-24 × 16-24),
with a random data term (l2/l1), order (1-3) and preset (fast, or accurate every 10th run);
every 5th run goes through ``NADMMRegistration(learnable=...)`` with a backward pass, so
autograd graphs are built and freed too. Every ``--every`` runs it records the resident set
size (``/proc/self/statm``, MiB) and, on CUDA, the allocated / reserved / peak memory.

Growth is measured from the first checkpoint (after warm-up: allocator pools, lazy imports,
cached DCT matrices) to the last; the report gives it in MiB and MiB per 100 runs. A leak of
one image-sized tensor per run would show as several MiB per 100 runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

import nadmm_torch as nt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import PeakRSS  # noqa: E402  (sibling benchmark module: one RSS reader)


def rss_mib() -> float:
    """Resident set size of this process in MiB."""
    return PeakRSS.rss() / 2**20


def cuda_mib(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return dict(
        cuda_allocated_mib=torch.cuda.memory_allocated(device) / 2**20,
        cuda_reserved_mib=torch.cuda.memory_reserved(device) / 2**20,
        cuda_peak_mib=torch.cuda.max_memory_allocated(device) / 2**20,
    )


def blob_pair(shape: tuple[int, ...], gen: torch.Generator, device: torch.device):
    """Two smooth random images in [0, 1] (box-filtered noise)."""
    pool = torch.nn.functional.avg_pool2d if len(shape) == 2 else torch.nn.functional.avg_pool3d
    out = []
    for _ in range(2):
        x = torch.rand(1, 1, *shape, generator=gen)
        for _ in range(2):
            x = pool(x, 3, stride=1, padding=1, count_include_pad=False)
        out.append(((x - x.min()) / (x.max() - x.min())).to(device))
    return out


def one_run(i: int, rng: random.Random, gen: torch.Generator, device: torch.device) -> dict:
    if rng.random() < 0.5:
        shape: tuple[int, ...] = (rng.randint(24, 48), rng.randint(24, 48))
    else:
        shape = (rng.randint(4, 8), rng.randint(16, 24), rng.randint(16, 24))
    fixed, moving = blob_pair(shape, gen, device)
    data_term = rng.choice(["l2", "l1"])
    order = rng.randint(1, 3)
    preset = "accurate" if i % 10 == 9 else "fast"
    if i % 5 == 4:  # learnable settings and a backward pass: graphs must be freed
        model = nt.NADMMRegistration(preset, data_term=data_term, order=order,
                                     learnable={"lambda", "theta"}).to(device)
        moving = moving.requires_grad_()
        d = model(fixed, moving)
        (d.pow(2).mean() + (nt.warp(moving, d) - fixed).pow(2).mean()).backward()
        d = d.detach()
    else:
        d = nt.register(fixed, moving, preset=preset, data_term=data_term, order=order)
    folds = float(nt.fold_percent(d)[0])
    finite = bool(torch.isfinite(d).all())
    return dict(shape=shape, data_term=data_term, order=order, preset=preset,
                folds=folds, finite=finite)


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (runs, MiB) in MiB per 100 runs (0 with fewer than 2 points)."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="number of registrations")
    ap.add_argument("--every", type=int, default=100, help="memory checkpoint interval (runs)")
    ap.add_argument("--json", default=None, help="output JSON file (default: none)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.every < 1:
        ap.error("--n and --every must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    checkpoints: list[dict] = []
    bad: list[dict] = []
    t0 = time.perf_counter()
    print("| runs | RSS (MiB) | CUDA allocated / reserved (MiB) | elapsed (s) |")
    print("|---|---|---|---|")
    for i in range(args.n):
        rec = one_run(i, rng, gen, device)
        if rec["folds"] > 0 or not rec["finite"]:
            bad.append(dict(run=i, **rec))
        done = i + 1
        if done == 1 or done % args.every == 0 or done == args.n:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            cp = dict(runs=done, rss_mib=rss_mib(), elapsed_s=time.perf_counter() - t0,
                      **cuda_mib(device))
            checkpoints.append(cp)
            cuda = (f"{cp['cuda_allocated_mib']:.1f} / {cp['cuda_reserved_mib']:.1f}"
                    if device.type == "cuda" else "-")
            print(f"| {done} | {cp['rss_mib']:.1f} | {cuda} | {cp['elapsed_s']:.1f} |", flush=True)

    # Growth from the first checkpoint after warm-up (the one at `every` runs, or the first).
    warm = next((c for c in checkpoints if c["runs"] >= min(args.every, args.n)), checkpoints[0])
    last = checkpoints[-1]
    span = max(last["runs"] - warm["runs"], 1)
    growth = dict(
        from_runs=warm["runs"], to_runs=last["runs"],
        rss_mib=last["rss_mib"] - warm["rss_mib"],
        rss_mib_per_100_runs=100 * (last["rss_mib"] - warm["rss_mib"]) / span,
        rss_mib_since_first_run=last["rss_mib"] - checkpoints[0]["rss_mib"],
        rss_max_mib=max(c["rss_mib"] for c in checkpoints),
        # glibc's allocator makes RSS swing by tens of MiB between checkpoints as image sizes
        # vary; a least-squares slope over all post-warm-up checkpoints is the steadier trend.
        rss_slope_mib_per_100_runs=_slope(
            [(c["runs"], c["rss_mib"]) for c in checkpoints if c["runs"] >= warm["runs"]]
        ),
    )
    if device.type == "cuda":
        growth["cuda_allocated_mib"] = last["cuda_allocated_mib"] - warm["cuda_allocated_mib"]
    print()
    print(f"RSS growth from run {warm['runs']} to {last['runs']}: {growth['rss_mib']:+.1f} MiB "
          f"({growth['rss_mib_per_100_runs']:+.2f} MiB per 100 runs); since run 1: "
          f"{growth['rss_mib_since_first_run']:+.1f} MiB; least-squares trend "
          f"{growth['rss_slope_mib_per_100_runs']:+.2f} MiB per 100 runs; max "
          f"{growth['rss_max_mib']:.1f} MiB")
    if device.type == "cuda":
        print(f"CUDA allocated growth: {growth['cuda_allocated_mib']:+.2f} MiB")
    print(f"Runs with folds or non-finite output: {len(bad)}")
    if args.json:
        doc = dict(n=args.n, every=args.every, seed=args.seed, device=str(device),
                   torch=torch.__version__, threads=torch.get_num_threads(),
                   platform=platform.platform(), checkpoints=checkpoints, growth=growth, bad=bad)
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
