#!/usr/bin/env python
"""Speed and memory of the solver against SimpleITK demons, on real ACDC volumes.

Usage::

    python benchmarks/speed.py --json OUT.json [--device cpu|cuda] [--sizes acdc,paper]
        [--batch 1,4,16] [--presets fast,paper,accurate] [--repeats 5] [--threads N]
        [--data DIR] [--patient patient001] [--no-demons] [--compile [MODE]] [--interleave N]
    python benchmarks/speed.py --dice-time N --presets fast,paper,accurate --json OUT.json
        [--figure docs/dice_time.png] [--threads 2]

Sizes: ``acdc`` is the ACDC protocol grid ``(Z, 128, 128)`` (spacing ``(s_z, 1.5, 1.5)``);
``paper`` is the paper's ``96 × 128 × 128`` grid: the same pair resampled to 1.5 mm isotropic
(linear along the slice axis) and zero-padded / cropped to 96 slices. An explicit
``ZxYxX`` size resamples the pair to that grid. With ``--data`` absent (or not holding the
patient), the bundled sample (patient037) is used.

For each (size, preset, batch): the median wall time of ``--repeats`` runs after one warm-up
(``torch.cuda.synchronize`` on GPU), per pair (``time / batch``), pairs per second, and the
peak memory (CUDA: ``max_memory_allocated``; CPU: peak resident set size above the level
before the run, sampled every 2 ms). SimpleITK diffeomorphic demons at its tuned settings
(σ 0.5, iterations (15, 10, 5)) runs on the CPU in the same process, batch 1, timed before
and after the NADMM runs (the median of both sets, so a drifting machine biases neither).

**Floor estimate** (fast preset, per size and batch): the time the solver could not beat on this
device given its work: per ADMM iteration one forward and one inverse spectral transform of the
``(B, ndim, *S)`` field (timed here alone) plus ``BYTES_PER_ITER`` field-sized float reads /
writes for the v-, b- and momentum updates; per warp ``BYTES_PER_WARP`` field-sized transfers
(warp, gradient, composition, safeguard), at the bandwidth of a large ``copy_`` measured here.
The table gives our time as a multiple of that floor.

``--interleave N`` (CPU) also times ``fast`` (batch 1) and demons alternately, N rounds each, and
reports the ratio of their medians (JSON ``interleaved``): this VM drifts by ±20 % between runs,
and alternation puts both methods in the same phase of it.

``--compile [MODE]`` adds, for every (size, preset, batch), a row timed with
``register(..., compile=MODE)`` (``torch.compile``; ``reduce-overhead`` replays CUDA graphs on a
GPU): its first call (compilation included) is reported as ``compile_seconds`` and the largest
difference of its displacement from the eager one as ``max_abs_diff_vs_eager`` (voxels).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nadmm_torch as nt
from nadmm_torch.config import preset_config
from nadmm_torch.ops.fourier import forward_transform, inverse_transform
from nadmm_torch.ops.solver import pyramid_factors

# Field-sized (B, ndim, *S) float tensors read or written, counted from ops/admm.py and
# ops/solver.py: per ADMM iteration (w, v-step with g/c/s, rhs, u-step in/out, b, residual,
# momentum on u and b) and per warp (warp read/write, gradient, composition, det J check).
BYTES_PER_ITER = 14
BYTES_PER_WARP = 12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakRSS:
    """Peak resident set size (bytes) above the level at entry, sampled in a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def used(self) -> int:
        return self.peak - self.base


def load_images(args) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...], str]:
    """(fixed, moving) ``(1, 1, Z, 128, 128)``, spacing, source name."""
    if args.data and (Path(args.data) / "pairs.csv").is_file():
        from nadmm_torch.data.acdc import load_pair

        pair = load_pair(args.data, args.patient)
        return pair.fixed, pair.moving, pair.spacing, f"{args.data}:{pair.patient}"
    from nadmm_torch.data.sample import load_sample

    s = load_sample()
    return s.fixed, s.moving, s.spacing, f"bundled sample ({s.patient})"


def resample_to(x: torch.Tensor, spacing, size: tuple[int, int, int]):
    """Resample along the slice axis to 1.5 mm (linear), then pad / crop every axis to size."""
    z, y, w = x.shape[2:]
    new_z = max(1, round(z * spacing[0] / 1.5))
    x = F.interpolate(x, size=(new_z, y, w), mode="trilinear", align_corners=False)
    out = x.new_zeros(1, 1, *size)
    src = [slice(max(0, (n - m) // 2), max(0, (n - m) // 2) + min(n, m))
           for n, m in zip(x.shape[2:], size)]
    dst = [slice(max(0, (m - n) // 2), max(0, (m - n) // 2) + min(n, m))
           for n, m in zip(x.shape[2:], size)]
    out[(slice(None), slice(None), *dst)] = x[(slice(None), slice(None), *src)]
    return out, (1.5, spacing[1], spacing[2])


def make_size(name: str, fixed, moving, spacing):
    if name == "acdc":
        return fixed, moving, spacing
    size = (96, 128, 128) if name == "paper" else tuple(int(v) for v in name.split("x"))
    f, sp = resample_to(fixed, spacing, size)
    m, _ = resample_to(moving, spacing, size)
    return f, m, sp


def time_call(fn, device, repeats: int) -> tuple[float, list[float], int]:
    """Median seconds after one warm-up, all times, peak memory (bytes)."""
    fn()
    _sync(device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with PeakRSS() as rss:
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else rss.used
    return statistics.median(times), times, int(peak)


def bandwidth(device: torch.device, mbytes: int = 256) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = mbytes * 2**20 // 4
    x = torch.empty(n, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def transform_time(shape, device, boundary: str, repeats: int = 5) -> float:
    """Seconds of one forward + inverse spectral transform of a field of ``shape``."""
    x = torch.randn(shape, device=device)

    def run():
        return inverse_transform(forward_transform(x, boundary), shape[2:], boundary)

    run()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def floor_estimate(shape, spacing, batch: int, device, bw: float) -> dict:
    """Floor of the fast preset (seconds per call of ``batch`` pairs); see the module doc."""
    cfg = preset_config("fast")
    ndim = len(shape)
    total = 0.0
    transforms = 0.0
    for level, fac in enumerate(pyramid_factors(shape, spacing, cfg.levels)):
        size = tuple(max(1, round(n / f)) for n, f in zip(shape, fac))
        field = (batch, ndim, *size)
        nbytes = 4 * batch * ndim * int(torch.tensor(size).prod())
        t_tr = transform_time(field, device, cfg.boundary)
        k, w = cfg.iterations[level], cfg.warps[level]
        transforms += w * k * t_tr
        total += w * (k * (t_tr + BYTES_PER_ITER * nbytes / bw) + BYTES_PER_WARP * nbytes / bw)
    return {"seconds": total, "transform_seconds": transforms}


def demons_available() -> bool:
    from nadmm_torch.baselines import available

    return available(["demons"])["demons"]


def time_demons(fixed, moving, spacing, repeats: int) -> tuple[list[float], int]:
    """Times (s) of SimpleITK demons at its tuned settings on one pair, and peak memory."""
    from nadmm_torch.baselines import demons_register

    _, times, mem = time_call(lambda: demons_register(fixed, moving, spacing),
                              torch.device("cpu"), max(1, min(repeats, 3)))
    return times, mem


def interleaved(fixed, moving, spacing, size_name: str, rounds: int) -> dict:
    """``fast`` (l2, order 2, batch 1) and demons timed alternately on the CPU, ``rounds`` each
    after one warm-up: a slow phase of the machine hits both, so their ratio is steadier than
    that of two separate blocks of runs."""
    from nadmm_torch.baselines import demons_register

    def ours():
        return nt.register(fixed, moving, spacing=spacing, preset="fast")

    def demons():
        return demons_register(fixed, moving, spacing)

    times: dict[str, list[float]] = {"fast": [], "demons": []}
    ours(), demons()
    for _ in range(rounds):
        for name, fn in (("fast", ours), ("demons", demons)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    fast_s, demons_s = statistics.median(times["fast"]), statistics.median(times["demons"])
    return dict(size=size_name, rounds=rounds, fast_seconds=fast_s, demons_seconds=demons_s,
                ratio=fast_s / demons_s, times=times)


def dice_time(data: str, presets: list[str], n_pairs: int) -> dict:
    """Dice and time of each preset (l2, order 2) and of demons on ``n_pairs`` report-split ACDC
    pairs, run interleaved: for each pair the methods in turn, so a slow phase of the machine
    hits all of them (one warm-up call each first). Time ratios are per pair against demons,
    then the median over pairs."""
    from nadmm_torch.baselines import demons_register
    from nadmm_torch.data.acdc import (
        evaluate_pair,
        evenly_spaced,
        load_pair,
        read_acdc_pairs,
        split,
    )

    ids = evenly_spaced(split(read_acdc_pairs(data))[1], n_pairs)
    pairs = [load_pair(data, p) for p in ids]
    methods = {f"nadmm-{p}-l2-o2": (lambda q, p=p: nt.register(q.fixed, q.moving,
                                                            spacing=q.spacing, preset=p))
               for p in presets}
    methods["demons"] = lambda q: demons_register(q.fixed, q.moving, q.spacing)
    for fn in methods.values():
        fn(pairs[0])
    per: dict[str, list[dict]] = {m: [] for m in methods}
    for q in pairs:
        for name, fn in methods.items():
            t0 = time.perf_counter()
            d = fn(q)
            seconds = time.perf_counter() - t0
            per[name].append(dict(patient=q.patient, seconds=seconds, **evaluate_pair(q, d)))
    summary = {}
    for name, recs in per.items():
        ratios = [r["seconds"] / dm["seconds"] for r, dm in zip(recs, per["demons"])]
        summary[name] = dict(
            dice_mean=statistics.fmean(r["dice"] for r in recs),
            seconds_median=statistics.median(r["seconds"] for r in recs),
            demons_ratio=statistics.median(ratios),
            folded_pairs=sum(r["fold_percent"] > 0 for r in recs),
        )
    return dict(patients=ids, summary=summary, pairs=per)


def dice_time_figure(result: dict, path: str) -> None:
    """Dice against time (× demons) of the presets and demons, one point each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
    rows = sorted(result["summary"].items(), key=lambda kv: kv[1]["demons_ratio"])
    ours = [(k, v) for k, v in rows if k.startswith("nadmm")]
    ax.plot([v["demons_ratio"] for _, v in ours], [v["dice_mean"] for _, v in ours], "o-",
            color="C0", label="nadmm-torch presets (l2, order 2)")
    demons = result["summary"]["demons"]
    ax.plot([demons["demons_ratio"]], [demons["dice_mean"]], "s", color="C3",
            label="SimpleITK demons (tuned)")
    for k, v in ours:
        ax.annotate(k.split("-")[1], (v["demons_ratio"], v["dice_mean"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.25, 0.5, 1, 2, 4, 8]))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("time per pair, × demons' (median over pairs, interleaved)")
    ax.set_ylabel("mean Dice (RV, Myo, LV)")
    ax.set_title(f"ACDC report split, {len(result['patients'])} pairs, CPU", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default="acdc,paper")
    ap.add_argument("--batch", default=None, help="default: 1,4,16 on cuda, 1,4 on cpu")
    ap.add_argument("--presets", default="fast,paper,accurate")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                          "data" / "acdc"))
    ap.add_argument("--patient", default="patient001")
    ap.add_argument("--no-demons", action="store_true")
    ap.add_argument("--interleave", type=int, default=0, metavar="N",
                    help="CPU: also time fast (batch 1) and demons alternately, N rounds, and "
                    "report the ratio of their medians (drift cancels out)")
    ap.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                    help="also time torch.compile'd runs (optional mode, e.g. reduce-overhead)")
    ap.add_argument("--dice-time", type=int, default=0, metavar="N",
                    help="only the Dice–time comparison: every --presets entry and demons on N "
                    "report-split ACDC pairs, interleaved; with --figure, the plot")
    ap.add_argument("--figure", default=None, help="PNG of the Dice–time comparison")
    args = ap.parse_args(argv)
    if args.dice_time:
        return _dice_time_main(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.threads:  # the same thread count for torch and for SimpleITK (demons)
        torch.set_num_threads(args.threads)
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    device = torch.device(args.device)
    batches = [int(b) for b in (args.batch or ("1,4,16" if device.type == "cuda" else "1,4"))
               .split(",")]
    fixed0, moving0, spacing0, source = load_images(args)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads")
    bw = bandwidth(device)
    rows, paired = [], []
    for size_name in args.sizes.split(","):
        fixed, moving, spacing = make_size(size_name, fixed0, moving0, spacing0)
        shape = tuple(fixed.shape[2:])
        demons_times: list[float] = []
        demons_row: dict | None = None
        if not args.no_demons and demons_available():
            demons_times, mem = time_demons(fixed, moving, spacing, args.repeats)
            # times filled in after the second timing below; the row comes first in the table
            demons_row = dict(size=size_name, shape=shape, method="demons (SimpleITK)", batch=1,
                              peak_memory_mb=mem / 2**20, device="cpu")
            rows.append(demons_row)
            print(f"{size_name} {shape} demons: {statistics.median(demons_times):.3f} s/pair",
                  flush=True)
        size_rows = []
        for preset in args.presets.split(","):
            for b in batches:
                f = fixed.to(device).expand(b, -1, -1, -1, -1).contiguous()
                m = moving.to(device).expand(b, -1, -1, -1, -1).contiguous()
                eager_d = None
                # one floor per (size, batch): eager and compiled rows are measured against it
                floor = floor_estimate(shape, spacing, b, device, bw) if preset == "fast" else None
                for compile in [False] + ([args.compile] if args.compile else []):
                    def run(f=f, m=m, p=preset, sp=spacing, c=compile):
                        return nt.register(f, m, spacing=sp, preset=p, compile=c)

                    method = f"nadmm-{preset}-l2-o2"
                    extra = {}
                    if compile:
                        method += " compiled" + ("" if compile is True else f" ({compile})")
                        _sync(device)
                        t0 = time.perf_counter()
                        d = run()
                        _sync(device)
                        extra = dict(compile_seconds=time.perf_counter() - t0,
                                     max_abs_diff_vs_eager=(d - eager_d).abs().max().item())
                    else:
                        eager_d = run()
                    med, times, mem = time_call(run, device, args.repeats)
                    row = dict(size=size_name, shape=shape, method=method, batch=b,
                               seconds_per_pair=med / b, pairs_per_second=b / med,
                               seconds_per_call=med, times=times, peak_memory_mb=mem / 2**20,
                               device=device_name, **extra)
                    if floor is not None:
                        row["floor_seconds_per_pair"] = floor["seconds"] / b
                        row["floor_transform_seconds_per_pair"] = floor["transform_seconds"] / b
                        row["floor_ratio"] = med / floor["seconds"]
                    size_rows.append(row)
                    print(f"{size_name} {shape} {method} batch {b}: {med / b:.3f} s/pair "
                          f"({b / med:.1f} pairs/s), peak {mem / 2**20:.0f} MB"
                          + (f", first call {extra['compile_seconds']:.1f} s, max |Δd| "
                             f"{extra['max_abs_diff_vs_eager']:.1e}" if extra else ""), flush=True)
        if demons_row is not None:  # again after our runs; ratios against the median of both
            demons_times += time_demons(fixed, moving, spacing, args.repeats)[0]
            demons_s = statistics.median(demons_times)
            demons_row.update(seconds_per_pair=demons_s, pairs_per_second=1 / demons_s,
                              times=demons_times)
            print(f"{size_name} {shape} demons (again): median {demons_s:.3f} s/pair", flush=True)
            for r in size_rows:
                r["demons_ratio"] = r["seconds_per_pair"] / demons_s
            if device.type == "cpu" and args.interleave:
                paired.append(interleaved(fixed, moving, spacing, size_name, args.interleave))
        rows += size_rows

    header = ("| size | method | batch | s / pair | pairs / s | peak MB | × demons | "
              "floor s / pair | × floor |")
    lines = [f"Device: {device_name}; torch {torch.__version__}; source {source}; "
             f"copy bandwidth {bw / 1e9:.1f} GB/s", "", header, "|" + "---|" * 9]
    def fmt(r: dict, k: str, spec: str) -> str:
        return format(r[k], spec) if k in r else "–"

    for r in rows:
        lines.append(
            f"| {r['size']} {'×'.join(map(str, r['shape']))} | {r['method']} | {r['batch']} | "
            f"{r['seconds_per_pair']:.3f} | {r['pairs_per_second']:.1f} | "
            f"{r['peak_memory_mb']:.0f} | {fmt(r, 'demons_ratio', '.2f')} | "
            f"{fmt(r, 'floor_seconds_per_pair', '.4f')} | {fmt(r, 'floor_ratio', '.1f')} |")
    for pr in paired:
        lines.append(f"\nInterleaved, {pr['size']}: fast {pr['fast_seconds']:.3f} s, demons "
                     f"{pr['demons_seconds']:.3f} s, ratio {pr['ratio']:.2f} "
                     f"({pr['rounds']} rounds)")
    table = "\n".join(lines)
    print(table)
    doc = dict(rows=rows, interleaved=paired, device=device_name, torch=torch.__version__,
               source=source, bandwidth_bytes_per_second=bw, date=time.strftime("%Y-%m-%d"),
               threads=torch.get_num_threads(), table=table)
    Path(args.json).write_text(json.dumps(doc, indent=1, default=list))
    return 0


def _dice_time_main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    result = dice_time(args.data, args.presets.split(","), args.dice_time)
    lines = ["| method | Dice | s / pair (median) | × demons (median of per-pair ratios) | "
             "folded pairs |", "|---|---|---|---|---|"]
    for name, v in result["summary"].items():
        lines.append(f"| {name} | {v['dice_mean']:.4f} | {v['seconds_median']:.3f} | "
                     f"{v['demons_ratio']:.2f} | {v['folded_pairs']} |")
    table = "\n".join(lines)
    print(table)
    if args.figure:
        dice_time_figure(result, args.figure)
    result.update(table=table, torch=torch.__version__, threads=torch.get_num_threads(),
                  date=time.strftime("%Y-%m-%d"), device="cpu")
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
