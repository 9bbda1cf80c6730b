#!/usr/bin/env python
"""A multi-modal case on brain2d: the moving image's contrast remapped, l2 on intensities
against l2 on MIND-SSC features (``features="mind"``).

Usage::

    python benchmarks/multimodal.py [--data DIR] [--cache DIR] [--json OUT.json] [--quick]
        [--presets fast,paper] [--lam-mults 1/16,1/4,1,4] [--threads N]

Pairs, the affine stage and the scoring are those of ``benchmarks/brain2d.py`` (every ordered
pair of distinct subjects; ANTs ``Affine`` on the original T1 pair, read from its cache; Dice
over the labels with ≥ 10 pixels in both maps; % pixels with det J ≤ 0). The affinely
resampled moving image is then remapped, so that only the deformable step sees two
contrasts:

* ``mono``: unchanged (the mono-modal reference);
* ``inverted``: ``max − I``;
* ``t2like``: ``1 + sin(1.5 π u)``, ``u = clip(I / p99(I), 0, 1)``, a non-monotone map that
  makes CSF brightest, grey matter middle and white matter darkest, with the background
  between grey and white matter.

Each case is registered by :func:`nadmm_torch.register` with each ``--presets`` entry (l2,
order 2, its λ), on intensities (``none``) and on MIND-SSC descriptors (``mind``), and the
preset's λ is checked for MIND by a sweep (``--lam-mults`` × the ``fast`` preset's λ, on the
``mono`` and ``inverted`` cases, and on raw intensities for ``mono``): if MIND's best
multiplier is that of raw intensities, the gradient-relative λ carries over.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
REMAPS = ("mono", "inverted", "t2like")
FEATURES = ("none", "mind")


def _brain2d():
    """``benchmarks/brain2d.py`` as a module (this folder is not a package)."""
    spec = importlib.util.spec_from_file_location("brain2d", REPO / "benchmarks" / "brain2d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


brain2d = _brain2d()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(brain2d.DEFAULT_DATA), help="images/, labels/")
    ap.add_argument("--cache", default=str(brain2d.DEFAULT_CACHE), help="affine-stage cache")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "records" /
                                          "multimodal_brain2d.json"))
    ap.add_argument("--quick", action="store_true", help="4 pairs only (a cycle of 4 subjects)")
    ap.add_argument("--presets", default="fast,paper", help="comma list (default fast,paper)")
    ap.add_argument("--lam-mults", default="1/16,1/4,1,4",
                    help="λ multipliers of the λ sweep ('' skips it)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    return ap.parse_args(argv)


def remap(moving: np.ndarray, how: str) -> np.ndarray:
    """The affinely resampled moving image ``(Y, X)`` in another contrast (see the module
    docstring)."""
    if how == "mono":
        return moving
    if how == "inverted":
        return (moving.max() - moving).astype(np.float32)
    if how == "t2like":
        u = np.clip(moving / np.percentile(moving, 99), 0.0, 1.0)
        return (1.0 + np.sin(1.5 * np.pi * u)).astype(np.float32)
    raise ValueError(f"remap: expected one of {list(REMAPS)}, got {how!r}")


def register(fixed: np.ndarray, moving: np.ndarray, preset: str, features: str,
             lam_mult: float = 1.0) -> tuple[torch.Tensor, float]:
    """``nt.register`` (l2, order 2) of a ``(Y, X)`` pair: ``(displacement, seconds)``."""
    import nadmm_torch as nt

    f, m = torch.from_numpy(fixed)[None, None], torch.from_numpy(moving)[None, None]
    lam = None
    if lam_mult != 1.0:
        lam = nt.SolverConfig.from_preset(preset).scaled("lam", lam_mult)
    t0 = time.perf_counter()
    d = nt.register(f, m, spacing=(1.0, 1.0), preset=preset, features=features, lam=lam)
    return d, time.perf_counter() - t0


def _score(stage: dict, disp, seconds: float, **keys) -> dict:
    rec = brain2d.evaluate(stage, disp)
    rec.pop("dice_per_label")
    rec.update(seconds=seconds, **keys)
    return rec


def run_pairs(pairs, files, cache: Path, presets, lam_mults) -> list[dict]:
    """Every case of every pair (main comparison and λ sweep), one record each."""
    records = []
    for moving, fixed in pairs:
        stage = brain2d.affine_stage((moving, fixed), files, cache)
        ids = dict(moving=moving, fixed=fixed)
        records.append(_score(stage, None, 0.0, method="affine", remap="-", lam_mult=1.0,
                              **ids))
        for how in REMAPS:
            m = remap(stage["moving"], how)
            for preset in presets:
                for feat in FEATURES:
                    d, s = register(stage["fixed"], m, preset, feat)
                    records.append(_score(stage, d, s, method=f"{preset}-{feat}", remap=how,
                                          lam_mult=1.0, **ids))
            sweep = {"mono": FEATURES, "inverted": ("mind",)}.get(how, ())
            for feat, k in ((f, k) for f in sweep for k in lam_mults if k != 1.0):
                d, s = register(stage["fixed"], m, "fast", feat, k)
                records.append(_score(stage, d, s, method=f"fast-{feat}", remap=how,
                                      lam_mult=k, **ids))
        last = [r for r in records if r["moving"] == moving and r["fixed"] == fixed]
        print(f"{moving} -> {fixed}: " + ", ".join(
            f"{r['remap']}/{r['method']} {r['dice']:.3f}" for r in last if r["lam_mult"] == 1.0),
            flush=True)
    return records


def summaries(records: list[dict]) -> dict[str, dict]:
    """Per ``remap/method/λ×k``: :func:`brain2d.summarize` of its pairs."""
    keys = sorted({(r["remap"], r["method"], r["lam_mult"]) for r in records})
    return {f"{h}/{m}/{k:g}": brain2d.summarize(
        [r for r in records if (r["remap"], r["method"], r["lam_mult"]) == (h, m, k)])
        for h, m, k in keys}


def tables(summary: dict, presets, lam_mults) -> str:
    """The comparison (Dice mean ± sd, % folded pixels, s/pair) and the λ sweep (Dice)."""
    aff = summary["-/affine/1"]
    lines = ["| method | " + " | ".join(REMAPS) + " |", "|---|" + "---|" * len(REMAPS),
             "| affine only | " + " | ".join([f"{aff['dice_mean']:.3f}"] * len(REMAPS)) + " |"]
    for preset in presets:
        for feat in FEATURES:
            cells = []
            for how in REMAPS:
                s = summary[f"{how}/{preset}-{feat}/1"]
                cells.append(f"{s['dice_mean']:.3f} ± {s['dice_sd']:.3f} "
                             f"({s['fold_percent_mean']:.3f} %, {s['seconds_mean']:.2f} s)")
            name = f"{preset}, l2 on {'MIND-SSC' if feat == 'mind' else 'intensities'}"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if lam_mults:
        mults = sorted(set(lam_mults) | {1.0})
        lines += ["", "| fast, λ × | " + " | ".join(f"{k:g}" for k in mults) + " |",
                  "|---|" + "---|" * len(mults)]
        for how, feat in (("mono", "none"), ("mono", "mind"), ("inverted", "mind")):
            row = [summary.get(f"{how}/fast-{feat}/{k:g}") for k in mults]
            lines.append(f"| {how}, {feat} | " + " | ".join(
                "–" if s is None else f"{s['dice_mean']:.3f}" for s in row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    files = brain2d.subjects(Path(args.data))
    pairs = brain2d.select_pairs(list(files), None, args.quick)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    lam_mults = [float(Fraction(v)) for v in args.lam_mults.split(",") if v.strip()]
    if lam_mults and "fast" not in presets:
        raise SystemExit("--lam-mults: the λ sweep uses the fast preset; add it to --presets")
    records = run_pairs(pairs, files, Path(args.cache), presets, lam_mults)
    summary = summaries(records)
    table = tables(summary, presets, lam_mults)
    print(table)
    doc = {
        "summary": summary, "table": table, "pairs": records,
        "config": {"data": str(args.data), "pairs": pairs, "presets": presets,
                   "lam_mults": lam_mults, "remaps": list(REMAPS), "threads": args.threads,
                   "affine": "ANTs Affine (antspyx defaults, Mattes MI, random_seed 1) on the "
                             "original pair, then the moving image remapped",
                   "solver": "nadmm_torch.register, l2, order 2, spacing (1, 1); MIND-SSC "
                             "radius 2, dilation 2"},
        "environment": brain2d.environment(argv),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
