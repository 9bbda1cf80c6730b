#!/usr/bin/env python
"""The cost of training through the solver: forward + backward of
``NADMMRegistration(preset, learnable=True, checkpoint=...)`` against its forward alone.

Usage::

    python benchmarks/training.py [--data DIR] [--presets fast] [--modes auto,False,True]
        [--acdc 1,2,3] [--brain 1-2,3-4] [--large balanced] [--rounds 5] [--threads 0]
        [--json benchmarks/records/training.json]

Cases: ACDC ES→ED pairs on the protocol grid ``(Z, 128, 128)`` (``--acdc``: patient numbers),
brain2d inter-subject slices ``291 × 216`` (``--brain``: ``moving-fixed`` subject numbers,
raw intensities, no affine step: the cost does not depend on the alignment), and with
``--large PRESETS`` the first ACDC pair resampled to ``96 × 128 × 128`` (the paper's grid, where
``checkpoint="auto"`` checkpoints the middle level of ``fast`` and ``balanced``), for those
presets. The checkpoint column says which levels (coarse → fine) ``"auto"`` checkpointed.

For each case and preset, in one process and interleaved (each round runs the forward alone,
one training step per checkpoint mode in a rotating order, and the forward again, so a load
change on a shared machine hits every column alike):

* forward (s): ``with torch.no_grad(): reg(fixed, moving, spacing)``, the inference cost;
* forward + backward (s): ``reg.zero_grad(); d = reg(...)``, the loss
  ``MSE(warp(moving, d), fixed)``, ``loss.backward()`` (gradients reach λ, θ, the momentum and
  step-scale schedules);
* ratio: forward + backward over forward, the median over rounds of each round's quotient
  (its training step over the mean of the two forwards that open and close the round);
* peak memory (MB): the most tensor memory live at once during the call, above what was live
  before it, from the allocation and free events of ``torch.profiler`` (``profile_memory=
  True``; on CUDA ``torch.cuda.max_memory_allocated``), in one extra call per column outside
  the timed ones (the profiler slows the call down). It counts tensors only, not the
  interpreter or the allocator's cache, so it does not depend on glibc's heap as an RSS
  figure would.

One warm-up call of each kind precedes the timed rounds. Times are medians over ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):  # as nadmm_torch does
    os.environ["GOMP_SPINCOUNT"] = "1000"  # before torch loads (benchmarks/threads.py)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import nadmm_torch as nt  # noqa: E402
from nadmm_torch.ops.solver import CHECKPOINT_AUTO_ELEMENTS, uses_checkpoint  # noqa: E402

DATA_CANDIDATES = (REPO / ".." / "shared" / "data", REPO / ".." / ".." / "shared" / "data")
MODES = {"auto": "auto", "False": False, "True": True, "off": False, "on": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = next((p for p in DATA_CANDIDATES if p.is_dir()), DATA_CANDIDATES[0])
    ap.add_argument("--data", default=str(default), help="folder holding acdc/ and brain2d/")
    ap.add_argument("--presets", default="fast", help="comma list of presets")
    ap.add_argument("--modes", default="auto,False,True", help="checkpoint modes, comma list")
    ap.add_argument("--acdc", default="1,2,3", help="ACDC patient numbers ('' for none)")
    ap.add_argument("--brain", default="1-2,3-4", help="brain2d moving-fixed subjects")
    ap.add_argument("--large", default="", help="presets (comma list) to run on the first "
                    "ACDC pair at 96x128x128 too ('' for none)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "records" / "training.json"))
    return ap.parse_args(argv)


def acdc_case(data: Path, patient: int, large: bool = False) -> dict:
    from nadmm_torch.data.acdc import load_pair

    pair = load_pair(data / "acdc", patient)
    fixed, moving, spacing = pair.fixed, pair.moving, tuple(pair.spacing)
    if large:  # the paper's grid: 1.5 mm slices, padded / cropped to 96
        fixed, moving = (_resample_slices(x, spacing[0], 96) for x in (fixed, moving))
        spacing = (1.5, *spacing[1:])
    name = f"acdc {pair.patient}" + (" (96 slices)" if large else "")
    return dict(name=name, fixed=fixed, moving=moving, spacing=spacing)


def _resample_slices(x: torch.Tensor, spacing_z: float, depth: int) -> torch.Tensor:
    z, y, w = x.shape[2:]
    x = F.interpolate(x, size=(max(1, round(z * spacing_z / 1.5)), y, w), mode="trilinear")
    n = x.shape[2]
    if n >= depth:
        return x[:, :, (n - depth) // 2:(n - depth) // 2 + depth].contiguous()
    before = (depth - n) // 2
    return F.pad(x, (0, 0, 0, 0, before, depth - n - before))


def brain_case(data: Path, spec: str) -> dict:
    from nadmm_torch.io import read_image

    moving_id, fixed_id = (int(s) for s in spec.split("-"))

    def load(i: int) -> torch.Tensor:
        img, _ = read_image(data / "brain2d" / "images" / f"OASIS-TRT-20-{i}_slice118.nii.gz")
        return img.reshape(1, 1, *img.shape[-2:]).float()

    return dict(name=f"brain2d {moving_id}→{fixed_id}", fixed=load(fixed_id),
                moving=load(moving_id), spacing=(1.0, 1.0))


def peak_memory_mb(fn, device: torch.device) -> float:
    """The most tensor memory live at once while ``fn()`` runs, above the start (MB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(case: dict, preset: str, modes: list, rounds: int, device: torch.device) -> list[dict]:
    """One row per checkpoint mode; the forward alone is shared (no graph: no checkpoint)."""
    fixed, moving = case["fixed"].to(device), case["moving"].to(device)
    spacing = case["spacing"]
    regs = {m: nt.NADMMRegistration(preset, learnable=True, checkpoint=m).to(device)
            for m in modes}

    def forward():
        with torch.no_grad():
            return regs[modes[0]](fixed, moving, spacing)

    def train(mode):
        def step():
            reg = regs[mode]
            reg.zero_grad()
            d = reg(fixed, moving, spacing)
            (nt.warp(moving, d) - fixed).pow(2).mean().backward()
        return step

    forward()
    for m in modes:
        train(m)()
    t_fwd, t_train = [], {m: [] for m in modes}
    for r in range(rounds):
        before = _timed(forward, device)
        for m in modes[r % len(modes):] + modes[:r % len(modes)]:
            t_train[m].append(_timed(train(m), device))
        t_fwd.append(0.5 * (before + _timed(forward, device)))
    mem_fwd = peak_memory_mb(forward, device)
    rows = []
    for m in modes:
        grads = [p.grad for p in regs[m].parameters()]
        rows.append(dict(
            case=case["name"], shape=list(fixed.shape[2:]), preset=preset, checkpoint=m,
            checkpointed_levels=_checkpointed_levels(regs[m], fixed, spacing),
            forward_s=statistics.median(t_fwd), train_s=statistics.median(t_train[m]),
            ratio=statistics.median(t / f for t, f in zip(t_train[m], t_fwd)),
            forward_times=t_fwd, train_times=t_train[m],
            peak_train_mb=peak_memory_mb(train(m), device), peak_forward_mb=mem_fwd,
            grads_finite=all(g is not None and bool(torch.isfinite(g).all()) for g in grads),
        ))
    return rows


def _checkpointed_levels(reg, fixed: torch.Tensor, spacing) -> list[bool]:
    """Per level (coarse → fine): whether ``reg.checkpoint`` checkpoints its warps."""
    with torch.no_grad():
        _, diag = reg(fixed, fixed, spacing, return_diagnostics=True)
    with torch.enable_grad():
        return [
            warps > 0 and uses_checkpoint(
                reg.checkpoint, fixed.new_empty(fixed.shape[0], len(shape), *shape), warps)
            for shape, warps in zip(diag.shapes, reg.config.warps)
        ]


def table(rows: list[dict]) -> str:
    lines = [
        "| case | size | preset | checkpoint | forward (s) | forward + backward (s) | ratio "
        "| peak memory, training (MB) | peak memory, forward (MB) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        size = "×".join(str(n) for n in r["shape"])
        lines.append(
            f"| {r['case']} | {size} | {r['preset']} | {_mode(r)} "
            f"| {r['forward_s']:.3f} | {r['train_s']:.3f} | {r['ratio']:.2f} "
            f"| {r['peak_train_mb']:.0f} | {r['peak_forward_mb']:.0f} |"
        )
    return "\n".join(lines)


def _mode(row: dict) -> str:
    """The checkpoint mode, and for ``"auto"`` which levels it checkpointed."""
    if row["checkpoint"] != "auto":
        return str(row["checkpoint"])
    levels = [str(i + 1) for i, on in enumerate(row["checkpointed_levels"]) if on]
    return "auto (" + (f"level {', '.join(levels)} of {len(row['checkpointed_levels'])}"
                       if levels else "none") + ")"


def summary(rows: list[dict]) -> str:
    """Ratio and memory ranges per (dataset, preset, mode)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"].split()[0] + (" 96" if "96" in r["case"] else ""),
                           r["preset"], str(r["checkpoint"])), []).append(r)
    out = []
    for (data, preset, mode), rs in groups.items():
        ratios = [r["ratio"] for r in rs]
        mem = [r["peak_train_mb"] for r in rs]
        out.append(f"{data:10s} {preset:9s} checkpoint={mode:5s} ratio {min(ratios):.2f}–"
                   f"{max(ratios):.2f}  peak {min(mem):.0f}–{max(mem):.0f} MB ({len(rs)} cases)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = Path(args.data)
    modes = [MODES[m] for m in args.modes.split(",")]
    cases = []
    if args.acdc and (data / "acdc").is_dir():
        cases += [acdc_case(data, int(p)) for p in args.acdc.split(",")]
    if args.brain and (data / "brain2d").is_dir():
        cases += [brain_case(data, s) for s in args.brain.split(",")]
    presets = {id(c): args.presets.split(",") for c in cases}
    if args.large and (data / "acdc").is_dir():
        cases.append(acdc_case(data, int((args.acdc or "1").split(",")[0]), large=True))
        presets[id(cases[-1])] = args.large.split(",")
    if not cases:
        raise SystemExit(f"--data: no acdc/ or brain2d/ folder under {data}")
    rows = []
    for case in cases:
        for preset in presets[id(case)]:
            rows += measure(case, preset, modes, args.rounds, device)
            print(table(rows[-len(modes):]).split("\n", 2)[2], flush=True)
    print(table(rows))
    print(summary(rows))
    record = dict(
        command="python benchmarks/training.py " + " ".join(sys.argv[1:] if argv is None
                                                             else argv),
        device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
        platform=platform.platform(), rounds=args.rounds,
        checkpoint_auto_elements=CHECKPOINT_AUTO_ELEMENTS,
        memory="peak of live tensor bytes during the call above the start: torch.profiler "
               "allocation/free events on CPU, torch.cuda.max_memory_allocated on CUDA",
        rows=rows,
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
