"""``nadmm-register``: register images on disk (one pair, or a cohort from a CSV file).

One pair::

    nadmm-register FIXED MOVING -o OUTDIR [--moving-labels LAB] [--fixed-labels LAB] [--plot]

writes into ``OUTDIR``:

* ``warped.nii.gz`` — the moving image warped into the fixed image's grid;
* ``warped_labels.nii.gz`` — the moving labels warped (argmax of the warped one-hot), if given;
* ``displacement.nii.gz`` — an ITK displacement field (vector image, LPS mm, on the fixed grid)
  that ``sitk.DisplacementFieldTransform`` and ``antsApplyTransforms`` apply as-is to the
  *original* moving image;
* ``jacobian_determinant.nii.gz`` — ``det(I + ∇d)`` per voxel;
* ``affine.tfm`` — with ``--affine``: the affine stage's transform (ITK text format, fixed →
  moving physical points) that SimpleITK and ANTs read; the displacement includes it;
* ``registration.png`` with ``--plot``;
* ``summary.json`` — settings, metrics (Dice before/after with both label maps, % det J ≤ 0,
  time), versions. Written last: its presence means the pair is complete.

Inputs are anything SimpleITK reads (NIfTI, MHA/MHD, NRRD, …), 2D or 3D. A moving image on
another grid than the fixed one is resampled into the fixed grid through physical space first.

Cohort::

    nadmm-register --pairs pairs.csv -o OUTDIR

with CSV columns ``fixed,moving[,fixed_labels,moving_labels][,fixed_mask][,id]`` (relative
paths are taken from the CSV's folder; UTF-8, with or without Excel's byte-order mark) writes
``OUTDIR/<id>/`` per pair, then ``OUTDIR/summary.csv`` and ``OUTDIR/summary.md``. Without an
``id`` column a pair's id is derived from its inputs (``<moving>_to_<fixed>_<hash of the
paths>``), so inserting or reordering rows keeps every id. The whole CSV is checked before any
pair runs.

Batches: ``--batch-size N`` (default 4 on the CPU, 16 on a GPU) registers up to ``N`` pairs per
solver call, pairs whose registered grid (size and spacing) and mask-or-none agree; a group
is registered once it holds ``N`` pairs, the rest at the end (so at most ``N - 1`` read pairs
per grid wait in memory). Each batch element is solved on its own: a pair's result is the one
it gets alone (to float rounding). With ``--affine`` the affine stage runs pair by pair. If a
batch fails, its pairs are registered again one by one, so the error is reported for the pair
that caused it. A pair's ``time_registration_s`` is its share of its batch's time
(``metrics.batch_size`` in ``summary.json``); the batch size is not part of the resume key.

Resuming: a pair is skipped only if its ``summary.json`` records the same inputs (path, size
and SHA-256 of each file), the same result-defining settings and the same ``--plot``, and all
its outputs are present; otherwise it is registered again (its folder's previous outputs stay
until the new set is complete). ``--force`` registers every pair again.

Outputs appear all at once or not at all: files are written under a hidden temporary folder,
each is verified (complete gzip stream, every byte a NIfTI header announces, the image reads
back), and the set is moved into place at the end, replacing the previous run's set as a whole
(outputs it did not write again are removed; ``summary.json`` is moved last). A failure,
Ctrl-C or SIGTERM removes the temporary folder; one left by a killed process is removed by the
next run into that folder.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._cli_common import Parser as _Parser
from ._cli_common import run_console
from .atomic import Staging, clean_stale
from .checks import one_line as _one_line

PROG = "nadmm-register"
# Every name a run may write into a pair's folder: a new run removes those it did not write.
_KNOWN_OUTPUTS = (
    "warped.nii.gz",
    "warped_labels.nii.gz",
    "displacement.nii.gz",
    "displacement.mha",
    "jacobian_determinant.nii.gz",
    "affine.tfm",
    "registration.png",
    "summary.json",
)


class CLIError(Exception):
    """A user-facing error: printed as one line ``nadmm-register: error: ...``."""


def _add_solver_arguments(p: argparse.ArgumentParser) -> None:
    """The options that define the registration (preset, data term, order, λ, θ, --set)."""
    p.add_argument("--preset", default="fast",
                   help="solver preset: fast (default), balanced (fast + a full-resolution warp), "
                   "paper (the paper's schedule), accurate, "
                   "or a settings file written by nadmm-tune")
    p.add_argument("--preset-file", metavar="JSON",
                   help="a settings file written by nadmm-tune / nadmm_torch.tune (replaces "
                   "--preset); explicit settings below still win over the file's")
    p.add_argument("--data-term", default=None, choices=("l2", "l1"),
                   help="data term (default: l2, or the settings file's)")
    p.add_argument("--order", type=int, default=None,
                   help="regulariser order, an integer >= 1 (default: 2, or the settings file's)")
    p.add_argument("--lambda", dest="lam", type=float,
                   help="data-term weight λ (> 0; larger = less smoothing): one value replaces "
                   "the preset's per-level λ (default: the preset's tuned values); θ is kept")
    p.add_argument("--theta", type=float,
                   help="ADMM penalty θ (> 0; smaller = smoother with capped iterations): one "
                   "value replaces the preset's per-level θ (default: the preset's)")
    p.add_argument("--features", default=None, choices=("none", "mind"),
                   help="what is registered: none (intensities, default) or mind (MIND-SSC "
                   "descriptors, for pairs whose contrasts differ; needs the l2 data term)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other solver setting (repeatable), e.g. --set iterations=5 --set "
        "warps=3,3,0; keys: levels, iterations, warps, tol_admm, tol_warp, accelerated, "
        "restart, restart_eta, safeguard, min_jacobian, boundary (neumann|periodic), normalize "
        "(percentile|minmax|none), lam_scaling (gradient|none), theta_scaling (spectral|none), "
        "anisotropic_pyramid, "
        "min_level_size, frozen_axes, features (none|mind)",
    )
    p.add_argument(
        "--affine",
        nargs="?",
        const="ncc",
        default=None,
        choices=("ncc", "mi"),
        metavar="SIMILARITY",
        help="align affinely first (nadmm_torch.affine), with ncc (default) or mi (mutual "
        "information, for differing contrasts); also writes affine.tfm (ITK transform)",
    )
    p.add_argument(
        "--inverse", action="store_true",
        help="also write inverse_displacement.nii.gz (nadmm_torch.invert: maps moving-space "
        "points to fixed space; apply it with nadmm-apply --reference moving ...)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=(
            "Diffeomorphic registration of a moving image to a fixed image with Nesterov-ADMM "
            "(nadmm_torch). Reads NIfTI, MHA/MHD, NRRD and whatever else SimpleITK reads."
        ),
        epilog=(
            "Outputs: warped.nii.gz, warped_labels.nii.gz (with --moving-labels), "
            "displacement.nii.gz (ITK displacement field, LPS mm, for "
            "sitk.DisplacementFieldTransform / antsApplyTransforms), "
            "jacobian_determinant.nii.gz, registration.png (--plot), summary.json. "
            "Cohort mode: --pairs CSV with columns fixed,moving[,fixed_labels,moving_labels]"
            "[,fixed_mask][,id] "
            "(ids default to <moving>_to_<fixed>_<hash of the paths>), registered --batch-size "
            "pairs of one grid at a time; a pair is skipped only if "
            "its stored result was made from the same input files (SHA-256) and settings, else "
            "it is registered again. Every output is verified after writing and the output set "
            "replaces the previous one as a whole."
        ),
    )
    p.add_argument("fixed", nargs="?", help="fixed (reference) image")
    p.add_argument("moving", nargs="?", help="moving image, warped onto the fixed image")
    p.add_argument("-o", "--outdir", required=True, help="output folder (created if missing)")
    p.add_argument("--pairs", metavar="CSV", help="cohort mode: CSV of pairs (see below)")
    p.add_argument(
        "--batch-size", type=_batch_size_arg, default=None, metavar="N",
        help="cohort mode: register up to N pairs per solver call (default: 4 on the CPU, 16 "
        "on a GPU); pairs are batched with others of the same registered grid size and "
        "spacing (and mask or none), each pair's result is the one it gets alone; 1 registers "
        "them one by one",
    )
    p.add_argument("--moving-labels", metavar="LAB", help="label map of the moving image")
    p.add_argument(
        "--fixed-labels", metavar="LAB", help="label map of the fixed image (Dice is reported)"
    )
    p.add_argument(
        "--fixed-mask", metavar="MASK",
        help="mask of the fixed image: the images are compared only where it is nonzero "
        "(elsewhere the regulariser carries the field)",
    )
    _add_solver_arguments(p)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--plot", action="store_true", help="also write registration.png")
    p.add_argument(
        "--plot-slice", type=_slice_index, metavar="N",
        help="the slice of a 3D volume registration.png shows (0-based, along the first array "
        "axis, Z; implies --plot): 0 to the number of slices - 1, checked once the fixed image "
        "is read (default: the slice with the most fixed-label voxels, else the middle one)",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        metavar="MODE",
        help="torch.compile the solver (optional MODE, e.g. reduce-overhead: CUDA graphs on a "
        "GPU); pays off over many pairs of one shape, the first pair per shape compiles",
    )
    p.add_argument(
        "--force", action="store_true",
        help="cohort mode: register every pair again, even those whose stored result was made "
        "from the same inputs and settings (those are skipped otherwise)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or messages")
    p.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    return p


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("nadmm-torch")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        try:
            import nadmm_torch

            return str(getattr(nadmm_torch, "__version__", "unknown"))
        except Exception:  # noqa: BLE001
            return "unknown"


def _versions() -> dict[str, str]:
    import SimpleITK as sitk
    import torch

    return {
        "nadmm_torch": _package_version(),
        "torch": torch.__version__,
        "SimpleITK": sitk.Version_VersionString(),
        "python": platform.python_version(),
    }


def _slice_index(text: str) -> int:
    """``--plot-slice``: a non-negative integer (its upper bound is checked once the fixed image
    is read, :func:`_check_plot_slice`)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a slice index (an integer >= 0), got {text!r}")
    return value


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if "," in text:
        return tuple(_parse_value(t) for t in text.split(",") if t.strip())
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key.isidentifier():
            raise CLIError(f"--set: bad setting name {key!r}")
        out[key] = _parse_value(value)
    return out


def _device(name: str):
    """The torch device of ``--device`` (see :func:`nadmm_torch.checks.resolve_device`)."""
    from .checks import resolve_device

    try:
        return resolve_device(name)
    except (TypeError, ValueError) as exc:
        raise CLIError(_one_line(exc)) from None


class _Log:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(f"{PROG}: {message}", file=sys.stderr)

    def out(self, message: str) -> None:
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)


def _prepare_outdir(outdir: Path) -> bool:
    """Create ``outdir`` if needed and check it is writable; returns whether it was created."""
    if outdir.exists() and not outdir.is_dir():
        raise CLIError(f"output path '{outdir}' exists and is not a directory")
    created = False
    if not outdir.exists():
        try:
            outdir.mkdir(parents=True)
        except OSError as exc:
            raise CLIError(
                f"cannot create output directory '{outdir}': {exc.strerror or exc}"
            ) from None
        created = True
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise CLIError(f"output directory '{outdir}' is not writable")
    try:
        probe = tempfile.mkdtemp(prefix=".nadmm-probe-", dir=outdir)
        os.rmdir(probe)
    except OSError as exc:
        raise CLIError(f"output directory '{outdir}' is not writable: {exc.strerror}") from None
    clean_stale(outdir)  # staging folders of killed runs (their process is gone)
    return created


# --------------------------------------------------------------------------------------------
# One pair
# --------------------------------------------------------------------------------------------


@dataclass
class PairSpec:
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    id: str | None = None
    fixed_mask: Path | None = None  # weights the data term; nonzero voxels count


@dataclass
class Settings:
    preset: str = "fast"
    data_term: str | None = None  # None: l2, or the settings file's
    order: int | None = None  # None: 2, or the settings file's
    lam: float | None = None
    theta: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    plot: bool = False
    plot_slice: int | None = None  # the slice registration.png shows (None: chosen by viz)
    compile: bool | str = False
    affine: str | None = None
    inverse: bool = False
    config: Any = None  # the validated SolverConfig (set by _check_settings)

    def solver_kwargs(self, execution: bool = True) -> dict[str, Any]:
        """The keyword arguments of ``register``; ``execution=False`` leaves out how it runs
        (``compile``), keeping only what defines the result."""
        kw: dict[str, Any] = dict(preset=self.preset)
        if self.data_term is not None:
            kw["data_term"] = self.data_term
        if self.order is not None:
            kw["order"] = self.order
        if self.lam is not None:
            kw["lam"] = self.lam
        if self.theta is not None:
            kw["theta"] = self.theta
        kw.update(self.overrides)
        if execution and self.compile is not False:
            kw["compile"] = self.compile
        return kw


def _check_settings(settings: Settings) -> None:
    """Fail early (before any image is read) on an unknown preset or solver option. The
    settings are validated once, here, into ``settings.config``, which every pair then passes
    to ``register`` as its ready preset."""
    import nadmm_torch as nt

    kwargs = settings.solver_kwargs(execution=False)
    try:
        settings.config = nt.SolverConfig.from_preset(
            kwargs.pop("preset"), kwargs.pop("data_term", None), kwargs.pop("order", None),
            **kwargs,
        )
        nt.NADMMRegistration(settings.config, compile=settings.compile)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"registration settings: {_one_line(exc)}") from None


def _read(kind: str, path: Path, labels: bool = False):
    from .io import read_image, read_labels

    try:
        return (read_labels if labels else read_image)(path)
    except FileNotFoundError:
        raise CLIError(f"{kind} not found: '{path}'") from None
    except (ValueError, OSError) as exc:
        raise CLIError(f"{kind}: {_one_line(exc)}") from None


def _onto_fixed(kind, tensor, geometry, fixed_geometry, log, label=False, quiet_same=True):
    from .io import resample_to

    if geometry.ndim != fixed_geometry.ndim:
        raise CLIError(
            f"dimension mismatch: the fixed image is {fixed_geometry.ndim}D but the {kind} is"
            f" {geometry.ndim}D"
        )
    if geometry.matches(fixed_geometry):
        return tensor, False
    how = "nearest neighbour" if label else "linear"
    log.info(
        f"{kind} grid ({geometry.describe()}) differs from the fixed grid "
        f"({fixed_geometry.describe()}): resampling the {kind} into the fixed grid "
        f"(physical space, {how})"
    )
    out = resample_to(tensor, fixed_geometry, geometry=geometry, label=label)
    if not label and tensor.abs().max() > 0 and out.abs().max() == 0:
        raise CLIError(f"the {kind} does not overlap the fixed image in physical space")
    return out, True


def _dice_dict(pred, true, labels) -> dict[str, float | None]:
    from .metrics import dice

    values = dice(pred, true, labels=labels)[0].tolist()
    out: dict[str, float | None] = {
        str(lab): (None if math.isnan(v) else float(v))
        for lab, v in zip(labels, values, strict=True)
    }
    finite = [v for v in values if not math.isnan(v)]
    out["mean"] = float(sum(finite) / len(finite)) if finite else None
    return out


def _stage_bar(total: int, disable: bool | None, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        disable=disable,
        file=sys.stderr,
        leave=False,
        bar_format="{desc} {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]",
    )


class _Ticker:
    """Refreshes a progress bar once a second (its elapsed time) while a long step runs."""

    def __init__(self, bar, interval: float = 1.0) -> None:
        self.bar, self.interval = bar, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.bar.refresh()

    def __enter__(self) -> _Ticker:
        if not self.bar.disable:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def _stage_image(staging, name: str, image, geometry) -> None:
    from .io import write_image

    write_image(image, geometry, staging.path(name))  # atomic and verified by itself
    staging.written(name)


@dataclass
class _Inputs:
    """A pair read from disk, on the fixed grid (CPU tensors ``(1, 1, *S)``)."""

    fixed: Any
    moving: Any
    fixed_labels: Any
    moving_labels: Any
    geometry: Any  # the fixed image's Geometry
    resampled: bool  # the moving image was resampled into the fixed grid
    squeeze: int | None  # the axis of a one-slice 3D file, registered in 2D
    fixed_mask: Any = None  # (1, 1, *S) bool, or None


@dataclass
class _Result:
    """A registration and what is derived from it (CPU tensors on the file's grid)."""

    displacement: Any  # (1, ndim, *S) float32, voxels
    affine: Any  # (1, ndim, ndim + 1) of the affine stage, or None
    warped: Any
    warped_labels: Any
    jacobian: Any  # (1, *S)
    metrics: dict[str, Any]


def _read_inputs(spec: PairSpec, log: _Log) -> _Inputs:
    """Read the images and label maps of ``spec`` and bring them onto the fixed grid."""
    fixed, fgeo = _read("fixed image", spec.fixed)
    moving, mgeo = _read("moving image", spec.moving)
    moving, resampled = _onto_fixed("moving image", moving, mgeo, fgeo, log)
    labels = {}
    for kind, path in (("moving labels", spec.moving_labels), ("fixed labels", spec.fixed_labels)):
        if path is not None:
            lab, geo = _read(kind, path, labels=True)
            labels[kind], _ = _onto_fixed(kind, lab, geo, fgeo, log, label=True)
    # A 3D file holding one slice (a 2D image saved as 3D) is registered in 2D.
    flat = [i for i, n in enumerate(fgeo.shape) if n == 1]
    squeeze = flat[0] if fgeo.ndim == 3 and len(flat) == 1 else None
    if squeeze is not None:
        log.info("the images hold a single slice: registering in 2D")
    if any(n < 2 for i, n in enumerate(fgeo.shape) if i != squeeze):
        raise CLIError(f"the fixed image is too small to register ({fgeo.describe()})")
    mask = None
    if spec.fixed_mask is not None:
        lab, geo = _read("fixed mask", spec.fixed_mask, labels=True)
        mask = _onto_fixed("fixed mask", lab, geo, fgeo, log, label=True)[0] != 0
    return _Inputs(fixed, moving, labels.get("fixed labels"), labels.get("moving labels"),
                   fgeo, resampled, squeeze, mask)


def _solver_tensors(inputs: _Inputs, device):
    """``(fixed, moving, mask or None, spacing)`` of a pair as the solver takes them: on
    ``device``, a one-slice volume's slice axis dropped, the spacing of the kept axes."""
    geo, squeeze = inputs.geometry, inputs.squeeze
    tensors = [inputs.fixed, inputs.moving, inputs.fixed_mask]
    tensors = [None if t is None else t.to(device) for t in tensors]
    if squeeze is not None:
        tensors = [None if t is None else t.squeeze(2 + squeeze) for t in tensors]
    spacing = tuple(h for i, h in enumerate(geo.array_spacing) if i != squeeze)
    return (*tensors, spacing)


def _batch_key(inputs: _Inputs) -> tuple:
    """Pairs with equal keys are registered in one batch: the registered grid (shape, spacing,
    dtype) and whether a mask weights the data term (every other setting is the cohort's)."""
    geo, squeeze = inputs.geometry, inputs.squeeze
    shape = tuple(n for i, n in enumerate(geo.shape) if i != squeeze)
    spacing = tuple(h for i, h in enumerate(geo.array_spacing) if i != squeeze)
    return shape, spacing, str(inputs.fixed.dtype), inputs.fixed_mask is not None


def _register_kwargs(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of ``nadmm_torch.register`` for ``settings`` (the validated config
    as a ready preset where there is one)."""
    if settings.config is None:
        return settings.solver_kwargs()
    return {"preset": settings.config,
            **({"compile": settings.compile} if settings.compile is not False else {})}


def _solve_batch(batch: list[_Inputs], settings: Settings, device, bar):
    """Register pairs of one :func:`_batch_key` together, in one call of
    ``nadmm_torch.register`` on ``(B, 1, *S)`` (each batch element is solved on its own: the
    result of a pair does not depend on the others). The affine stage, with ``--affine``,
    runs pair by pair. Returns ``((displacements, affines), seconds)``: per pair its
    displacement ``(1, ndim, *S)`` on the file's grid and its affine (or None); the seconds
    are the whole batch's."""
    import torch

    import nadmm_torch as nt

    parts = [_solver_tensors(x, device) for x in batch]
    f_dev = torch.cat([p[0] for p in parts])
    m_dev = torch.cat([p[1] for p in parts])
    spacing = parts[0][3]
    kwargs = _register_kwargs(settings)
    if parts[0][2] is not None:
        kwargs["mask"] = torch.cat([p[2] for p in parts])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    A = None
    try:
        with _Ticker(bar):
            if settings.affine is not None:
                A = torch.cat([nt.affine(f_dev[i:i + 1], m_dev[i:i + 1], spacing=spacing,
                                         similarity=settings.affine) for i in range(len(batch))])
                kwargs["initial_displacement"] = nt.affine_to_displacement(A, f_dev.shape[2:])
            disp = nt.register(f_dev, m_dev, spacing=spacing, **kwargs)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"registration settings: {_one_line(exc)}") from None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    disp = disp.detach().to("cpu", torch.float32)
    if tuple(disp.shape) != (len(batch), len(spacing), *f_dev.shape[2:]):
        raise CLIError(f"the solver returned a displacement of shape {tuple(disp.shape)}")
    disps = [_on_file_grid(disp[i:i + 1], x) for i, x in enumerate(batch)]
    affines = [None if A is None else
               _full_affine(A[i:i + 1].detach().cpu().double(), x.squeeze, x.geometry.ndim)
               for i, x in enumerate(batch)]
    return (disps, affines), seconds


def _on_file_grid(disp, inputs: _Inputs):
    """A pair's displacement ``(1, ndim, *S)`` on the file's grid (a one-slice volume's field
    gets a zero component along its slice axis)."""
    import torch

    geo, squeeze = inputs.geometry, inputs.squeeze
    if squeeze is not None and disp.shape[1] == 2:
        kept = [i for i in range(geo.ndim) if i != squeeze]
        full = torch.zeros(1, 3, *geo.shape)
        full[:, kept] = disp.unsqueeze(2 + squeeze)
        disp = full
    if tuple(disp.shape) != (1, geo.ndim, *geo.shape):
        raise CLIError(f"the solver returned a displacement of shape {tuple(disp.shape)}")
    return disp


def _score(inputs: _Inputs, disp, log: _Log) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(warped image, warped labels or None, det J (1, *S), metrics)`` of a displacement."""
    import torch

    import nadmm_torch as nt

    mlab, flab = inputs.moving_labels, inputs.fixed_labels
    warped = nt.warp(inputs.moving, disp)
    wlab = nt.warp_labels(mlab, disp) if mlab is not None else None
    detj = nt.jacobian_determinant(disp)
    h = torch.tensor(inputs.geometry.array_spacing).view(-1, *([1] * inputs.geometry.ndim))
    metrics: dict[str, Any] = {
        "fold_percent": float(nt.fold_percent(disp)[0]),
        "jacobian_determinant_min": float(detj.min()),
        "jacobian_determinant_max": float(detj.max()),
        "displacement_max_mm": float((disp[0] * h).norm(dim=0).max()),
    }
    if flab is not None and mlab is not None:
        labels = sorted(set(torch.unique(flab).tolist()) | set(torch.unique(mlab).tolist()))
        labels = tuple(int(v) for v in labels if v != 0)
        if labels:
            metrics["dice_labels"] = list(labels)
            metrics["dice_before"] = _dice_dict(mlab, flab, labels)
            metrics["dice_after"] = _dice_dict(wlab, flab, labels)
    elif flab is not None:
        log.info("--fixed-labels without --moving-labels: no Dice to report")
    return warped, wlab, detj, metrics


def _stage_outputs(staging, spec: PairSpec, inputs: _Inputs, result: _Result,
                   settings: Settings, log: _Log, bar) -> None:
    """Write the images (and the affine, the figure) of a pair into ``staging``."""
    from .io import displacement_to_itk, write_affine

    geo = inputs.geometry
    _stage_image(staging, "warped.nii.gz", result.warped, geo)
    if result.warped_labels is not None:
        _stage_image(staging, "warped_labels.nii.gz", result.warped_labels, geo)
    field = displacement_to_itk(result.displacement, geo)
    _stage_image(staging, "displacement.nii.gz", field, None)
    if inputs.squeeze is not None:
        # ITK's NIfTI reader loads a vector image with one slice as 2D (with 3 components),
        # which DisplacementFieldTransform then rejects; MetaImage keeps it 3D.
        _stage_image(staging, "displacement.mha", field, None)
        log.info(
            "single-slice volume: also writing displacement.mha (ITK reads a one-slice vector "
            "NIfTI as 2D; use the .mha with SimpleITK/ANTs)"
        )
    _stage_image(staging, "jacobian_determinant.nii.gz", result.jacobian[:, None], geo)
    if result.affine is not None:
        staging.add("affine.tfm", lambda p: write_affine(result.affine, geo, p))
    if settings.inverse:
        _stage_inverse(staging, inputs, result)
    bar.update(1)
    if settings.plot:
        bar.set_postfix_str("plotting")
        from .viz import plot_registration

        staging.add("registration.png", lambda p: plot_registration(
            inputs.fixed, inputs.moving, result.warped, result.displacement,
            fixed_labels=inputs.fixed_labels, warped_labels=result.warped_labels,
            moving_labels=inputs.moving_labels, spacing=geo.array_spacing, path=p,
            title=f"{spec.moving.name} → {spec.fixed.name}", slice_index=settings.plot_slice,
        ))
    bar.update(1)


def _stage_inverse(staging, inputs: _Inputs, result: _Result) -> None:
    """``inverse_displacement.nii.gz`` (and ``.mha`` for a one-slice volume), with the inverse
    consistency residuals (voxels) in the pair's metrics."""
    import nadmm_torch as nt

    from .io import displacement_to_itk
    from .ops.inverse import inverse_residuals

    inverse = nt.invert(result.displacement)
    right, left = inverse_residuals(result.displacement, inverse)
    for name, r in (("d_of_inverse", right), ("inverse_of_d", left)):  # (1, *S) norms
        norm = r.flatten().double()
        result.metrics[f"inverse_residual_{name}_mean"] = float(norm.mean())
        result.metrics[f"inverse_residual_{name}_p99"] = float(norm.kthvalue(
            max(1, round(0.99 * norm.numel()))).values)
    field = displacement_to_itk(inverse, inputs.geometry)
    _stage_image(staging, "inverse_displacement.nii.gz", field, None)
    if inputs.squeeze is not None:
        _stage_image(staging, "inverse_displacement.mha", field, None)


def _summary(spec: PairSpec, inputs: _Inputs, result: _Result, settings: Settings, device,
             outputs: list[str], resume_key: dict[str, Any]) -> dict[str, Any]:
    """The contents of ``summary.json``."""
    return {
        "id": spec.id,
        "inputs": {k: (str(getattr(spec, k)) if getattr(spec, k) else None) for k in _INPUTS},
        "moving_resampled_to_fixed_grid": inputs.resampled,
        "fixed_geometry": inputs.geometry.to_dict(),
        "settings": {**settings.solver_kwargs(), "device": str(device),
                     "affine": settings.affine},
        "metrics": result.metrics,
        "outputs": outputs + ["summary.json"],
        "displacement_convention": (
            "displacement.nii.gz: ITK displacement field on the fixed grid, vectors in "
            "LPS mm; output(p) = moving(p + v(p)) (sitk.DisplacementFieldTransform, "
            "antsApplyTransforms)"
        ),
        "versions": _versions(),
        "resume_key": resume_key,
    }


def register_pair(
    spec: PairSpec, target: Path, settings: Settings, log: _Log, show_progress: bool = True,
    resume_key: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Register one pair and write its outputs into ``target`` (all at once). Returns summary.

    ``resume_key`` (inputs' fingerprints and settings, see :func:`_resume_key`) is stored in
    ``summary.json``; it is computed here if not given."""
    t_start = time.perf_counter()
    device = _device(settings.device)
    if resume_key is None:
        resume_key = _resume_key(spec, settings)
    # Progress bars only on a terminal (None: tqdm disables itself on a non-TTY).
    bar = _stage_bar(6, None if show_progress else True, desc=f"{PROG} {spec.id or ''}".strip())
    try:
        bar.set_postfix_str("reading")
        inputs = _read_inputs(spec, log)
        _check_plot_slice(settings, inputs)
        bar.update(1)
        bar.set_postfix_str(f"registering on {device}")
        (disps, affines), seconds = _solve_compiled([inputs], settings, device, log, bar)
        bar.update(1)
        solved = _Solved(disps[0], affines[0], seconds, 1)
        summary = _finish_pair(spec, target, inputs, solved, settings, device, log, bar,
                               resume_key, t_start)
    finally:
        bar.close()
    return summary


@dataclass
class _Solved:
    """A pair's registration: displacement and affine on the file's grid, the seconds of the
    solver call that registered it and the number of pairs that call registered."""

    displacement: Any
    affine: Any
    seconds: float
    batch: int


def _solve_compiled(batch: list[_Inputs], settings: Settings, device, log: _Log, bar):
    """:func:`_solve_batch`, with the ``--compile`` notices around the first call per batch
    size and shape."""
    compiling = _compile_notice(settings, batch[0], device, log, len(batch))
    out, seconds = _solve_batch(batch, settings, device, bar)
    _compiled(compiling, seconds, log)
    return out, seconds


def _finish_pair(spec: PairSpec, target: Path, inputs: _Inputs, solved: _Solved,
                 settings: Settings, device, log: _Log, bar, resume_key: dict[str, Any],
                 t_start: float) -> dict[str, Any]:
    """Score a registered pair and write its outputs into ``target`` (all at once); returns
    its summary. A pair registered in a batch of ``B`` is given ``1 / B`` of the batch's time
    (``time_registration_s``; ``metrics.batch_size`` says ``B``)."""
    bar.set_postfix_str("warping")
    disp, A = solved.displacement, solved.affine
    warped, wlab, detj, metrics = _score(inputs, disp, log)
    metrics["time_registration_s"] = solved.seconds / solved.batch
    metrics["batch_size"] = solved.batch
    if A is not None:
        metrics["affine_voxel_matrix"] = A[0].tolist()
    result = _Result(disp, A, warped, wlab, detj, metrics)
    bar.update(1)
    bar.set_postfix_str("writing")
    target.parent.mkdir(parents=True, exist_ok=True)
    base = target if target.is_dir() else target.parent
    with Staging(base, target=target) as staging:
        _stage_outputs(staging, spec, inputs, result, settings, log, bar)
        metrics["time_total_s"] = time.perf_counter() - t_start
        summary = _summary(spec, inputs, result, settings, device, staging.names(), resume_key)
        staging.add("summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
        # The new set replaces the old one whole: outputs of a previous run that this one
        # did not write (labels, plot) are removed; summary.json moves in last.
        staging.commit(target, replaces=_KNOWN_OUTPUTS, last=("summary.json",))
    bar.update(1)
    return summary


def _check_plot_slice(settings: Settings, inputs: _Inputs) -> None:
    """``--plot-slice`` names a slice of the fixed image (checked before registering)."""
    k, geo = settings.plot_slice, inputs.geometry
    if k is None:
        return
    if geo.ndim == 2:
        raise CLIError(f"--plot-slice {k}: the images are 2D ({geo.describe()}); there is no "
                       "slice to choose")
    if k >= geo.shape[0]:
        raise CLIError(f"--plot-slice {k}: expected a slice index in 0..{geo.shape[0] - 1} (the "
                       f"fixed image has {geo.shape[0]} slices along its first array axis, Z)")


# (compile mode, device, registered batch size and shape) compiled in this process:
# torch.compile keeps its compiled code per process, so only the first call of each compiles.
_COMPILED: set[tuple[str, str, tuple[int, ...]]] = set()


def _compile_notice(settings: Settings, inputs: _Inputs, device, log: _Log, batch: int = 1):
    """With ``--compile``, before the first registration of a shape (and batch size): say that
    it compiles; returns the key to pass to :func:`_compiled` after it (``None``: nothing to
    report)."""
    if settings.compile is False:
        return None
    shape = tuple(n for i, n in enumerate(inputs.geometry.shape) if i != inputs.squeeze)
    key = (str(settings.compile), str(device), (batch, *shape))
    if key in _COMPILED:
        return None
    log.info(f"compiling the solver for shape {_shape_text(key[2])} on {device}; the "
             "first call takes tens of seconds to minutes")
    return key


def _shape_text(batch_shape: tuple[int, ...]) -> str:
    """``10x128x128``, or ``10x128x128 (batch of 4)``."""
    batch, shape = batch_shape[0], batch_shape[1:]
    return "x".join(map(str, shape)) + (f" (batch of {batch})" if batch > 1 else "")


def _compiled(key, seconds: float, log: _Log) -> None:
    """After the registration that compiled ``key``'s shape: how long it took."""
    if key is None:
        return
    _COMPILED.add(key)
    log.info(f"the first call for shape {_shape_text(key[2])} took {seconds:.1f} s, "
             "compilation included; later pairs of this shape reuse the compiled solver")


def _full_affine(A, squeeze: int | None, ndim: int):
    """The affine ``(1, n, n + 1)`` on the file's grid: a 2D affine of a one-slice volume gets
    the identity along the slice axis."""
    if squeeze is None:
        return A
    import torch

    kept = [i for i in range(ndim) if i != squeeze]
    full = torch.zeros(1, ndim, ndim + 1, dtype=A.dtype)
    full[0, squeeze, squeeze] = 1.0
    for r, i in enumerate(kept):
        full[0, i, kept] = A[0, r, :-1]
        full[0, i, ndim] = A[0, r, -1]
    return full


def _report(summary: dict[str, Any], target: Path, log: _Log) -> None:
    m = summary["metrics"]
    if "dice_after" in m:
        b, a = m["dice_before"]["mean"], m["dice_after"]["mean"]
        labs = ",".join(str(v) for v in m["dice_labels"])
        if b is not None and a is not None:
            log.out(f"Dice (labels {labs}, mean): {b:.3f} -> {a:.3f}")
    log.out(
        f"det J <= 0: {m['fold_percent']:.3f} % of voxels"
        f" (min det J {m['jacobian_determinant_min']:.3f})"
    )
    device = summary["settings"]["device"]
    log.out(f"registration time: {m['time_registration_s']:.2f} s on {device}")
    log.out(f"outputs: {target}/ ({', '.join(summary['outputs'])})")


# --------------------------------------------------------------------------------------------
# Cohort
# --------------------------------------------------------------------------------------------

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ID_MAX = 120
_COHORT_FILES = ("summary.csv", "summary.md")  # what the cohort writes beside the pair folders
_INPUTS = ("fixed", "moving", "fixed_labels", "moving_labels")


def _stem(path: Path) -> str:
    name = path.name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    if "." in name[1:]:
        name = name.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:40] or "image"


def derived_id(spec: PairSpec) -> str:
    """The id of a pair without one: ``<moving stem>_to_<fixed stem>_<hash>``, the hash being
    the first 8 hex digits of the SHA-1 of its four paths. It follows the inputs, not the row:
    reordering or inserting rows keeps every pair's id (and so its stored result)."""
    text = "\n".join(str(getattr(spec, k) or "") for k in _INPUTS)
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{_stem(spec.moving)}_to_{_stem(spec.fixed)}_{digest}"


def _check_id(pid: str, where: str) -> None:
    if not _ID_RE.match(pid) or len(pid) > _ID_MAX:
        raise CLIError(
            f"{where}: id {pid!r} must be letters, digits, '.', '_' or '-', start with a letter"
            f" or digit and have at most {_ID_MAX} characters (it names the pair's folder)"
        )
    if pid.lower() in _COHORT_FILES:
        raise CLIError(
            f"{where}: id {pid!r} is the name of a file the cohort writes"
            f" ({', '.join(_COHORT_FILES)}); choose another id"
        )


def _csv_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(line number, {column: value})`` of every data row; the header's names lower-cased."""
    if csv_path.is_dir():
        raise CLIError(f"pairs file '{csv_path}' is a directory; expected a CSV file")
    if not csv_path.is_file():
        raise CLIError(f"pairs file not found: '{csv_path}'")
    rows = []
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, part of no column name.
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise CLIError(f"pairs file '{csv_path}' is empty")
            names = [n.strip().lower() for n in header]
            repeated = sorted({n for n in names if n and names.count(n) > 1})
            if repeated:
                raise CLIError(f"pairs file '{csv_path}' repeats column(s) {', '.join(repeated)}")
            missing = {"fixed", "moving"} - set(names)
            if missing:
                raise CLIError(
                    f"pairs file '{csv_path}' lacks column(s) {', '.join(sorted(missing))}"
                    f" (header: {','.join(header)}; expected"
                    " fixed,moving[,fixed_labels,moving_labels][,id])"
                )
            for fields in reader:
                if len(fields) > len(names) and any(f.strip() for f in fields[len(names):]):
                    raise CLIError(
                        f"pairs file '{csv_path}', line {reader.line_num}: {len(fields)} fields"
                        f" but the header has {len(names)} columns; quote a value that holds"
                        " a comma"
                    )
                rows.append((reader.line_num, {n: f.strip() for n, f in zip(names, fields) if n}))
    except UnicodeDecodeError:
        raise CLIError(f"pairs file '{csv_path}' is not a UTF-8 text CSV file") from None
    except csv.Error as exc:
        raise CLIError(f"pairs file '{csv_path}': {exc}") from None
    except OSError as exc:
        raise CLIError(f"cannot read pairs file '{csv_path}': {exc.strerror or exc}") from None
    return rows


def read_pairs(csv_path: Path) -> list[PairSpec]:
    """Parse a pairs CSV (columns fixed, moving[, fixed_labels, moving_labels][, id]).

    Every row is checked before anything runs: required values, the number of fields, ids
    (given or :func:`derived_id`) that are valid folder names, unique (ignoring case) and not
    a name the cohort itself writes. Errors name the file and line.
    """
    base = csv_path.resolve().parent if csv_path.is_file() else csv_path.parent

    def path(v: str) -> Path | None:
        if not v:
            return None
        p = Path(v).expanduser()
        return p if p.is_absolute() else base / p

    specs: list[PairSpec] = []
    seen: dict[str, int] = {}
    for line, row in _csv_rows(csv_path):
        if not any(row.values()):
            continue
        where = f"pairs file '{csv_path}', line {line}"
        if not row.get("fixed") or not row.get("moving"):
            raise CLIError(f"{where}: fixed and moving are required")
        spec = PairSpec(*(path(row.get(k, "")) for k in _INPUTS))
        spec.fixed_mask = path(row.get("fixed_mask", ""))
        spec.id = row.get("id") or derived_id(spec)
        _check_id(spec.id, where)
        if spec.id.lower() in seen:
            raise CLIError(
                f"{where}: duplicate id {spec.id!r} (line {seen[spec.id.lower()]} has it too"
                + (")" if row.get("id") else "; the same pair twice)")
            )
        seen[spec.id.lower()] = line
        specs.append(spec)
    if not specs:
        raise CLIError(f"pairs file '{csv_path}' has no pairs")
    return specs


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def _fingerprint(path: Path | None, cache: dict[str, Any]) -> dict[str, Any] | None:
    """Path, size and SHA-256 of an input file (``None`` for an absent optional input)."""
    if path is None:
        return None
    key = str(path)
    if key not in cache:
        digest, size = hashlib.sha256(), 0
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            cache[key] = {"path": key, "size": size, "sha256": digest.hexdigest()}
        except OSError:
            cache[key] = {"path": key, "unreadable": True}
    return cache[key]


def _resume_key(
    spec: PairSpec, settings: Settings, cache: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a stored result must have been made from to be reused: each input's path, size and
    SHA-256, the settings that define the result, and whether a plot was asked for. Returned
    in the form it takes in ``summary.json`` (JSON round trip)."""
    cache = {} if cache is None else cache
    key = {
        "inputs": {k: _fingerprint(getattr(spec, k), cache) for k in _INPUTS},
        "fixed_mask": _fingerprint(spec.fixed_mask, cache),
        "settings": settings.solver_kwargs(execution=False),
        "preset_file": (_fingerprint(Path(settings.preset), cache)
                        if Path(settings.preset).is_file() else None),
        "affine": settings.affine,
        "inverse": bool(settings.inverse),
        "plot": bool(settings.plot) and (
            {"slice": settings.plot_slice} if settings.plot_slice is not None else True),
    }
    return json.loads(json.dumps(key))


def _stored_result(target: Path, key: dict[str, Any]) -> tuple[dict | None, str]:
    """``(summary, "")`` if ``target`` holds a complete result made from ``key``'s inputs and
    settings, else ``(None, why not)``."""
    try:
        summary = json.loads((target / "summary.json").read_text())
    except FileNotFoundError:
        return None, "not registered yet"
    except (OSError, ValueError):
        return None, "unreadable summary.json"
    stored = summary.get("resume_key") if isinstance(summary, dict) else None
    if not isinstance(stored, dict):
        return None, "the stored result does not record what it was made from"
    differ = [k for k in key if k != "inputs" and stored.get(k) != key[k]]
    if differ:  # settings, plot, affine, inverse, the mask's or settings file's content
        return None, f"{', '.join(differ)} differ(s) from the stored result's"
    old = stored.get("inputs") or {}
    changed = [k for k in _INPUTS if old.get(k) != key["inputs"][k]]
    if changed:
        return None, f"input(s) changed since the stored result: {', '.join(changed)}"
    missing = [n for n in summary.get("outputs", []) if not (target / n).is_file()]
    if missing:
        return None, f"output(s) missing: {', '.join(missing)}"
    return summary, ""


_CSV_FIELDS = (
    "id", "status", "fixed", "moving", "dice_before", "dice_after", "fold_percent",
    "time_registration_s", "message",
)


def _row(spec: PairSpec, status: str, summary: dict | None, message: str = "") -> dict:
    row = {k: "" for k in _CSV_FIELDS}
    row.update(id=spec.id, status=status, fixed=str(spec.fixed), moving=str(spec.moving))
    row["message"] = message
    if summary:
        m = summary.get("metrics", {})
        for key in ("dice_before", "dice_after"):
            v = (m.get(key) or {}).get("mean")
            row[key] = "" if v is None else f"{v:.4f}"
        if "fold_percent" in m:
            row["fold_percent"] = f"{m['fold_percent']:.4f}"
        if "time_registration_s" in m:
            row["time_registration_s"] = f"{m['time_registration_s']:.3f}"
    return row


def _progress_line(k: int, n: int, row: dict) -> str:
    """One line per pair for logs (no progress bar off a terminal)."""
    parts = [f"[{k}/{n}] {row['id']}: {row['status']}"]
    if row.get("dice_after"):
        parts.append(f"Dice {row['dice_before'] or '?'} -> {row['dice_after']}")
    if row.get("time_registration_s"):
        parts.append(f"{row['time_registration_s']} s")
    if row.get("message") and row["status"] != "done":
        parts.append(row["message"])
    return ", ".join(parts)


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    n = len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def _write_cohort_summary(
    outdir: Path, rows: list[dict], settings: Settings, device: str
) -> None:
    def write_csv(p: Path) -> None:
        with open(p, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=_CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    ok = [r for r in rows if r["status"] in ("done", "skipped")]

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in ok if r[key] != ""]

    lines = [
        "# nadmm-register cohort summary",
        "",
        f"Settings: {json.dumps(settings.solver_kwargs())}, device {device}.",
        f"Pairs: {len(rows)} ({len(ok)} finished, "
        f"{sum(r['status'] == 'failed' for r in rows)} failed).",
        "",
        "| | Dice before | Dice after | % det J ≤ 0 | time (s) |",
        "|---|---|---|---|---|",
        f"| mean ± sd | {_mean_sd(col('dice_before'))} | {_mean_sd(col('dice_after'))} | "
        f"{_mean_sd(col('fold_percent'))} | {_mean_sd(col('time_registration_s'))} |",
        "",
        "| id | status | Dice before | Dice after | % det J ≤ 0 | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = r["status"] + (f": {r['message']}" if r["message"] else "")
        status = status.replace("|", "/")
        lines.append(
            f"| {r['id']} | {status} | {r['dice_before'] or '–'} | {r['dice_after'] or '–'} | "
            f"{r['fold_percent'] or '–'} | {r['time_registration_s'] or '–'} |"
        )
    with Staging(outdir) as staging:
        staging.add("summary.csv", write_csv)
        staging.add("summary.md", lambda p: p.write_text("\n".join(lines) + "\n", "utf-8"))
        staging.commit(outdir)


# What fails one pair (reported in its row) rather than the whole cohort.
_PAIR_ERRORS = (CLIError, OSError, RuntimeError, ValueError)


def _error_text(exc: BaseException) -> str:
    return _one_line(exc) if isinstance(exc, CLIError) else (
        f"{type(exc).__name__}: {_one_line(exc)}"
    )


def default_batch_size(device) -> int:
    """``--batch-size`` when not given: 16 pairs per solver call on a GPU, 4 on the CPU."""
    return 16 if getattr(device, "type", str(device)) == "cuda" else 4


def _batch_size_arg(text: str) -> int:
    """``--batch-size``: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of pairs per solver call, got {text!r}")
    return value


@dataclass
class _Queued:
    """A pair read and waiting for its batch."""

    index: int
    spec: PairSpec
    target: Path
    resume_key: dict[str, Any]
    inputs: _Inputs
    t_start: float


class _CohortRun:
    """One run over a cohort: pairs are checked against their stored results, read, grouped
    by :func:`_batch_key` and registered ``batch_size`` at a time (a group is registered once
    it is full, the rest at the end). Rows are kept in the CSV's order."""

    def __init__(self, specs: list[PairSpec], outdir: Path, settings: Settings, log: _Log,
                 force: bool, batch_size: int, device) -> None:
        from tqdm import tqdm

        self.specs, self.outdir, self.settings, self.log = specs, outdir, settings, log
        self.force, self.batch_size, self.device = force, batch_size, device
        self.rows: dict[int, dict] = {}
        self.failed = 0
        self.groups: dict[tuple, list[_Queued]] = {}
        self.hashes: dict[str, Any] = {}
        self.bar = tqdm(total=len(specs), desc=PROG, unit="pair",
                        disable=True if log.quiet else None, file=sys.stderr)

    def ordered_rows(self) -> list[dict]:
        return [self.rows[i] for i in sorted(self.rows)]

    def run(self) -> None:
        for index, spec in enumerate(self.specs):
            self.bar.set_postfix_str(spec.id)
            queued = self._prepare(index, spec)
            if queued is None:
                continue
            group = self.groups.setdefault(_batch_key(queued.inputs), [])
            group.append(queued)
            if len(group) >= self.batch_size:
                self._flush(_batch_key(queued.inputs))
        for key in list(self.groups):
            self._flush(key)

    def _prepare(self, index: int, spec: PairSpec) -> _Queued | None:
        """The pair read and checked, or ``None`` if it is skipped (done) or failed."""
        t_start = time.perf_counter()
        target = self.outdir / spec.id
        if target.is_dir():
            clean_stale(target)
        key = _resume_key(spec, self.settings, self.hashes)
        if not self.force:
            summary, why = _stored_result(target, key)
            if summary is not None:
                self._record(index, spec, "skipped", summary, "already done")
                return None
            if (target / "summary.json").exists():
                self.log.info(f"{spec.id}: {why}: registering again")
        try:
            inputs = _read_inputs(spec, self.log)
            _check_plot_slice(self.settings, inputs)
        except _PAIR_ERRORS as exc:
            self._fail(index, spec, exc)
            return None
        return _Queued(index, spec, target, key, inputs, t_start)

    def _flush(self, key: tuple) -> None:
        """Register a group: in one batch, or pair by pair if the batch fails (so that the
        error is reported for the pair that caused it)."""
        group = self.groups.pop(key)
        quiet = _stage_bar(1, True, PROG)
        if len(group) > 1:
            try:
                (disps, affines), seconds = _solve_compiled(
                    [q.inputs for q in group], self.settings, self.device, self.log, quiet)
            except (*_PAIR_ERRORS, MemoryError) as exc:
                self.log.info(f"the batch of {len(group)} pairs "
                              f"({', '.join(q.spec.id for q in group)}) failed "
                              f"({_error_text(exc)}): registering them one by one")
            else:
                for q, d, a in zip(group, disps, affines, strict=True):
                    self._finish(q, _Solved(d, a, seconds, len(group)))
                return
        for q in group:
            try:
                (disps, affines), seconds = _solve_compiled(
                    [q.inputs], self.settings, self.device, self.log, quiet)
            except _PAIR_ERRORS as exc:
                self._fail(q.index, q.spec, exc)
                continue
            self._finish(q, _Solved(disps[0], affines[0], seconds, 1))

    def _finish(self, q: _Queued, solved: _Solved) -> None:
        try:
            summary = _finish_pair(q.spec, q.target, q.inputs, solved, self.settings,
                                   self.device, self.log, _stage_bar(6, True, PROG),
                                   q.resume_key, q.t_start)
        except _PAIR_ERRORS as exc:
            self._fail(q.index, q.spec, exc)
            return
        finally:
            q.inputs = None  # the images are no longer needed
        self._record(q.index, q.spec, "done", summary)

    def _fail(self, index: int, spec: PairSpec, exc: BaseException) -> None:
        self.failed += 1
        msg = _error_text(exc)
        self.log.info(f"{spec.id}: failed: {msg}")
        self._record(index, spec, "failed", None, msg)

    def _record(self, index: int, spec: PairSpec, status: str, summary: dict | None,
                message: str = "") -> None:
        self.rows[index] = _row(spec, status, summary, message)
        self.bar.update(1)
        if self.bar.disable:  # not on a terminal: a line per pair, for logs
            self.log.info(_progress_line(len(self.rows), len(self.specs), self.rows[index]))


def run_cohort(csv_path: Path, outdir: Path, settings: Settings, log: _Log, force: bool,
               batch_size: int | None = None) -> int:
    """Register every pair of ``csv_path`` into ``outdir``, ``batch_size`` pairs of one grid
    per solver call (default: :func:`default_batch_size`); writes the cohort summary."""
    specs = read_pairs(csv_path)
    device = _device(settings.device)  # fail early on a bad device or setting
    _check_settings(settings)
    _prepare_outdir(outdir)
    if batch_size is None:
        batch_size = default_batch_size(device)
    cohort = _CohortRun(specs, outdir, settings, log, force, batch_size, device)
    try:
        cohort.run()
    except KeyboardInterrupt:
        cohort.bar.close()
        _write_cohort_summary(outdir, cohort.ordered_rows(), settings, str(device))
        raise
    cohort.bar.close()
    rows, failed = cohort.ordered_rows(), cohort.failed
    _write_cohort_summary(outdir, rows, settings, str(device))
    n_skip = sum(r["status"] == "skipped" for r in rows)
    n_done = sum(r["status"] == "done" for r in rows)
    log.out(
        f"{len(rows)} pairs: {n_done} registered, {n_skip} skipped (already done), {failed} failed"
    )
    ok = [r for r in rows if r["dice_after"]]
    if ok:
        log.out(
            "Dice mean: "
            f"{_mean_sd([float(r['dice_before']) for r in ok if r['dice_before']])} -> "
            f"{_mean_sd([float(r['dice_after']) for r in ok])}"
        )
    log.out(f"summary: {outdir / 'summary.csv'}, {outdir / 'summary.md'}")
    if failed:
        raise CLIError(f"{failed} of {len(rows)} pairs failed (see {outdir / 'summary.csv'})")
    return 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    settings = Settings(
        preset=args.preset_file or args.preset,
        data_term=args.data_term,
        order=args.order,
        lam=args.lam,
        theta=args.theta,
        overrides={**_parse_overrides(args.overrides),
                   **({"features": args.features} if args.features else {})},
        device=args.device,
        plot=args.plot or args.plot_slice is not None,
        plot_slice=args.plot_slice,
        compile=args.compile,
        affine=args.affine,
        inverse=args.inverse,
    )
    log = _Log(args.quiet)
    outdir = Path(args.outdir).expanduser()
    if args.pairs:
        if args.fixed or args.moving or args.moving_labels or args.fixed_labels:
            raise CLIError("--pairs takes no FIXED/MOVING arguments or label options")
        return run_cohort(Path(args.pairs), outdir, settings, log, args.force, args.batch_size)

    if not args.fixed or not args.moving:
        raise CLIError("FIXED and MOVING images are required (or --pairs CSV)")
    if args.batch_size is not None:
        raise CLIError("--batch-size applies to cohort mode (--pairs CSV) only")
    spec = PairSpec(
        fixed=Path(args.fixed).expanduser(),
        moving=Path(args.moving).expanduser(),
        fixed_labels=Path(args.fixed_labels).expanduser() if args.fixed_labels else None,
        moving_labels=Path(args.moving_labels).expanduser() if args.moving_labels else None,
        fixed_mask=Path(args.fixed_mask).expanduser() if args.fixed_mask else None,
    )
    for kind, p in (
        ("fixed mask", spec.fixed_mask),
        ("fixed image", spec.fixed),
        ("moving image", spec.moving),
        ("fixed labels", spec.fixed_labels),
        ("moving labels", spec.moving_labels),
    ):
        if p is not None and not p.exists():
            raise CLIError(f"{kind} not found: '{p}'")
    _device(settings.device)
    _check_settings(settings)
    created = _prepare_outdir(outdir)
    try:
        summary = register_pair(spec, outdir, settings, log, show_progress=not args.quiet)
    except BaseException:
        if created:
            try:
                outdir.rmdir()  # only if still empty
            except OSError:
                pass
        raise
    _report(summary, outdir, log)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 failure, 2 usage, 130 Ctrl-C,
    143 SIGTERM: the pair in flight is discarded, the cohort summarised)."""
    return run_console(
        PROG, lambda: build_parser().parse_args(argv), _run, expected=(CLIError,),
        interrupted="interrupted; the pair in flight left no outputs",
        terminated="terminated; the pair in flight left no outputs",
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


# --------------------------------------------------------------------------------------------
# nadmm-tune
# --------------------------------------------------------------------------------------------

TUNE_PROG = "nadmm-tune"


def build_tune_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=TUNE_PROG,
        description=(
            "Learn the solver's λ and θ per pyramid level for your images, by gradient descent "
            "through the unrolled solver (nadmm_torch.tune), from a CSV of pairs; writes a "
            "settings file that nadmm-register --preset-file, nadmm_torch.register(preset=...) "
            "and NADMMRegistration load."
        ),
        epilog=(
            "CSV columns: fixed,moving[,fixed_labels,moving_labels][,id] (relative paths are "
            "taken from the CSV's folder). With labels the objective is soft Dice, without "
            "it local NCC + smoothness. Pairs are held out for validation; the best settings "
            "seen (the starting ones included) are kept."
        ),
    )
    p.add_argument("--pairs", metavar="CSV", required=True, help="the pairs to tune on")
    p.add_argument("-o", "--output", required=True, metavar="JSON", help="settings file")
    p.add_argument("--preset", default="fast", help="starting preset (default fast)")
    p.add_argument("--data-term", default="l2", choices=("l2", "l1"), help="default: l2")
    p.add_argument("--order", type=int, default=2, help="regulariser order >= 1 (default 2)")
    p.add_argument("--epochs", type=int, default=10, help="at most this many (default 10)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam step on log λ, log θ (0.1)")
    p.add_argument("--val-pairs", type=int, default=None,
                   help="pairs held out (default: a quarter when there are >= 3)")
    p.add_argument("--patience", type=int, default=3, help="epochs without improvement (3)")
    p.add_argument("--no-scan", dest="scan", action="store_false",
                   help="start gradient descent from the preset, without first searching "
                        "global λ and θ multipliers (powers of 3) on the pairs")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")
    return p


def _tune_pairs(csv_path: Path, log: _Log):
    """The CSV's pairs as :class:`nadmm_torch.TunePair` (2D for one-slice volumes)."""
    from .tuning import TunePair

    out = []
    for spec in read_pairs(csv_path):
        x = _read_inputs(spec, log)
        geo, sq = x.geometry, x.squeeze
        kept = [i for i in range(geo.ndim) if i != sq]

        def flat(t, sq=sq):
            return t if t is None or sq is None else t.squeeze(2 + sq)

        out.append(TunePair(flat(x.fixed), flat(x.moving),
                            tuple(geo.array_spacing[i] for i in kept),
                            flat(x.fixed_labels), flat(x.moving_labels), id=spec.id or ""))
    return out


def _tune_run(args: argparse.Namespace) -> int:
    import nadmm_torch as nt

    from .checks import resolve_device

    log = _Log(args.quiet)
    output = Path(args.output).expanduser()
    _check_output_file(output, "the settings file")  # before the tuning, not after it
    device = resolve_device(args.device)
    pairs = _tune_pairs(Path(args.pairs), log)
    for p in pairs:
        for name in ("fixed", "moving", "fixed_labels", "moving_labels"):
            value = getattr(p, name)
            if value is not None:
                setattr(p, name, value.to(device))
    log.info(f"tuning on {len(pairs)} pair(s) on {device}")
    try:
        result = nt.tune(pairs, preset=args.preset, data_term=args.data_term, order=args.order,
                         val_pairs=args.val_pairs, epochs=args.epochs, lr=args.lr,
                         patience=args.patience, progress=False if args.quiet else None,
                         scan=args.scan)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"tuning: {_one_line(exc)}") from None
    try:
        result.save(output)
    except OSError as exc:
        raise CLIError(
            f"cannot write the settings file '{output}': {exc.strerror or _one_line(exc)}"
        ) from None
    if result.scan:
        best = max(result.scan, key=lambda r: r["score"])
        start = result.scan[0]["score"]
        log.info(f"scan: started from λ x{best['lam_mult']:.3g}, θ x{best['theta_mult']:.3g} "
                 f"(training score {best['score']:.4f}; the preset's {start:.4f})")
    log.out(f"validation score {result.val_start:.4f} -> {result.val_best:.4f} "
            f"(epoch {result.best_epoch}), {result.time_s:.1f} s; settings: {output}")
    return 0


def _check_output_file(path: Path, what: str) -> None:
    """A file can be written at ``path``: its folder exists and is writable, and it is not a
    folder itself (checked before long work, whose result would be lost otherwise)."""
    folder = path.parent if str(path.parent) else Path(".")
    problem = None
    if path.is_dir():
        problem = "it is a directory"
    elif not folder.is_dir():
        problem = f"no such folder '{folder}'"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"the folder '{folder}' is not writable"
    if problem:
        raise CLIError(f"cannot write {what} '{path}': {problem}")


def tune_main(argv: Sequence[str] | None = None) -> int:
    """``nadmm-tune`` entry point; exit status 0 ok, 1 failure, 2 usage, 130 Ctrl-C."""
    return run_console(
        TUNE_PROG, lambda: build_tune_parser().parse_args(argv), _tune_run,
        expected=(CLIError,), interrupted="interrupted; nothing written",
    )
