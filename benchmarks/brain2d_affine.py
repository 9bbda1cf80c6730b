#!/usr/bin/env python
"""Affine only, on brain2d: Dice unregistered vs ``nt.affine`` (NCC, MI) vs ANTs ``Affine``.

Usage::

    python benchmarks/brain2d_affine.py [--data DIR] [--json OUT.json] [--methods ...]
        [--threads N] [--device cpu|cuda] [--misalign DEG,MM,SCALE]

The protocol of ``docs/protocols.md`` (brain2d): every ordered pair (moving, fixed) of
distinct subjects (20 pairs of the five); each method aligns the moving image to the fixed one
affinely, the moving labels are resampled with nearest neighbour, and Dice is taken per label
over the labels with ≥ 10 pixels in both the fixed and the moving label maps, averaged per pair,
then mean ± sd over pairs (also cortical labels ≥ 1000 and subcortical < 1000 apart). Time is
the registration's wall time per pair (``--threads`` for both torch and ITK).

Methods: ``none`` (unregistered), ``ncc`` / ``mi`` (:func:`nadmm_torch.affine` with that
similarity, its defaults otherwise), ``ants`` (``ants.registration(type_of_transform="Affine")``,
antspyx defaults: Mattes MI, centre-of-mass initialisation; skipped with a note when antspyx is
not importable). ``--misalign`` first moves each moving image and its labels by a seeded random
affine (the same for every method), to compare on pairs that are not pre-aligned. Prints a
markdown table and writes the records and the table to ``--json``
(default ``benchmarks/records/brain2d_affine.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from itertools import permutations
from pathlib import Path

import numpy as np
import torch

import nadmm_torch as nt
from nadmm_torch.io import read_image, read_labels

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[0].parent / "shared" / "data" / "brain2d"
DEFAULT_JSON = HERE / "records" / "brain2d_affine.json"
MIN_PIXELS = 10


def subjects(data: Path) -> list[str]:
    names = sorted(p.name.split("_slice")[0] for p in (data / "images").glob("*.nii.gz"))
    if len(names) < 2:
        raise SystemExit(f"{data}: expected at least two subjects under images/")
    return names


def paths(data: Path, subject: str) -> tuple[Path, Path]:
    img = data / "images" / f"{subject}_slice118.nii.gz"
    lab = data / "labels" / f"{subject}_DKT31_CMA_labels_slice118.nii.gz"
    return img, lab


def pair_dice(warped: np.ndarray, fixed: np.ndarray, moving: np.ndarray) -> dict[str, float]:
    """Mean Dice over labels with ≥ MIN_PIXELS in both ``fixed`` and ``moving`` (all, cortical
    ≥ 1000, subcortical < 1000)."""
    labels = [
        int(v) for v in np.unique(fixed)
        if v != 0 and (fixed == v).sum() >= MIN_PIXELS and (moving == v).sum() >= MIN_PIXELS
    ]
    per = {}
    for v in labels:
        a, b = warped == v, fixed == v
        per[v] = 2.0 * (a & b).sum() / (a.sum() + b.sum())
    pick = {
        "all": labels,
        "cortical": [v for v in labels if v >= 1000],
        "subcortical": [v for v in labels if v < 1000],
    }
    return {k: float(np.mean([per[v] for v in ls])) if ls else float("nan")
            for k, ls in pick.items()}


def load(data: Path, subject: str):
    """``(image (1, 1, H, W), labels (1, 1, H, W), geometry)`` of one subject."""
    img, geo = read_image(paths(data, subject)[0])
    lab, _ = read_labels(paths(data, subject)[1])
    return img, lab, geo


def misalign(image, labels, seed: int, degrees: float, mm: float, scale: float):
    """The moving image and labels under a seeded random affine (rotation ±``degrees``,
    translation ±``mm`` per axis, scale 1 ± ``scale`` per axis, about the centre): a pair that
    is not pre-aligned. Labels with nearest neighbour."""
    g = torch.Generator().manual_seed(seed)

    def u(*shape):
        return 2 * torch.rand(*shape, generator=g, dtype=torch.float64) - 1

    a = math.radians(degrees) * float(u(1))
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]],
                       dtype=torch.float64)
    lin = rot @ torch.diag(1 + scale * u(2))
    shape = image.shape[2:]
    c = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64)
    A = torch.cat([lin, (c + mm * u(2) - lin @ c)[:, None]], 1)[None]
    d = nt.affine_to_displacement(A, shape).float()
    return nt.warp(image, d), nt.warp(labels, d, mode="nearest")


def run_ours(similarity: str, fixed, moving, mlab, device) -> tuple:
    f, m = fixed.to(device), moving.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    A = nt.affine(f, m, spacing=(1.0, 1.0), similarity=similarity)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    d = nt.affine_to_displacement(A, f.shape[2:]).cpu()
    warped = nt.warp(mlab, d, mode="nearest")
    return warped[0, 0].numpy(), elapsed, A[0].cpu().tolist()


def run_ants(fixed, moving, mlab, geo) -> tuple:
    import ants

    def to_ants(x):  # ants arrays are in ITK order (x, y): transposed
        arr = np.ascontiguousarray(x[0, 0].numpy().astype(np.float32).T)
        return ants.from_numpy(arr, origin=geo.origin, spacing=geo.spacing,
                               direction=geo.direction_matrix)

    f, m, ml = to_ants(fixed), to_ants(moving), to_ants(mlab)
    tmp = tempfile.mkdtemp(prefix="brain2d_affine_ants_")
    try:
        t0 = time.perf_counter()
        reg = ants.registration(f, m, type_of_transform="Affine",
                                outprefix=os.path.join(tmp, "a_"))
        elapsed = time.perf_counter() - t0
        warped = ants.apply_transforms(
            f, ml, transformlist=reg["fwdtransforms"], interpolator="nearestNeighbor"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return np.rint(warped.numpy().T).astype(np.int64), elapsed, None


def summarise(records: list[dict], methods: list[str]) -> tuple[list[dict], str]:
    rows = []
    lines = [
        "| method | Dice (all) | cortical | subcortical | wins vs ANTs | time / pair (s) |",
        "|---|---|---|---|---|---|",
    ]
    ants = {(r["moving"], r["fixed"]): r["dice"]["all"] for r in records if r["method"] == "ants"}
    for meth in methods:
        rs = [r for r in records if r["method"] == meth]
        if not rs:
            continue
        row = {"method": meth, "pairs": len(rs)}
        for key in ("all", "cortical", "subcortical"):
            v = np.array([r["dice"][key] for r in rs])
            row[key] = [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]
        row["time_s"] = float(np.mean([r["time_s"] for r in rs]))
        wins = [r["dice"]["all"] > ants[(r["moving"], r["fixed"])] for r in rs
                if (r["moving"], r["fixed"]) in ants and meth != "ants"]
        row["wins_vs_ants"] = f"{sum(wins)}/{len(wins)}" if wins else "–"
        rows.append(row)
        fmt = "{:.3f} ± {:.3f}"
        lines.append(
            f"| {meth} | {fmt.format(*row['all'])} | {fmt.format(*row['cortical'])} | "
            f"{fmt.format(*row['subcortical'])} | {row['wins_vs_ants']} | {row['time_s']:.2f} |"
        )
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="brain2d folder")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="output JSON ('' for none)")
    ap.add_argument("--methods", default="none,ncc,mi,ants", help="comma list")
    ap.add_argument("--threads", type=int, default=1, help="torch and ITK threads (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--misalign", type=lambda v: tuple(float(t) for t in v.split(",")), default=None,
        metavar="DEG,MM,SCALE",
        help="first move each moving image (and labels) by a seeded random affine: rotation "
        "±DEG, translation ±MM, scale 1 ± SCALE (pairs that are not pre-aligned)",
    )
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not (data / "images").is_dir():
        raise SystemExit(f"{data}: no images/ folder (the brain2d data set is not here)")
    torch.set_num_threads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    device = torch.device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    notes = []
    if "ants" in methods:
        try:
            import ants  # noqa: F401
        except ImportError:
            methods.remove("ants")
            notes.append("antspyx is not importable: the ANTs row is left out")
    cache = {name: load(data, name) for name in subjects(data)}
    records = []
    for k, (moving, fixed) in enumerate(permutations(sorted(cache), 2)):
        f, flab, geo = cache[fixed]
        m, mlab, _ = cache[moving]
        if args.misalign:
            m, mlab = misalign(m, mlab, k, *args.misalign)
        flab_np, mlab_np = flab[0, 0].numpy(), mlab[0, 0].numpy()
        for meth in methods:
            if meth == "none":
                warped, elapsed, A = mlab_np, 0.0, None
            elif meth == "ants":
                warped, elapsed, A = run_ants(f, m, mlab, geo)
            else:
                warped, elapsed, A = run_ours(meth, f, m, mlab, device)
            dice = pair_dice(warped, flab_np, mlab_np)
            records.append(dict(method=meth, moving=moving, fixed=fixed, dice=dice,
                                time_s=elapsed, affine=A))
            print(f"{moving} -> {fixed} {meth:5s} Dice {dice['all']:.3f} {elapsed:.2f}s",
                  flush=True)
    rows, table = summarise(records, methods)
    print()
    print(table)
    for n in notes:
        print(f"note: {n}")
    if args.json:
        out = dict(
            protocol="brain2d inter-subject, affine only: 20 ordered pairs, labels >= 10 px in "
                     "both, mean per pair, mean ± sd over pairs; labels nearest neighbour",
            misalign=args.misalign, threads=args.threads, device=str(device), table=table,
            rows=rows, notes=notes, records=records,
            versions=dict(nadmm_torch=nt.__version__, torch=torch.__version__,
                          python=platform.python_version()),
        )
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
