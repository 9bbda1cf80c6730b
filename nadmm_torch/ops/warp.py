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
    out = F.grid_sample(image, grid, mode=mode, padding_mode="border", align_corners=True)
    if mode == "bilinear" and image.shape[2:] == displacement.shape[2:]:
        out = _exact_where_zero(image, displacement, out)
    return out


def _exact_where_zero(image: Tensor, displacement: Tensor, sampled: Tensor) -> Tensor:
    """``sampled`` with the voxels where ``d(x) = 0`` replaced by ``image(x)`` exactly.

    ``grid_sample`` works in normalised coordinates: index ``i`` goes through
    ``2 i / (n - 1) - 1`` and back, which is not exact in floating point (float32: up to
    ~1e-5 of the image's range at 128 voxels), so a zero displacement would move the image a
    little, and a solver whose force does not shrink with the residual (the l1 data term)
    turns that into motion between identical images. The value is the image's own; the
    gradient is ``grid_sample``'s (with respect to the image and the displacement), so the
    warp stays differentiable at ``d = 0``.
    """
    zero = (displacement == 0).all(dim=1, keepdim=True)  # (B, 1, *S), broadcast over C
    exact = torch.where(zero, image, sampled)
    if torch.is_grad_enabled() and (image.requires_grad or displacement.requires_grad):
        # value: ``exact``; gradient: ``sampled``'s everywhere
        exact = torch.where(zero, image.detach(), sampled) + (sampled - sampled.detach()) * zero
    return exact


# Labels warped at once by :func:`warp_labels`: its memory is this many one-hot channels.
LABEL_CHUNK = 16


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

    Only the labels present in ``labels`` are encoded (remapped to ``0 … K−1``), never
    ``0 … max``: a FreeSurfer-style map with ids up to 60000 costs ``K`` channels, not 60001.
    They are warped :data:`LABEL_CHUNK` at a time with a running maximum, so memory stays at
    that many channels for any ``K``. Ties go to the smallest label (as ``argmax`` does).

    Args:
        labels: ``(B, 1, *S)`` integer labels (any values, negative ones too).
        displacement: ``(B, ndim, *S)``.
        num_classes: optional; if given, every label must lie in ``[0, num_classes)``.

    Returns:
        ``(B, 1, *S)`` labels of the same dtype.
    """
    values, index = torch.unique(labels, return_inverse=True)  # sorted; index: labels' shape
    if num_classes is not None and (int(values[0]) < 0 or int(values[-1]) >= num_classes):
        raise ValueError(
            f"labels: expected values in [0, {num_classes}), got [{int(values[0])}, "
            f"{int(values[-1])}]"
        )
    index = index[:, 0]  # (B, *S)
    best_value = best_index = None
    for lo in range(0, values.numel(), LABEL_CHUNK):
        k = min(LABEL_CHUNK, values.numel() - lo)
        ids = torch.arange(lo, lo + k, device=labels.device).view(1, k, *([1] * (index.dim() - 1)))
        onehot = (index.unsqueeze(1) == ids).to(displacement.dtype)  # (B, k, *S)
        chunk_value, chunk_arg = warp(onehot, displacement, mode="bilinear").max(dim=1)
        if best_value is None:
            best_value, best_index = chunk_value, chunk_arg
        else:
            better = chunk_value > best_value  # strictly: ties keep the smaller label
            best_value = torch.where(better, chunk_value, best_value)
            best_index = torch.where(better, chunk_arg + lo, best_index)
    return values[best_index].unsqueeze(1).to(labels.dtype)


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
