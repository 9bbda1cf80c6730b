"""Warping, composition and resizing of images and displacements: the only ``grid_sample`` call.

Conventions: images ``(B, C, *S)``; displacements ``(B, ndim, *S)`` in voxel units, component
``i`` along spatial axis ``i`` of ``S``. Pull-back: ``warp(I, d)(x) = I(x + d(x))``, border
padding. Resizing uses the voxel-centre convention (``align_corners=False``), so a displacement
resized from ``n`` to ``m`` voxels along an axis is multiplied by ``m / n`` along it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_INTERP = {2: "bilinear", 3: "trilinear"}


def identity_grid(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Voxel coordinates ``(ndim, *S)``: component ``i`` holds the index along axis ``i``."""
    axes = [torch.arange(n, dtype=dtype, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _normalised_grid(displacement: Tensor) -> Tensor:
    """Sampling grid for ``grid_sample(align_corners=True)``: ``(B, *S, ndim)``, axes reversed."""
    shape = displacement.shape[2:]
    ndim = len(shape)
    coords = identity_grid(shape, displacement.dtype, displacement.device).unsqueeze(0)
    coords = coords + displacement
    # index i -> 2 i / (n - 1) - 1; an axis of size 1 maps everything to its only voxel.
    scale = torch.tensor(
        [2.0 / max(n - 1, 1) for n in shape], dtype=displacement.dtype, device=displacement.device
    ).view(1, ndim, *([1] * ndim))
    grid = coords * scale - 1.0
    return grid.movedim(1, -1).flip(-1)


def warp(image: Tensor, displacement: Tensor, mode: str = "bilinear") -> Tensor:
    """Pull-back warp ``I(x + d(x))``.

    Args:
        image: ``(B, C, *S_in)``; ``S_in`` may differ from ``S`` only if the caller means
            displacement voxel units of the *output* grid (normally ``S_in == S``).
        displacement: ``(B, ndim, *S)``, voxel units.
        mode: ``"bilinear"`` (linear / trilinear) or ``"nearest"``.

    Returns:
        ``(B, C, *S)``.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"warp: mode must be 'bilinear' or 'nearest', got {mode!r}")
    grid = _normalised_grid(displacement)
    return F.grid_sample(image, grid, mode=mode, padding_mode="border", align_corners=True)


def sample(image: Tensor, points: Tensor, mode: str = "bilinear") -> Tensor:
    """``image`` at scattered voxel coordinates, border padding (the points of a sampled metric).

    Args:
        image: ``(B, C, *S)``.
        points: ``(B, ndim, N)`` voxel coordinates, component ``i`` along axis ``i`` of ``S``.
        mode: ``"bilinear"`` (linear / trilinear) or ``"nearest"``.

    Returns:
        ``(B, C, N)``: ``image(points[:, :, k])`` for each ``k``.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"sample: mode must be 'bilinear' or 'nearest', got {mode!r}")
    shape = image.shape[2:]
    ndim = len(shape)
    scale = torch.tensor(
        [2.0 / max(n - 1, 1) for n in shape], dtype=points.dtype, device=points.device
    ).view(1, ndim, 1)
    grid = (points * scale - 1.0).transpose(1, 2).flip(-1)  # (B, N, ndim), axes reversed
    grid = grid.view(grid.shape[0], *([1] * (ndim - 1)), grid.shape[1], ndim)
    out = F.grid_sample(image, grid, mode=mode, padding_mode="border", align_corners=True)
    return out.flatten(2)


def warp_labels(labels: Tensor, displacement: Tensor, num_classes: int | None = None) -> Tensor:
    """Warp an integer label map by argmax of the linearly warped one-hot encoding.

    Args:
        labels: ``(B, 1, *S)`` integer labels.
        displacement: ``(B, ndim, *S)``.
        num_classes: number of classes (default ``labels.max() + 1``).

    Returns:
        ``(B, 1, *S)`` labels of the same dtype.
    """
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    onehot = F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).to(displacement.dtype)
    warped = warp(onehot, displacement, mode="bilinear")
    return warped.argmax(dim=1, keepdim=True).to(labels.dtype)


def compose(d: Tensor, u: Tensor) -> Tensor:
    """``u + d ∘ (Id + u)``, i.e. ``x ↦ u(x) + d(x + u(x))``: the step ``u`` applied first."""
    return u + warp(d, u, mode="bilinear")


def resize(x: Tensor, size: Sequence[int], mode: str = "linear") -> Tensor:
    """Resize ``(B, C, *S)`` to ``size`` (voxel-centre convention).

    ``mode="area"`` averages (for downsampling images); ``"linear"`` is (bi/tri)linear.
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=_INTERP[len(size)], align_corners=False)


def resize_displacement(displacement: Tensor, size: Sequence[int]) -> Tensor:
    """Resize a displacement to ``size`` and rescale each component to the new voxel units."""
    old = displacement.shape[2:]
    out = resize(displacement, size, mode="linear")
    ratio = torch.tensor(
        [s / o for s, o in zip(size, old)], dtype=out.dtype, device=out.device
    ).view(1, -1, *([1] * len(size)))
    return out * ratio
