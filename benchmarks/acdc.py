#!/usr/bin/env python
"""ACDC ES→ED benchmark (the protocol of ``docs/protocols.md``).

Usage::

    python benchmarks/acdc.py --data DIR --json OUT.json [--methods M1,M2,...]
        [--device cpu|cuda] [--max-pairs N] [--patients LIST]

``--data`` is a folder with ``pairs.csv`` and ``volumes/``. ``--patients``: a comma list of
patient IDs, or ``tune`` / ``report`` / ``all`` (the fixed split of
:func:`nadmm_torch.data.acdc.split`). Methods: ``unregistered``;
``nadmm-{fast,balanced,accurate,paper}-{l2,l1}-o{1,2,3}`` (:func:`nadmm_torch.register`); ``demons``
(SimpleITK diffeomorphic demons); ``syn`` (ANTs SyN via antspyx). Default: ``unregistered``,
``nadmm-fast-l2-o2`` and the installed baselines.

Every method's displacement is converted to voxel units / pull-back ``(1, 3, Z, 128, 128)``
and scored by :func:`nadmm_torch.data.acdc.evaluate_pair` (same label warp, Dice, Hausdorff
and det J code for all). The time is the wall time of the registration call only (CUDA
synchronised); torch methods get one untimed warm-up run on the first pair.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from nadmm_torch.baselines import available, demons_register, syn_register
from nadmm_torch.data.acdc import (
    ACDCPair,
    evaluate_pair,
    load_pair,
    read_acdc_pairs,
    split,
    summarize,
)

NADMM_METHODS = [
    f"nadmm-{p}-{t}-o{o}"
    for p in ("fast", "balanced", "accurate", "paper")
    for t in ("l2", "l1")
    for o in (1, 2, 3)
]
ALL_METHODS = ["unregistered", *NADMM_METHODS, "demons", "syn"]


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True, help="folder holding pairs.csv and volumes/")
    ap.add_argument("--json", required=True, help="output JSON file")
    ap.add_argument("--methods", default=None, help="comma list (default: see above)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="for nadmm methods")
    ap.add_argument("--max-pairs", type=int, default=None, help="first N selected pairs")
    ap.add_argument(
        "--patients", default="all", help="comma list of patient IDs, or tune / report / all"
    )
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: library's)")
    ap.add_argument("--demons-iterations", type=_ints, default=(15, 10, 5), help="per level")
    ap.add_argument("--demons-sigma", type=float, default=0.5, help="field smoothing (voxels)")
    ap.add_argument("--demons-shrink", type=_ints, default=(4, 2, 1), help="in-plane, per level")
    ap.add_argument("--syn-iterations", type=_ints, default=(100, 70, 50, 20), help="per level")
    ap.add_argument("--syn-step", type=float, default=0.5, help="SyN gradient step")
    ap.add_argument("--syn-flow-sigma", type=float, default=3.0, help="SyN update smoothing")
    ap.add_argument("--syn-total-sigma", type=float, default=0.0, help="SyN total smoothing")
    return ap.parse_args(argv)


def select_patients(rows: list[dict], spec: str) -> list[str]:
    """Patient IDs for ``--patients``: ``all``, ``tune``, ``report`` or a comma list."""
    ids = [r["patient"] for r in rows]
    spec = spec.strip()
    if spec == "all":
        return ids
    if spec in ("tune", "report"):
        tune, report = split(rows)
        return tune if spec == "tune" else report
    wanted = [p.strip() for p in spec.split(",") if p.strip()]
    wanted = [f"patient{int(p):03d}" if p.isdigit() else p for p in wanted]
    missing = [p for p in wanted if p not in ids]
    if missing:
        raise SystemExit(f"--patients: not in pairs.csv: {', '.join(missing)}")
    return wanted


def _nadmm(method: str) -> Callable[[ACDCPair], torch.Tensor]:
    _, preset, data_term, order = method.split("-")

    def run(pair: ACDCPair) -> torch.Tensor:
        import nadmm_torch

        register = getattr(nadmm_torch, "register", None)
        if register is None:
            raise RuntimeError("nadmm_torch.register is not available in this version")
        return register(
            pair.fixed,
            pair.moving,
            spacing=pair.spacing,
            preset=preset,
            data_term=data_term,
            order=int(order[1:]),
        )

    return run


def make_method(method: str, args: argparse.Namespace) -> tuple[Callable | None, str, bool]:
    """``(register(pair) -> displacement or None, device, is_torch_method)``."""
    if method == "unregistered":
        return None, "cpu", False
    if method in NADMM_METHODS:
        return _nadmm(method), args.device, True
    if method == "demons":

        def demons(pair: ACDCPair) -> torch.Tensor:
            return demons_register(
                pair.fixed,
                pair.moving,
                pair.spacing,
                iterations=args.demons_iterations,
                sigma=args.demons_sigma,
                shrink=args.demons_shrink,
            )

        return demons, "cpu", False
    if method == "syn":

        def syn(pair: ACDCPair) -> torch.Tensor:
            return syn_register(
                pair.fixed,
                pair.moving,
                pair.spacing,
                iterations=args.syn_iterations,
                grad_step=args.syn_step,
                flow_sigma=args.syn_flow_sigma,
                total_sigma=args.syn_total_sigma,
                threads=args.threads,
            )

        return syn, "cpu", False
    raise SystemExit(f"unknown method {method!r}; known: {', '.join(ALL_METHODS)}")


def timed(fn: Callable, pair: ACDCPair, device: str) -> tuple[torch.Tensor, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    disp = fn(pair)
    if device == "cuda":
        torch.cuda.synchronize()
    return disp, time.perf_counter() - t0


def _fmt(v: float, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown_table(summary: dict) -> str:
    lines = [
        "| method | Dice mean ± sd | RV / Myo / LV | HD (mm) | % det J ≤ 0 | s/pair | device |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, s in summary.items():
        if not s.get("n_pairs"):
            lines.append(f"| {m} | (no pairs) | | | | | {s.get('device', '')} |")
            continue
        unreg = m == "unregistered"
        lines.append(
            f"| {m} | {s['dice_mean']:.3f} ± {s['dice_sd']:.3f} | "
            f"{_fmt(s['dice_rv'], '.3f')} / {_fmt(s['dice_myo'], '.3f')} / "
            f"{_fmt(s['dice_lv'], '.3f')} | {_fmt(s['hd_mean'], '.2f')} | "
            f"{'–' if unreg else _fmt(s['fold_percent_mean'], '.4f')} | "
            f"{'–' if unreg else _fmt(s['seconds_mean'], '.2f')} | {s['device']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
        try:
            import SimpleITK as sitk

            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
        except ImportError:
            pass
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")

    rows = read_acdc_pairs(args.data)
    groups = {r["patient"]: r.get("group", "") for r in rows}
    patients = select_patients(rows, args.patients)
    if args.max_pairs is not None:
        patients = patients[: args.max_pairs]

    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        methods = ["unregistered", "nadmm-fast-l2-o2", "demons", "syn"]
    have = available([m for m in ("demons", "syn") if m in methods])
    runnable = []
    for m in methods:
        if m in ("demons", "syn") and not have[m]:
            pkg = "SimpleITK" if m == "demons" else "antspyx"
            print(f"skipping {m}: {pkg} is not importable", file=sys.stderr)
            continue
        runnable.append(m)
    runners = {m: make_method(m, args) for m in runnable}

    records: dict[str, list[dict]] = {m: [] for m in runnable}
    failures: list[dict] = []
    warmed: set[str] = set()
    out_path = Path(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def summary() -> dict:
        out = {}
        for m in runnable:
            s = summarize(records[m])
            s["device"] = runners[m][1]
            s["n_failed"] = sum(1 for f in failures if f["method"] == m)
            out[m] = s
        return out

    def write() -> None:
        doc = {
            "summary": summary(),
            "pairs": records,
            "failures": failures,
            "config": {
                "data": str(args.data),
                "patients": patients,
                "methods": runnable,
                "device": args.device,
                "threads": args.threads,
                "demons": {
                    "iterations": list(args.demons_iterations),
                    "sigma": args.demons_sigma,
                    "shrink": list(args.demons_shrink),
                },
                "syn": {
                    "iterations": list(args.syn_iterations),
                    "grad_step": args.syn_step,
                    "flow_sigma": args.syn_flow_sigma,
                    "total_sigma": args.syn_total_sigma,
                },
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
            },
        }
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, allow_nan=True))
        tmp.replace(out_path)

    bar = tqdm(patients, desc="pairs", unit="pair")
    for pid in bar:
        try:
            pair = load_pair(args.data, pid)
        except Exception as e:
            for m in runnable:
                failures.append({"method": m, "patient": pid, "error": f"load: {e!r}"})
            tqdm.write(f"FAILED load {pid}: {e!r}")
            continue
        for m in runnable:
            fn, device, is_torch = runners[m]
            bar.set_postfix_str(m)
            try:
                if fn is None:
                    disp, seconds = None, 0.0
                else:
                    p = pair.to(device)
                    if is_torch and m not in warmed:
                        fn(p)  # untimed warm-up (CUDA context, caches)
                        warmed.add(m)
                    disp, seconds = timed(fn, p, device)
                    disp = disp.detach().float().cpu()
                rec = {"patient": pid, "group": groups.get(pid, "")}
                rec.update(evaluate_pair(pair, disp))
                rec["seconds"] = seconds
                records[m].append(rec)
            except Exception as e:
                failures.append(
                    {
                        "method": m,
                        "patient": pid,
                        "error": repr(e),
                        "traceback": traceback.format_exc(),
                    }
                )
                tqdm.write(f"FAILED {m} {pid}: {e!r}")
        write()
    write()

    print()
    print(f"ACDC ES→ED, {len(patients)} pairs ({args.patients}), data {args.data}")
    print(markdown_table(summary()))
    if failures:
        print(f"\n{len(failures)} failed (method, patient):")
        for f in failures:
            print(f"  {f['method']} {f['patient']}: {f['error']}")
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
