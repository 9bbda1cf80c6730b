"""Classical baselines with their displacements converted to this package's convention.

* :func:`demons_register`: SimpleITK ``DiffeomorphicDemonsRegistrationFilter`` in an in-plane
  multi-resolution pyramid.
* :func:`syn_register`: ANTs SyN (``type_of_transform="SyNOnly"``, no affine stage) through
  antspyx.

Both take ``(1, 1, *S)`` fixed / moving tensors (``S = (D, H, W)``) and ``spacing`` in the
order of ``S`` (mm) and return a displacement ``(1, 3, *S)`` float32 in voxel units, component
``i`` along axis ``i`` of ``S``, pull-back (``warped(x) = moving(x + d(x))``), i.e. the same
convention as :func:`nadmm_torch.warp`, so labels are warped and det J is measured
by the same code for every method.

ITK images built here have origin 0 and identity direction, with ITK axis ``k`` = axis
``ndim - 1 - k`` of ``S`` (x = W, y = H, z = D). An ITK displacement field ``u`` (physical mm,
components (x, y, z)) maps a fixed point ``p`` to ``p + u(p)`` in the moving image, so our
voxel displacement is ``d_i = u_{ndim-1-i} / spacing_i``.

Neither package is a hard dependency: :func:`available` reports which ones import.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .checks import check_pair, check_spacing

__all__ = [
    "available",
    "itk_field_to_displacement",
    "demons_register",
    "syn_register",
]


_PACKAGES = {"demons": "SimpleITK", "syn": "ants"}


def available(methods: Sequence[str] = ("demons", "syn")) -> dict[str, bool]:
    """``{method: importable}`` for ``"demons"`` (SimpleITK) and ``"syn"`` (antspyx).

    Only the packages of the requested methods are imported.
    """
    out = {}
    for m in methods:
        if m not in _PACKAGES:
            raise ValueError(f"methods: unknown baseline {m!r}; known: {sorted(_PACKAGES)}")
        try:
            importlib.import_module(_PACKAGES[m])
            out[m] = True
        except ImportError:
            out[m] = False
    return out


def _check_volumes(fixed: object, moving: object, spacing: object) -> tuple[float, ...]:
    """A ``(1, 1, D, H, W)`` pair (as :func:`nadmm_torch.checks.check_pair`) and its 3 spacings."""
    fixed, moving = check_pair(fixed, moving)
    if fixed.dim() != 5 or fixed.shape[0] != 1:
        raise ValueError(
            f"fixed: expected a (1, 1, D, H, W) volume, got shape {tuple(fixed.shape)}"
        )
    if spacing is None:
        raise ValueError("spacing: expected 3 numbers (mm, in the order D, H, W), got None")
    return check_spacing(spacing, 3)


def itk_field_to_displacement(field_xyz: np.ndarray, spacing: Sequence[float]) -> Tensor:
    """ITK displacement array -> our ``(1, ndim, *S)`` voxel displacement.

    Args:
        field_xyz: ``(*S, ndim)`` array as ``SimpleITK.GetArrayFromImage`` returns it for a
            vector image (array axes in ``S`` order, components in ITK (x, y, z) order, mm).
        spacing: spacing in the order of ``S``.
    """
    ndim = field_xyz.shape[-1]
    sp = np.asarray(spacing, dtype=np.float64)
    d = field_xyz[..., ::-1].astype(np.float64) / sp  # components now in S order, voxels
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(d, -1, 0))).float()[None][:, :ndim]


def _to_sitk(volume: np.ndarray, spacing: Sequence[float]):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    return img


def _shrink(image, factors: Sequence[int]):
    """Gaussian smoothing (σ = factor / 2 voxels, in-plane) and resampling by ``factors`` (x, y, z).

    The output grid covers the same physical extent (corner-aligned, origin shifted by half
    the new voxel), the usual pyramid construction.
    """
    import SimpleITK as sitk

    if all(f == 1 for f in factors):
        return image
    sp = image.GetSpacing()
    sigmas = [0.5 * f * s if f > 1 else 0.0 for f, s in zip(factors, sp, strict=True)]
    smoothed = sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-6) for s in sigmas])
    size = [max(1, int(round(n / f))) for n, f in zip(image.GetSize(), factors, strict=True)]
    new_sp = [n * s / m for n, s, m in zip(image.GetSize(), sp, size, strict=True)]
    origin = [o + 0.5 * (ns - s) for o, ns, s in zip(image.GetOrigin(), new_sp, sp, strict=True)]
    return sitk.Resample(
        smoothed,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        origin,
        new_sp,
        image.GetDirection(),
        0.0,
        image.GetPixelID(),
    )


def demons_register(
    fixed: Tensor,
    moving: Tensor,
    spacing: Sequence[float],
    iterations: Sequence[int] = (15, 10, 5),
    sigma: float = 0.5,
    shrink: Sequence[int] = (4, 2, 1),
    threads: int | None = None,
) -> Tensor:
    """SimpleITK diffeomorphic demons, multi-resolution, ES→ED style pull-back.

    Pyramid: level ``l`` shrinks the two in-plane axes by ``shrink[l]`` (never the slice
    axis) after Gaussian smoothing (σ = shrink / 2 voxels); the field from the coarser level is
    resampled (linearly, physical units) onto the finer grid and used as the initial field.
    ``DiffeomorphicDemonsRegistrationFilter`` runs ``iterations[l]`` iterations per level with
    the displacement field smoothed by a Gaussian of ``sigma`` (voxel units, every axis) and
    image spacing used for the update; no histogram matching.

    Args:
        fixed, moving: ``(1, 1, D, H, W)`` tensors.
        spacing: ``(s_D, s_H, s_W)`` mm.
        iterations: per level, coarse to fine (same length as ``shrink``).
        sigma: standard deviation of the displacement-field smoothing (voxels).
        shrink: in-plane shrink factor per level, coarse to fine.
        threads: SimpleITK threads (default: SimpleITK's global default).

    Returns:
        ``(1, 3, D, H, W)`` float32 voxel displacement (pull-back).
    """
    import SimpleITK as sitk

    sp = _check_volumes(fixed, moving, spacing)
    iterations = [int(i) for i in iterations]
    shrink = [int(s) for s in shrink]
    if len(iterations) != len(shrink) or not iterations:
        raise ValueError(
            f"iterations: expected one value per level of shrink {shrink} (at least one), got "
            f"{iterations}"
        )
    f_img = _to_sitk(fixed[0, 0].detach().cpu().numpy(), sp)
    m_img = _to_sitk(moving[0, 0].detach().cpu().numpy(), sp)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(float(sigma))
    demons.SetUseImageSpacing(True)
    if threads is not None:
        demons.SetNumberOfThreads(int(threads))
    field = None
    for its, fac in zip(iterations, shrink, strict=True):
        factors = (fac, fac, 1)
        f_l, m_l = _shrink(f_img, factors), _shrink(m_img, factors)
        if field is None:
            field = sitk.Image(f_l.GetSize(), sitk.sitkVectorFloat64)
            field.CopyInformation(f_l)
        else:
            field = sitk.Resample(field, f_l, sitk.Transform(), sitk.sitkLinear, 0.0)
        if its > 0:
            demons.SetNumberOfIterations(its)
            field = demons.Execute(f_l, m_l, field)
    return itk_field_to_displacement(sitk.GetArrayFromImage(field), sp)


def syn_register(
    fixed: Tensor,
    moving: Tensor,
    spacing: Sequence[float],
    iterations: Sequence[int] = (100, 70, 50, 20),
    grad_step: float = 0.25,
    flow_sigma: float = 3.0,
    total_sigma: float = 0.0,
    threads: int | None = None,
) -> Tensor:
    """ANTs SyN (``SyNOnly``: no affine stage, identity initialisation), mean squares metric.

    antspyx builds the pyramid from ``len(iterations)`` levels (shrink ``2**k`` … 1, smoothing
    ``k`` … 0 voxels). The forward warp (fixed → moving points, mm) is read back through ITK
    and converted to our voxel pull-back convention.

    Args:
        fixed, moving: ``(1, 1, D, H, W)`` tensors.
        spacing: ``(s_D, s_H, s_W)`` mm.
        iterations: per level, coarse to fine.
        grad_step: SyN gradient step.
        flow_sigma, total_sigma: SyN update / total field smoothing (voxels).
        threads: ITK threads for antsRegistration (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``).

    Returns:
        ``(1, 3, D, H, W)`` float32 voxel displacement (pull-back).
    """
    import ants
    import SimpleITK as sitk

    sp = _check_volumes(fixed, moving, spacing)
    if threads is not None:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    # ants arrays are indexed in ITK order (x, y, z): pass the (W, H, D) transposes.
    f_np = np.ascontiguousarray(fixed[0, 0].detach().cpu().numpy().astype(np.float32).T)
    m_np = np.ascontiguousarray(moving[0, 0].detach().cpu().numpy().astype(np.float32).T)
    sp_xyz = tuple(reversed(sp))
    f_img = ants.from_numpy(f_np, origin=(0.0, 0.0, 0.0), spacing=sp_xyz)
    m_img = ants.from_numpy(m_np, origin=(0.0, 0.0, 0.0), spacing=sp_xyz)
    tmp = tempfile.mkdtemp(prefix="nadmm_syn_")
    try:
        reg = ants.registration(
            f_img,
            m_img,
            type_of_transform="SyNOnly",
            initial_transform="Identity",
            syn_metric="meansquares",
            reg_iterations=tuple(int(i) for i in iterations),
            grad_step=float(grad_step),
            flow_sigma=float(flow_sigma),
            total_sigma=float(total_sigma),
            outprefix=os.path.join(tmp, "syn_"),
        )
        warps = [t for t in reg["fwdtransforms"] if t.endswith("Warp.nii.gz")]
        others = [t for t in reg["fwdtransforms"] if not t.endswith("Warp.nii.gz")]
        if len(warps) != 1:
            raise RuntimeError(f"unexpected SyN transforms {reg['fwdtransforms']}")
        for t in others:  # the identity initial transform is written out as an affine
            params = np.asarray(ants.read_transform(t).parameters, dtype=np.float64)
            if not np.allclose(params, np.r_[np.eye(3).ravel(), np.zeros(3)], atol=1e-6):
                raise RuntimeError(f"SyN returned a non-identity affine {t}: {params}")
        field = sitk.ReadImage(warps[0])
        arr = sitk.GetArrayFromImage(field)  # (D, H, W, 3), components (x, y, z) mm
        if arr.shape[:3] != tuple(fixed.shape[2:]):
            raise RuntimeError(f"SyN field shape {arr.shape} does not match {fixed.shape}")
        direction = np.asarray(field.GetDirection()).reshape(3, 3)
        # ITK reads NIfTI into LPS: vectors are physical; bring them to array axes.
        arr = arr @ direction  # u_index_axes = D^T u_phys, row-vector form
        return itk_field_to_displacement(arr, sp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
