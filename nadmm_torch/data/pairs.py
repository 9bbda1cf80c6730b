"""Registration pairs as TorchIO subjects, and their collation into batches (any data).

A pair is a ``tio.Subject`` with ``fixed`` / ``moving`` (``tio.ScalarImage``), optional
``fixed_labels`` / ``moving_labels`` (``tio.LabelMap``) and the plain attributes ``pair_id``
and ``group``. TorchIO holds ``(C, X, Y, Z)``; :func:`collate_pairs` gives back this package's
``(B, 1, *S)`` in array order, the batch layout :mod:`nadmm_torch.lightning` trains on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchio as tio
from torch import Tensor

from ..io import Geometry, from_torchio, to_torchio

__all__ = ["IMAGE_KEYS", "LABEL_KEYS", "pair_subject", "collate_pairs"]

IMAGE_KEYS = ("fixed", "moving")
LABEL_KEYS = ("fixed_labels", "moving_labels")


def pair_subject(
    fixed: Tensor,
    moving: Tensor,
    fixed_labels: Tensor | None = None,
    moving_labels: Tensor | None = None,
    spacing: Sequence[float] | None = None,
    pair_id: str = "",
    group: str = "",
) -> tio.Subject:
    """A registration pair as a ``tio.Subject`` (any data, e.g. synthetic 2D pairs).

    Args:
        fixed, moving: ``(1, 1, *S)`` images, ``S`` 2D ``(H, W)`` or 3D ``(Z, Y, X)``.
        fixed_labels, moving_labels: ``(1, 1, *S)`` integer maps, both or neither.
        spacing: ``len(S)`` spacings in array order (mm); default 1.
        pair_id: identifier kept in the subject (and in :func:`collate_pairs`' output).
        group: free text (ACDC: the pathology group).
    """
    if fixed.dim() not in (4, 5) or fixed.shape[:2] != (1, 1) or fixed.shape != moving.shape:
        raise ValueError(
            f"fixed/moving: expected two (1, 1, *S) images, got {tuple(fixed.shape)} and "
            f"{tuple(moving.shape)}"
        )
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("fixed_labels/moving_labels: give both or neither")
    geometry = Geometry.default(fixed.shape[2:], spacing)
    images: dict = {
        "fixed": to_torchio(fixed, geometry),
        "moving": to_torchio(moving, geometry),
    }
    if fixed_labels is not None:
        for key, lab in zip(LABEL_KEYS, (fixed_labels, moving_labels), strict=True):
            if lab.shape != fixed.shape or lab.is_floating_point():
                raise ValueError(
                    f"{key}: expected an integer map of shape {tuple(fixed.shape)}, got "
                    f"{lab.dtype} {tuple(lab.shape)}"
                )
            images[key] = to_torchio(lab, geometry, label=True)
    return tio.Subject(**images, pair_id=str(pair_id), group=str(group))


def collate_pairs(batch: Sequence[tio.Subject]) -> dict:
    """Stack subjects of one grid into tensors in this package's array order.

    Returns:
        dict with ``fixed``, ``moving`` ``(B, 1, *S)`` float32; ``fixed_labels``,
        ``moving_labels`` ``(B, 1, *S)`` int64 (if every subject has them); ``spacing``
        ``(B, ndim)`` float64 (array order, mm); ``pair_id``, ``group``: lists of str.
        2D subjects (TorchIO ``(1, W, H, 1)``) give ``S = (H, W)``.
    """
    if not batch:
        raise ValueError("collate_pairs: empty batch")
    out: dict = {}
    spacing = []
    keys = list(IMAGE_KEYS)
    if all(all(k in s for k in LABEL_KEYS) for s in batch):
        keys += list(LABEL_KEYS)
    for key in keys:
        tensors = []
        for s in batch:
            t, geo = from_torchio(s[key])
            tensors.append(t)
            if key == "fixed":
                spacing.append(geo.array_spacing)
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"collate_pairs: {key} shapes differ in the batch: {sorted(shapes)}")
        out[key] = torch.cat(tensors, dim=0)
    out["spacing"] = torch.tensor(spacing, dtype=torch.float64)
    out["pair_id"] = [str(s.get("pair_id", "")) for s in batch]
    out["group"] = [str(s.get("group", "")) for s in batch]
    return out
