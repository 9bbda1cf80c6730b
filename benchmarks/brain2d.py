#!/usr/bin/env python
"""Inter-subject brain MRI benchmark (2D), the protocol of ``shared/data/brain2d/README.md``.

Usage::

    python benchmarks/brain2d.py [--data DIR] [--json OUT.json] [--methods M1,M2,...] [--quick]
        [--subjects 1,2,3] [--cache DIR] [--threads N] [--nadmm-options JSON]

Protocol: every ordered pair (moving, fixed) of distinct subjects in ``--data/images`` (5
subjects: 20 pairs). Each pair is first aligned with ANTs ``Affine`` (Mattes MI, antspyx
defaults, seed 1); the affinely resampled moving image and labels (nearest neighbour) are
cached per pair under ``--cache`` (npz; reruns skip ANTs). Every deformable method then
registers the fixed image to that resampled moving image, on the raw intensities (each
method normalises as it does itself). Methods:

* ``affine``: the affine stage alone (identity deformable step);
* ``nadmm-{fast,balanced,paper,accurate}-{l2,l1}-o{1,2,3}``: :func:`nadmm_torch.register` with the
  preset's defaults, ``spacing=(1, 1)`` (``--nadmm-options`` adds solver overrides, JSON);
* ``demons``: SimpleITK diffeomorphic demons, 2D, in-plane pyramid shrink 4/2/1 with Gaussian
  smoothing, ``--demons-iterations`` (100, 60, 30) and field σ ``--demons-sigma`` 1.0 (the
  data README's reference settings);
* ``syn``: ANTs ``SyNOnly`` (identity start), CC metric radius ``--syn-radius`` 4,
  ``--syn-iterations`` (100, 70, 50), antspyx's other defaults.

Metrics (per pair): Dice of every label with ≥ 10 pixels in both the fixed and the (affinely
resampled) moving labels, mean over those labels; the same over cortical (id ≥ 1000) and
subcortical (0 < id < 1000) labels; % pixels with det(I + ∇d) ≤ 0 of the deformable step;
the wall time of the deformable call. Summaries: mean ± population sd over pairs. Label maps
are warped by the one-hot-linear argmax of :func:`nadmm_torch.ops.warp.warp_labels` over the
labels present (ids remapped to 0 … K−1) for every method alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "brain2d"
DEFAULT_CACHE = REPO / "benchmarks" / "records" / "cache" / "brain2d"
NADMM_METHODS = [
    f"nadmm-{p}-{t}-o{o}"
    for p in ("fast", "balanced", "paper", "accurate")
    for t in ("l2", "l1")
    for o in (1, 2, 3)
]
BASELINES = ["demons", "syn"]
ALL_METHODS = ["affine", *NADMM_METHODS, *BASELINES]
DEFAULT_METHODS = ["affine", "nadmm-fast-l2-o2", "nadmm-paper-l2-o2", "nadmm-accurate-l2-o2",
                   "demons", "syn"]
MIN_PIXELS = 10
CORTICAL = 1000


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder with images/, labels/")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "records" / "brain2d.json"))
    ap.add_argument("--methods", default=None,
                    help=f"comma list (default: {','.join(DEFAULT_METHODS)})")
    ap.add_argument("--quick", action="store_true", help="4 pairs only (a cycle of 4 subjects)")
    ap.add_argument("--subjects", default=None, help="comma list of subject numbers to pair")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="affine-stage cache folder")
    ap.add_argument("--threads", type=int, default=1, help="torch / ITK threads")
    ap.add_argument("--nadmm-options", default="{}", help="JSON dict of solver overrides")
    ap.add_argument("--affine-stage", choices=("ants", "ours"), default="ants",
                    help="ants: every method starts from the ANTs-Affine-resampled moving image "
                    "(the protocol's shared affine); ours: from the raw, unaligned pair, the "
                    "'affine' row is nt.affine and NADMM rows run register(affine=True)")
    ap.add_argument("--demons-iterations", type=_ints, default=(100, 60, 30))
    ap.add_argument("--demons-sigma", type=float, default=1.0, help="field smoothing (pixels)")
    ap.add_argument("--demons-shrink", type=_ints, default=(4, 2, 1))
    ap.add_argument("--syn-iterations", type=_ints, default=(100, 70, 50))
    ap.add_argument("--syn-radius", type=int, default=4, help="CC radius (pixels)")
    return ap.parse_args(argv)


# -- data and the affine stage ------------------------------------------------------------------

def subjects(data: Path) -> dict[str, tuple[Path, Path]]:
    """``{subject id: (image path, label path)}`` from ``images/`` and ``labels/``."""
    if not (data / "images").is_dir():
        raise SystemExit(f"--data: {data} has no images/ folder")
    out = {}
    for img in sorted((data / "images").glob("*.nii.gz")):
        sid = img.name.split("_")[0]
        labels = sorted((data / "labels").glob(f"{sid}_*.nii.gz"))
        if len(labels) != 1:
            raise SystemExit(f"{img}: expected one label file {sid}_*.nii.gz, got {labels}")
        out[sid] = (img, labels[0])
    return out


def select_pairs(ids: list[str], spec: str | None, quick: bool) -> list[tuple[str, str]]:
    """Ordered ``(moving, fixed)`` pairs of distinct subjects (of ``--subjects`` if given)."""
    if spec:
        wanted = set(_ints(spec))
        ids = [s for s in ids if int(re.findall(r"\d+$", s)[0]) in wanted]
    if quick:
        ids = ids[:4]
        return [(ids[i], ids[(i + 1) % len(ids)]) for i in range(len(ids))]
    return [(m, f) for m in ids for f in ids if m != f]


def affine_stages(files: dict, cache: Path) -> dict[tuple[str, str], dict]:
    """:func:`affine_stage` of every ordered pair of distinct subjects."""
    ids = list(files)
    return {p: affine_stage(p, files, cache) for p in select_pairs(ids, None, False)}


def environment(argv: list[str] | None) -> dict:
    """What a record says of the machine and the command that wrote it."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "argv": sys.argv[1:] if argv is None else list(argv)}


def _ants_to_array(img) -> np.ndarray:
    """An antspyx 2D image as a ``(Y, X)`` array (the order SimpleITK and nibabel-free code use)."""
    return np.ascontiguousarray(img.numpy().T)


def raw_stage(pair: tuple[str, str], files: dict) -> dict[str, np.ndarray]:
    """The unaligned pair as :func:`affine_stage` returns it (no resampling, ``seconds`` 0)."""
    import ants

    moving, fixed = pair
    f_img, m_img = ants.image_read(str(files[fixed][0])), ants.image_read(str(files[moving][0]))
    f_lab, m_lab = ants.image_read(str(files[fixed][1])), ants.image_read(str(files[moving][1]))
    return {
        "fixed": _ants_to_array(f_img).astype(np.float32),
        "moving": _ants_to_array(m_img).astype(np.float32),
        "fixed_labels": np.rint(_ants_to_array(f_lab)).astype(np.int64),
        "moving_labels": np.rint(_ants_to_array(m_lab)).astype(np.int64),
        "seconds": np.float64(0.0),
    }


def _our_affine(fixed: np.ndarray, moving: np.ndarray) -> torch.Tensor:
    import nadmm_torch as nt

    f, m = torch.from_numpy(fixed)[None, None], torch.from_numpy(moving)[None, None]
    return nt.affine_to_displacement(nt.affine(f, m, spacing=(1.0, 1.0)), f.shape[2:])


def affine_stage(pair: tuple[str, str], files: dict, cache: Path) -> dict[str, np.ndarray]:
    """ANTs ``Affine`` of the moving subject onto the fixed one, cached as npz.

    Returns ``fixed``, ``moving`` (resampled, float32), ``fixed_labels``, ``moving_labels``
    (resampled, nearest neighbour, int64), all ``(Y, X)``, and ``seconds`` (the ANTs call).
    """
    moving, fixed = pair
    path = cache / f"{moving}__to__{fixed}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    import ants

    f_img, m_img = ants.image_read(str(files[fixed][0])), ants.image_read(str(files[moving][0]))
    f_lab, m_lab = ants.image_read(str(files[fixed][1])), ants.image_read(str(files[moving][1]))
    tmp = tempfile.mkdtemp(prefix="nadmm_affine_")
    try:
        t0 = time.perf_counter()
        reg = ants.registration(f_img, m_img, type_of_transform="Affine", random_seed=1,
                                outprefix=os.path.join(tmp, "aff_"))
        seconds = time.perf_counter() - t0
        lab = ants.apply_transforms(f_img, m_lab, reg["fwdtransforms"],
                                    interpolator="nearestNeighbor")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "fixed": _ants_to_array(f_img).astype(np.float32),
        "moving": _ants_to_array(reg["warpedmovout"]).astype(np.float32),
        "fixed_labels": np.rint(_ants_to_array(f_lab)).astype(np.int64),
        "moving_labels": np.rint(_ants_to_array(lab)).astype(np.int64),
        "seconds": np.float64(seconds),
    }
    cache.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp_path, **out)
    tmp_path.replace(path)  # a crash never leaves a half-written cache entry
    return out


# -- deformable methods: (fixed, moving) (Y, X) float arrays -> (1, 2, Y, X) voxel displacement

def _nadmm(method: str, options: dict) -> Callable:
    _, preset, data_term, order = method.split("-")

    def run(fixed: np.ndarray, moving: np.ndarray) -> torch.Tensor:
        import nadmm_torch as nt

        f = torch.from_numpy(fixed)[None, None]
        m = torch.from_numpy(moving)[None, None]
        return nt.register(f, m, spacing=(1.0, 1.0), preset=preset, data_term=data_term,
                           order=int(order[1:]), **options)

    return run


def _sitk(a: np.ndarray):
    import SimpleITK as sitk

    return sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))  # spacing 1


def demons_2d(fixed, moving, iterations=(100, 60, 30), sigma=1.0, shrink=(4, 2, 1)):
    """SimpleITK diffeomorphic demons on a 2D pair, coarse → fine in-plane pyramid."""
    import SimpleITK as sitk

    from nadmm_torch.baselines import _shrink, itk_field_to_displacement

    f_img, m_img = _sitk(fixed), _sitk(moving)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(float(sigma))
    demons.SetUseImageSpacing(True)
    field = None
    for its, fac in zip(iterations, shrink, strict=True):
        f_l, m_l = _shrink(f_img, (fac, fac)), _shrink(m_img, (fac, fac))
        if field is None:
            field = sitk.Image(f_l.GetSize(), sitk.sitkVectorFloat64)
            field.CopyInformation(f_l)
        else:
            field = sitk.Resample(field, f_l, sitk.Transform(), sitk.sitkLinear, 0.0)
        demons.SetNumberOfIterations(int(its))
        field = demons.Execute(f_l, m_l, field)
    return itk_field_to_displacement(sitk.GetArrayFromImage(field), (1.0, 1.0))


def syn_2d(fixed, moving, iterations=(100, 70, 50), radius=4, grad_step=0.2, flow_sigma=3.0,
           total_sigma=0.0):
    """ANTs ``SyNOnly`` (identity start) with the CC metric on a 2D pair.

    ``grad_step``, ``flow_sigma`` and ``total_sigma`` (pixels) default to antspyx's own defaults,
    so the anchor settings need none of them; ``benchmarks/brain2d_baselines_tune.py`` varies them.
    """
    import ants
    import SimpleITK as sitk

    from nadmm_torch.baselines import itk_field_to_displacement

    f_img = ants.from_numpy(np.ascontiguousarray(fixed.T), origin=(0.0, 0.0), spacing=(1.0, 1.0))
    m_img = ants.from_numpy(np.ascontiguousarray(moving.T), origin=(0.0, 0.0), spacing=(1.0, 1.0))
    tmp = tempfile.mkdtemp(prefix="nadmm_syn2d_")
    try:
        reg = ants.registration(
            f_img, m_img, type_of_transform="SyNOnly", initial_transform="Identity",
            syn_metric="CC", syn_sampling=int(radius),
            reg_iterations=tuple(int(i) for i in iterations), grad_step=float(grad_step),
            flow_sigma=float(flow_sigma), total_sigma=float(total_sigma), random_seed=1,
            outprefix=os.path.join(tmp, "syn_"),
        )
        warps = [t for t in reg["fwdtransforms"] if t.endswith("Warp.nii.gz")]
        if len(warps) != 1:
            raise RuntimeError(f"unexpected SyN transforms {reg['fwdtransforms']}")
        field = sitk.ReadImage(warps[0])
        arr = sitk.GetArrayFromImage(field)  # (Y, X, 2), components (x, y) physical
        direction = np.asarray(field.GetDirection()).reshape(2, 2)
        return itk_field_to_displacement(arr @ direction, (1.0, 1.0))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_method(method: str, args: argparse.Namespace) -> Callable | None:
    ours = args.affine_stage == "ours"
    if method == "affine":
        return _our_affine if ours else None
    if method in NADMM_METHODS:
        return _nadmm(method, {**json.loads(args.nadmm_options), **({"affine": True} if ours
                                                                      else {})})
    if method == "demons":
        return lambda f, m: demons_2d(f, m, args.demons_iterations, args.demons_sigma,
                                      args.demons_shrink)
    if method == "syn":
        return lambda f, m: syn_2d(f, m, args.syn_iterations, args.syn_radius)
    raise SystemExit(f"unknown method {method!r}; known: {', '.join(ALL_METHODS)}")


# -- scoring ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(stage: dict, disp: torch.Tensor | None) -> dict:
    """Dice (all / cortical / subcortical labels) and % folded pixels of one registration."""
    import nadmm_torch as nt
    from nadmm_torch.ops.warp import warp_labels

    fl = torch.from_numpy(stage["fixed_labels"])
    ml = torch.from_numpy(stage["moving_labels"])
    ids, inverse = torch.unique(torch.stack([fl, ml]), return_inverse=True)  # ids 0..K-1
    fl_k, ml_k = inverse[0], inverse[1]
    if disp is None:
        warped, folds = ml_k, 0.0
    else:
        d = disp.detach().to(torch.float32)
        warped = warp_labels(ml_k[None, None], d, num_classes=len(ids))[0, 0]
        folds = float(nt.fold_percent(d)[0])
    per_label = {}
    for k, lab in enumerate(ids.tolist()):
        if lab == 0:
            continue
        if int((fl_k == k).sum()) < MIN_PIXELS or int((ml_k == k).sum()) < MIN_PIXELS:
            continue
        p, t = warped == k, fl_k == k
        per_label[int(lab)] = float(2 * (p & t).sum() / (p.sum() + t.sum()))

    def mean(keys):
        v = [per_label[k] for k in keys]
        return float(np.mean(v)) if v else math.nan

    return {
        "dice": mean(per_label),
        "dice_cortical": mean([k for k in per_label if k >= CORTICAL]),
        "dice_subcortical": mean([k for k in per_label if k < CORTICAL]),
        "n_labels": len(per_label),
        "fold_percent": folds,
        "dice_per_label": per_label,
    }


def summarize(records: list[dict]) -> dict:
    def stat(key):
        v = np.array([r[key] for r in records if not math.isnan(r.get(key, math.nan))])
        return (float(v.mean()), float(v.std())) if len(v) else (math.nan, math.nan)

    out = {"n_pairs": len(records)}
    for key in ("dice", "dice_cortical", "dice_subcortical", "fold_percent", "seconds"):
        out[f"{key}_mean"], out[f"{key}_sd"] = stat(key)
    out["fold_pairs"] = sum(1 for r in records if r["fold_percent"] > 0)
    return out


def markdown_table(summary: dict) -> str:
    lines = [
        "| method | Dice mean ± sd | cortical | subcortical | % det J ≤ 0 | pairs folding |"
        " s/pair |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, s in summary.items():
        if not s["n_pairs"]:
            lines.append(f"| {m} | (no pairs) | | | | | |")
            continue
        aff = m == "affine"
        lines.append(
            f"| {m} | {s['dice_mean']:.3f} ± {s['dice_sd']:.3f} | {s['dice_cortical_mean']:.3f} | "
            f"{s['dice_subcortical_mean']:.3f} | "
            f"{'–' if aff else format(s['fold_percent_mean'], '.4f')} | "
            f"{'–' if aff else s['fold_pairs']} | "
            f"{'–' if aff else format(s['seconds_mean'], '.2f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    files = subjects(Path(args.data))
    pairs = select_pairs(list(files), args.subjects, args.quick)
    methods = [m.strip() for m in (args.methods or ",".join(DEFAULT_METHODS)).split(",")
               if m.strip()]
    runners = {m: make_method(m, args) for m in methods}
    records: dict[str, list[dict]] = {m: [] for m in methods}
    affine_seconds = []
    for moving, fixed in pairs:
        stage = (raw_stage((moving, fixed), files) if args.affine_stage == "ours"
                 else affine_stage((moving, fixed), files, Path(args.cache)))
        affine_seconds.append(float(stage["seconds"]))
        for m, run in runners.items():
            t0 = time.perf_counter()
            disp = None if run is None else run(stage["fixed"], stage["moving"])
            seconds = time.perf_counter() - t0
            rec = evaluate(stage, disp)
            rec.update(moving=moving, fixed=fixed, seconds=seconds if run else 0.0)
            records[m].append(rec)
            print(f"{moving} -> {fixed} {m}: Dice {rec['dice']:.3f} folds "
                  f"{rec['fold_percent']:.4f} {seconds:.2f} s", flush=True)
    summary = {m: summarize(r) for m, r in records.items()}
    table = markdown_table(summary)
    print(table)
    doc = {
        "summary": summary,
        "table": table,
        "pairs": records,
        "config": {
            "data": str(args.data), "pairs": pairs, "methods": methods, "quick": args.quick,
            "threads": args.threads, "nadmm_options": json.loads(args.nadmm_options),
            "affine": ("nt.affine (ncc) inside each method, from the unaligned pair"
                       if args.affine_stage == "ours"
                       else "ANTs Affine (antspyx defaults, Mattes MI, random_seed 1)"),
            "affine_seconds_mean": float(np.mean(affine_seconds)) if affine_seconds else None,
            "demons": {"iterations": list(args.demons_iterations), "sigma": args.demons_sigma,
                       "shrink": list(args.demons_shrink)},
            "syn": {"iterations": list(args.syn_iterations), "cc_radius": args.syn_radius},
        },
        "environment": environment(argv),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
