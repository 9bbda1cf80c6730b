#!/usr/bin/env python
"""θ relative to the images' characteristic frequency (``theta_scaling="spectral"``) against
absolute θ (``"none"``), on both domains.

Usage::

    python benchmarks/theta_rule.py --reference [--acdc DIR]        # ACDC_SPECTRAL_K2
    python benchmarks/theta_rule.py --json OUT.json [--acdc DIR] [--brain2d DIR]
        [--acdc-split tune|report] [--acdc-presets fast] [--brain-presets fast,paper]

λ transfers between ACDC and brain2d once it is relative to the pair's gradient energy; θ with
absolute units does not (brain2d prefers θ ×10–30). The u-step low-passes the velocity where the
regulariser's symbol ``h²Λ_n`` (mm⁻²ⁿ) reaches θ, so ``theta_scaling="spectral"`` multiplies θ
by the pair's ``k²ⁿ``, ``k² = mean |Δ_h I|² / mean |∇_h I|²`` at each level
(:func:`nadmm_torch.ops.solver.spectral_scale`), with the presets' θ divided by the ACDC tuning
split's mean ``k²ⁿ`` (``--reference`` computes it). This script scores both settings on the
ACDC split (protocol of :mod:`nadmm_torch.data.acdc`) and on the 20 brain2d pairs after ANTs
``Affine`` (protocol of ``benchmarks/brain2d.py``). Dice only: no timing, any load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import brain2d  # noqa: E402

import nadmm_torch as nt  # noqa: E402
from nadmm_torch.data.acdc import evaluate_pair, load_pair, read_acdc_pairs, split  # noqa: E402
from nadmm_torch.ops.solver import normalise_pair, pyramid_factors, spectral_scale  # noqa: E402
from nadmm_torch.ops.warp import resize  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MODES = ("none", "spectral")


def k2_levels(fixed: torch.Tensor, moving: torch.Tensor, spacing, levels: int = 3) -> list[float]:
    """The pair's ``k²`` at each pyramid level (coarse → fine), as the solver computes it."""
    f, m = normalise_pair(fixed.float(), moving.float(), "percentile")
    shape, out = f.shape[2:], []
    for factors in pyramid_factors(shape, spacing, levels):
        size = tuple(max(1, round(n / q)) for n, q in zip(shape, factors))
        h = tuple(s * n / z for s, n, z in zip(spacing, shape, size))
        out.append(float(spectral_scale(resize(f, size, mode="area"),
                                        resize(m, size, mode="area"), h)[0]))
    return out


def reference(data: str) -> dict:
    pairs = [load_pair(data, p) for p in split(read_acdc_pairs(data))[0]]
    ks = np.array([k2_levels(q.fixed, q.moving, tuple(q.spacing)) for q in pairs])
    return dict(k2_mean=ks.mean(0).tolist(), k2_cv=(ks.std(0) / ks.mean(0)).tolist(),
                pairs=len(pairs))


def acdc(data: str, which: str, presets: list[str]) -> dict:
    ids = split(read_acdc_pairs(data))[0 if which == "tune" else 1]
    pairs = [load_pair(data, p) for p in ids]
    out = {}
    for preset in presets:
        dice = {mode: [] for mode in MODES}
        for q in pairs:
            for mode in MODES:
                d = nt.register(q.fixed, q.moving, spacing=q.spacing, preset=preset,
                                theta_scaling=mode)
                dice[mode].append(evaluate_pair(q, d)["dice"])
        out[preset] = dict(dice={k: float(np.mean(v)) for k, v in dice.items()}, per_pair=dice)
    return out


def brain(data: Path, presets: list[str], cache: Path) -> dict:
    files = brain2d.subjects(data)
    pairs = brain2d.select_pairs(sorted(files), None, False)
    out = {}
    for preset in presets:
        dice, k2 = {mode: [] for mode in MODES}, []
        for pair in pairs:
            st = brain2d.affine_stage(pair, files, cache)
            f, m = (torch.from_numpy(st[k])[None, None] for k in ("fixed", "moving"))
            k2.append(k2_levels(f, m, (1.0, 1.0)))
            for mode in MODES:
                d = nt.register(f, m, spacing=(1.0, 1.0), preset=preset, theta_scaling=mode)
                dice[mode].append(brain2d.evaluate(st, d)["dice"])
        out[preset] = dict(dice={k: float(np.mean(v)) for k, v in dice.items()},
                           k2_mean=np.mean(k2, 0).tolist(), per_pair=dice)
    return out


def table(acdc_result: dict, which: str, brain_result: dict) -> str:
    lines = ["| domain | preset | Dice, θ absolute (`none`) | Dice, θ relative (`spectral`) | Δ |",
             "|---|---|---|---|---|"]
    for domain, result in ((f"ACDC {which} split", acdc_result),
                           ("brain2d (20 pairs, ANTs affine)", brain_result)):
        for preset, r in result.items():
            a, b = r["dice"]["none"], r["dice"]["spectral"]
            lines.append(f"| {domain} | {preset} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--reference", action="store_true", help="print ACDC_SPECTRAL_K2 and stop")
    ap.add_argument("--acdc", default=str(SHARED / "acdc"))
    ap.add_argument("--brain2d", default=str(SHARED / "brain2d"))
    ap.add_argument("--acdc-split", default="report", choices=["tune", "report"])
    ap.add_argument("--acdc-presets", default="fast,balanced,paper")
    ap.add_argument("--brain-presets", default="fast,balanced,paper,accurate")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "nadmm_brain2d_affine"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.reference:
        print(json.dumps(reference(args.acdc)))
        return 0
    if not args.json:
        ap.error("--json is required (unless --reference)")
    acdc_result = acdc(args.acdc, args.acdc_split, args.acdc_presets.split(","))
    brain_result = brain(Path(args.brain2d), args.brain_presets.split(","), Path(args.cache))
    text = table(acdc_result, args.acdc_split, brain_result)
    print(text)
    Path(args.json).write_text(json.dumps(dict(acdc=acdc_result, brain2d=brain_result, table=text,
                                               acdc_split=args.acdc_split,
                                               date=time.strftime("%Y-%m-%d")), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
