"""Segmentation overlap, slice-wise Hausdorff distance and folding of displacements.

Conventions: label maps are integer tensors ``(B, 1, *S)`` or ``(B, *S)`` (only the batch axis
and, for the Hausdorff distance, the last two axes matter); displacements are
``(B, ndim, *S)`` in voxel units (see :mod:`nadmm_torch.ops.warp`).

Everything is torch except the distance transforms of :func:`hausdorff_slices`, which use
:func:`scipy.ndimage.distance_transform_edt` (exact Euclidean distance transform).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from .checks import check_finite, check_nonempty
from .ops.diff import jacobian_determinant as _jacobian_determinant

__all__ = ["dice", "hausdorff_slices", "jacobian_determinant", "fold_percent"]


def _check_labels(pred: Tensor, true: Tensor, name: str = "pred") -> None:
    if not isinstance(pred, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(pred).__name__}")
    if not isinstance(true, Tensor):
        raise ValueError(f"true_labels must be a torch.Tensor, got {type(true).__name__}")
    if pred.shape != true.shape:
        raise ValueError(
            f"{name} and true labels must have the same shape, got {tuple(pred.shape)} "
            f"and {tuple(true.shape)}"
        )
    if pred.dim() < 2:
        raise ValueError(f"{name} must have a batch axis and spatial axes, got {pred.dim()}-D")
    if pred.is_floating_point() or pred.is_complex():
        raise ValueError(f"{name} must be an integer label map, got dtype {pred.dtype}")
    if true.is_floating_point() or true.is_complex():
        raise ValueError(f"true labels must be an integer label map, got dtype {true.dtype}")
    check_nonempty(pred, name)  # an empty map would score NaN silently


def _check_label_list(labels: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in labels)
    except (TypeError, ValueError) as e:
        raise ValueError(f"labels must be a sequence of ints, got {labels!r}") from e
    if not out:
        raise ValueError("labels must not be empty")
    return out


def dice(pred_labels: Tensor, true_labels: Tensor, labels: Sequence[int] = (1, 2, 3)) -> Tensor:
    """Dice overlap ``2 |P ∩ T| / (|P| + |T|)`` per image and structure.

    Args:
        pred_labels: ``(B, 1, *S)`` or ``(B, *S)`` integer label map.
        true_labels: integer label map of the same shape.
        labels: the label values to score.

    Returns:
        ``(B, len(labels))`` float64 on the input device. 0 where exactly one of the two masks
        is empty, NaN where both are (undefined overlap).
    """
    _check_labels(pred_labels, true_labels, "pred_labels")
    labs = _check_label_list(labels)
    p = pred_labels.reshape(pred_labels.shape[0], -1)
    t = true_labels.reshape(true_labels.shape[0], -1)
    out = []
    for lab in labs:
        pm, tm = p == lab, t == lab
        inter = (pm & tm).sum(1).double()
        total = pm.sum(1).double() + tm.sum(1).double()
        d = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.full_like(total, math.nan))
        out.append(d)
    return torch.stack(out, dim=1)


def _inplane_spacing(spacing: Sequence[float]) -> tuple[float, float]:
    try:
        sp = tuple(float(s) for s in spacing)
    except TypeError as e:
        raise ValueError(f"spacing must be a sequence of floats, got {spacing!r}") from e
    if len(sp) < 2:
        raise ValueError(f"spacing must hold at least the two in-plane values, got {spacing!r}")
    sp = sp[-2:]
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive and finite, got {spacing!r}")
    return sp


def _directed_max(a: np.ndarray, b: np.ndarray, sampling: tuple[float, float]) -> float:
    """``max_{x in a} min_{y in b} |x - y|`` for non-empty 2-D boolean masks."""
    # distance_transform_edt gives, at every nonzero voxel, the distance to the nearest zero
    # voxel: feed it ~b so that zeros are the voxels of b.
    dist = ndimage.distance_transform_edt(~b, sampling=sampling)
    return float(dist[a].max())


def hausdorff_slices(
    pred: Tensor,
    true: Tensor,
    spacing: Sequence[float],
    labels: Sequence[int] = (1, 2, 3),
    reduction: str = "mean",
) -> Tensor:
    """Symmetric Hausdorff distance per 2-D slice (in mm) between the voxel sets of two masks.

    The in-plane axes are the last two axes; every index of the other non-batch axes is a
    slice. For each slice where *both* masks contain the structure,
    ``HD = max(max_{p in P} d(p, T), max_{t in T} d(t, P))``, with ``d`` the Euclidean distance
    between voxel centres (all mask voxels, not only boundary voxels, so a mask contained in
    the other has a directed distance of 0). Computed exactly with
    :func:`scipy.ndimage.distance_transform_edt` and anisotropic ``sampling``, on the CPU.

    Args:
        pred: ``(B, 1, *S)`` or ``(B, *S)`` integer label map.
        true: integer label map of the same shape.
        spacing: the in-plane spacing ``(sy, sx)`` in mm, or the full spacing tuple of ``S``
            (its last two values are used).
        labels: the label values to score.
        reduction: ``"mean"``: mean over the qualifying slices, ``(B, len(labels))``, NaN
            where no slice qualifies; ``"none"``: ``(B, len(labels), n_slices)`` with NaN for
            the slices that do not qualify (``n_slices`` = product of the non-batch axes before
            the last two).

    Returns:
        float64 tensor on the input device.
    """
    _check_labels(pred, true, "pred")
    labs = _check_label_list(labels)
    sampling = _inplane_spacing(spacing)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if pred.dim() < 3:
        raise ValueError(f"pred must have a batch axis and two in-plane axes, got {pred.dim()}-D")
    b = pred.shape[0]
    h, w = pred.shape[-2:]
    p = pred.detach().reshape(b, -1, h, w).cpu().numpy()
    t = true.detach().reshape(b, -1, h, w).cpu().numpy()
    n_slices = p.shape[1]
    out = np.full((b, len(labs), n_slices), np.nan)
    for i in range(b):
        for j, lab in enumerate(labs):
            pm_all, tm_all = p[i] == lab, t[i] == lab
            for z in np.flatnonzero(pm_all.any(axis=(1, 2)) & tm_all.any(axis=(1, 2))):
                pm, tm = pm_all[z], tm_all[z]
                out[i, j, z] = max(_directed_max(pm, tm, sampling), _directed_max(tm, pm, sampling))
    res = torch.from_numpy(out).to(pred.device)
    if reduction == "none":
        return res
    valid = ~torch.isnan(res)
    total = torch.where(valid, res, torch.zeros_like(res)).sum(-1)
    count = valid.sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def _check_displacement(displacement: object) -> Tensor:
    if not isinstance(displacement, Tensor):
        raise ValueError(f"displacement must be a torch.Tensor, got {type(displacement).__name__}")
    if displacement.dim() not in (4, 5) or displacement.shape[1] != displacement.dim() - 2:
        raise ValueError(
            "displacement must have shape (B, ndim, *S) with ndim = len(S) in {2, 3}, got "
            f"{tuple(displacement.shape)}"
        )
    if not displacement.is_floating_point():
        raise ValueError(f"displacement must be floating point, got dtype {displacement.dtype}")
    check_nonempty(displacement, "displacement")
    # NaN compares False with 0: a NaN field would count as fold-free.
    check_finite(displacement, "displacement")
    return displacement


def jacobian_determinant(displacement: Tensor) -> Tensor:
    """``det(I + ∇d)`` (central differences, voxel units; independent of spacing).

    Args:
        displacement: ``(B, ndim, *S)`` with ndim = 2 or 3 equal to ``len(S)``, voxel units,
            finite.

    Returns:
        ``(B, *S)``.
    """
    return _jacobian_determinant(_check_displacement(displacement))


def fold_percent(displacement: Tensor) -> Tensor:
    """Percentage of voxels where ``det(I + ∇d) <= 0`` (central differences, voxel units).

    Args:
        displacement: ``(B, ndim, *S)`` with ndim = 2 or 3 equal to ``len(S)``, voxel units,
            finite.

    Returns:
        ``(B,)`` float tensor, in percent (0 ... 100).
    """
    det = _jacobian_determinant(_check_displacement(displacement))
    return (det <= 0).reshape(det.shape[0], -1).to(displacement.dtype).mean(1) * 100.0
