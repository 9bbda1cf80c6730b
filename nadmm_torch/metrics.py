"""Segmentation overlap, slice-wise Hausdorff distance and folding of displacements.

Conventions: label maps are integer tensors ``(B, 1, *S)`` or ``(B, *S)`` (only the batch axis
and, for the Hausdorff distance, the last two axes matter); displacements are
``(B, ndim, *S)`` in voxel units (see :func:`nadmm_torch.warp`).

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

from ._torchio import is_torchio, torchio_tensor
from .checks import (
    check_choice,
    check_displacement,
    check_int_list,
    check_label_map,
    check_same_shape,
    check_spacing,
)
from .ops.diff import jacobian_determinant as _jacobian_determinant

__all__ = ["dice", "hausdorff_slices", "jacobian_determinant", "fold_percent"]


def _check_label_pair(pred: object, true: object, pred_name: str, true_name: str) -> None:
    """Two integer label maps of one shape (an empty map would score NaN silently)."""
    check_label_map(pred, pred_name)
    check_label_map(true, true_name)
    check_same_shape(pred, true, pred_name, true_name)


def dice(pred_labels, true_labels, labels: Sequence[int] = (1, 2, 3)) -> Tensor:
    """Dice overlap ``2 |P ∩ T| / (|P| + |T|)`` per image and structure.

    Args:
        pred_labels: ``(B, 1, *S)`` or ``(B, *S)`` integer label map, or a ``tio.LabelMap``
            (read as ``(1, 1, *S)`` in array order, like :func:`nadmm_torch.register` reads
            TorchIO images; it may be paired with a tensor in that layout).
        true_labels: integer label map of the same shape, or a ``tio.LabelMap``.
        labels: the label values to score.

    Returns:
        ``(B, len(labels))`` float64 on the input device (a tensor's, where one is given with a
        ``tio.LabelMap``). 0 where exactly one of the two masks is empty, NaN where both are
        (undefined overlap).
    """
    pred_labels, true_labels = _label_tensors(pred_labels, true_labels)
    _check_label_pair(pred_labels, true_labels, "pred_labels", "true_labels")
    labs = check_int_list(labels, "labels")
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


def _label_tensors(pred: object, true: object) -> tuple[object, object]:
    """``tio.LabelMap`` arguments as tensors (:mod:`nadmm_torch._torchio`; TorchIO imported
    only then), on the device of a tensor given with them; anything else unchanged."""
    if isinstance(pred, Tensor) and isinstance(true, Tensor):
        return pred, true
    like = pred if isinstance(pred, Tensor) else true
    out = []
    for name, x in (("pred_labels", pred), ("true_labels", true)):
        out.append(torchio_tensor(x, name, like=like, label=True) if is_torchio(x) else x)
    return out[0], out[1]


def _inplane_spacing(spacing: object) -> tuple[float, float]:
    """The last two values of a spacing (one per spatial axis, at least the two in-plane)."""
    n = len(spacing) if isinstance(spacing, (Sequence, Tensor, np.ndarray)) else 2
    if n < 2:
        raise ValueError(
            f"spacing: expected at least the two in-plane values, got {spacing!r}"
        )
    return check_spacing(spacing, n)[-2:]


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
    check_label_map(pred, "pred", min_dims=3)  # a batch axis and two in-plane axes
    _check_label_pair(pred, true, "pred", "true")
    labs = check_int_list(labels, "labels")
    sampling = _inplane_spacing(spacing)
    check_choice(reduction, "reduction", ("mean", "none"))
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


def jacobian_determinant(displacement: Tensor) -> Tensor:
    """``det(I + ∇d)`` (central differences, voxel units; independent of spacing).

    The public, validated form (shape, dtype, finite values; a NaN field would otherwise
    count as fold-free): :func:`nadmm_torch.ops.diff.jacobian_determinant` is the same
    computation without checks, for the package's internals (the solver's safeguard).

    Args:
        displacement: ``(B, ndim, *S)`` with ndim = 2 or 3 equal to ``len(S)``, voxel units,
            finite.

    Returns:
        ``(B, *S)``.
    """
    return _jacobian_determinant(check_displacement(displacement, "displacement"))


def fold_percent(displacement: Tensor) -> Tensor:
    """Percentage of voxels where ``det(I + ∇d) <= 0`` (central differences, voxel units).

    Args:
        displacement: ``(B, ndim, *S)`` with ndim = 2 or 3 equal to ``len(S)``, voxel units,
            finite.

    Returns:
        ``(B,)`` float tensor, in percent (0 ... 100).
    """
    det = jacobian_determinant(displacement)
    return (det <= 0).reshape(det.shape[0], -1).to(displacement.dtype).mean(1) * 100.0
