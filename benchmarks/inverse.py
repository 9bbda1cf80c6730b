#!/usr/bin/env python
"""Inverse consistency of the fixed-point inverse (``nadmm_torch.invert``) on ACDC pairs,
against SimpleITK's ``InvertDisplacementField`` (and ``InverseDisplacementField``).

Usage::

    python benchmarks/inverse.py [--data DIR] [--pairs 10] [--json OUT.json] [--threads 1]
        [--no-inverse-displacement-field]

For ``--pairs`` report patients of the fixed split (:func:`nadmm_torch.data.acdc.split`, spread
evenly over the groups), registers ES→ED with ``nadmm_torch.register`` (``fast`` preset, the
pair's spacing), inverts the displacement ``d`` with each method and measures, per voxel and in
voxels, the residual displacements of ``d ∘ d⁻¹`` (``compose(d, e)``, i.e.
``(Id + d) ∘ (Id + e) − Id``) and ``d⁻¹ ∘ d`` (``compose(e, d)``): mean and 99th percentile of
their norms, over all voxels and over the interior (one slice and 8 voxels in-plane away from
the edges), and the time of the inversion alone. SimpleITK works in physical units on a grid
with the pair's spacing (the field converted with ``io.displacement_to_itk`` and back); every
method is measured with the same ``compose`` (linear interpolation, border padding).

Methods:

* ``nadmm invert``: ``nadmm_torch.invert(d)`` (defaults: damped steps of 0.5, ≤ 50 iterations,
  stop at a largest residual of 1e-3 voxel);
* ``nadmm invert (step=1, undamped)``: the plain fixed point ``e ← −d ∘ (Id + e)``;
* ``sitk Invert (defaults)``: ``sitk.InvertDisplacementField`` with its defaults (10 iterations,
  max / mean error tolerances 0.1 / 0.001 mm, inverse forced to 0 on the boundary);
* ``sitk Invert (50 it, free boundary)``: 50 iterations, tolerances 1e-3 / 1e-5 mm, no
  boundary condition — as close to ``nadmm invert``'s setting as the filter allows;
* ``sitk InverseDisplacementField``: the kernel-spline inverse (landmarks every 8 voxels, its
  ``subsamplingFactor``), unless ``--no-inverse-displacement-field``. On ACDC's 10-slice
  volumes that leaves 2 landmarks across the slices, too few for a thin-plate spline in 3D.

Prints a markdown table (means over pairs) and writes every record and the table to ``--json``
(rewritten after each pair).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

import nadmm_torch as nt
from nadmm_torch.atomic import atomic_write
from nadmm_torch.data.acdc import evenly_spaced, load_pair, read_acdc_pairs, split
from nadmm_torch.io import Geometry, displacement_to_itk, itk_to_displacement
from nadmm_torch.ops.diff import jacobian_determinant
from nadmm_torch.ops.inverse import inverse_residuals

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "acdc"
DEFAULT_JSON = ROOT / "benchmarks" / "records" / "inverse.json"
MEASURES = ("right_mean", "right_p99", "left_mean", "left_p99",
            "right_mean_interior", "right_p99_interior", "left_mean_interior",
            "left_p99_interior", "seconds")


def _ours(d: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    return nt.invert(d)


def _sitk_invert(**kwargs):
    def run(d: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        field = displacement_to_itk(d, geometry)
        return itk_to_displacement(sitk.InvertDisplacementField(field, **kwargs))

    return run


def _sitk_inverse(d: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    field = displacement_to_itk(d, geometry)
    inv = sitk.InverseDisplacementField(field, size=field.GetSize(), outputOrigin=field.GetOrigin(),
                                        outputSpacing=field.GetSpacing(), subsamplingFactor=8)
    inv.SetDirection(field.GetDirection())
    return itk_to_displacement(inv)


def _ours_plain(d: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    return nt.invert(d, step=1.0)


METHODS = {
    "nadmm invert": _ours,
    "nadmm invert (step=1, undamped)": _ours_plain,
    "sitk Invert (defaults)": _sitk_invert(),
    "sitk Invert (50 it, free boundary)": _sitk_invert(
        maximumNumberOfIterations=50, maxErrorToleranceThreshold=1e-3,
        meanErrorToleranceThreshold=1e-5, enforceBoundaryCondition=False),
    "sitk InverseDisplacementField": _sitk_inverse,
}


def _stats(norm: torch.Tensor, prefix: str) -> dict[str, float]:
    """``norm`` ``(1, Z, Y, X)``: mean and 99th percentile, all voxels and the interior."""
    inner = norm[:, 1:-1, 8:-8, 8:-8]
    out = {}
    for suffix, t in (("", norm), ("_interior", inner)):
        v = t.flatten().double()
        out[f"{prefix}_mean{suffix}"] = float(v.mean())
        out[f"{prefix}_p99{suffix}"] = float(torch.quantile(v, 0.99))
    return out


def measure(d: torch.Tensor, e: torch.Tensor) -> dict[str, float]:
    right, left = inverse_residuals(d.double(), e.double())
    return {**_stats(right, "right"), **_stats(left, "left")}


def table(records: list[dict], methods: list[str]) -> str:
    head = ("| method | pairs | d∘d⁻¹ mean | d∘d⁻¹ p99 | d⁻¹∘d mean | d⁻¹∘d p99 | "
            "interior d∘d⁻¹ mean / p99 | interior d⁻¹∘d mean / p99 | time (s) |")
    lines = [head, "|" + "---|" * 9]
    for m in methods:
        rows = [r[m] for r in records if m in r]
        if not rows:
            continue
        avg = {k: float(np.mean([row[k] for row in rows])) for k in MEASURES}
        lines.append(
            f"| {m} | {len(rows)} | {avg['right_mean']:.4f} | {avg['right_p99']:.4f} | "
            f"{avg['left_mean']:.4f} | {avg['left_p99']:.4f} | "
            f"{avg['right_mean_interior']:.4f} / {avg['right_p99_interior']:.4f} | "
            f"{avg['left_mean_interior']:.4f} / {avg['left_p99_interior']:.4f} | "
            f"{avg['seconds']:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder with pairs.csv (ACDC)")
    ap.add_argument("--pairs", type=int, default=10, help="report pairs (default 10)")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="output JSON ('' for none)")
    ap.add_argument("--threads", type=int, default=1, help="torch / ITK threads (default 1)")
    ap.add_argument("--no-inverse-displacement-field", action="store_true",
                    help="skip sitk.InverseDisplacementField (the slow kernel-spline inverse)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    methods = [m for m in METHODS if not (args.no_inverse_displacement_field
                                          and m == "sitk InverseDisplacementField")]
    _, report = split(read_acdc_pairs(args.data))
    ids = evenly_spaced(report, args.pairs)
    records: list[dict] = []
    for pid in ids:
        pair = load_pair(args.data, pid)
        d = nt.register(pair.fixed, pair.moving, spacing=pair.spacing).detach()
        geometry = Geometry.default(d.shape[2:], pair.spacing)
        rec: dict = {"patient": pid, "shape": list(d.shape[2:]), "spacing": list(pair.spacing),
                     "displacement_max_voxels": float(d.norm(dim=1).max()),
                     "jacobian_determinant_min": float(jacobian_determinant(d).min())}
        for m in methods:
            t0 = time.perf_counter()
            e = METHODS[m](d, geometry)
            rec[m] = {**measure(d, e), "seconds": time.perf_counter() - t0}
        records.append(rec)
        print(f"{pid}: " + ", ".join(
            f"{m}: {rec[m]['right_mean']:.4f}/{rec[m]['left_mean']:.4f} "
            f"({rec[m]['seconds']:.2f} s)" for m in methods), flush=True)
        if args.json:
            _write(args.json, records, methods, args)
    print(table(records, methods))
    return 0


def _write(path: str, records: list[dict], methods: list[str], args) -> None:
    out = {
        "description": "inverse consistency, voxels: right = |compose(d, e)| (d ∘ d⁻¹), left = "
                       "|compose(e, d)| (d⁻¹ ∘ d); interior = 1 slice and 8 voxels in-plane "
                       "from the edges; seconds = the inversion alone",
        "table": table(records, methods),
        "records": records,
        "settings": {"pairs": args.pairs, "threads": args.threads, "preset": "fast"},
        "versions": {"torch": torch.__version__, "SimpleITK": sitk.Version_VersionString(),
                     "python": platform.python_version(), "machine": platform.machine()},
    }
    atomic_write(path, lambda p: p.write_text(json.dumps(out, indent=1)))


if __name__ == "__main__":
    raise SystemExit(main())
