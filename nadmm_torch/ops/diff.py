"""Finite differences on ``(B, C, *S)`` grids and the Jacobian determinant of displacements.

Central differences with replicated borders (one-sided half-differences at the two ends of an
axis; zero along an axis of size 1). Spacing, where given, is in the order of ``S``. Forward
differences (zero at the last index of an axis) see what central ones cannot: an oscillation
from voxel to voxel (a checkerboard) has zero central difference however large it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def central_difference(x: Tensor, dim: int) -> Tensor:
    """``(x[i+1] - x[i-1]) / 2`` along ``dim`` with replicated borders; same shape as ``x``."""
    n = x.shape[dim]
    if n == 1:
        return torch.zeros_like(x)
    padded = torch.cat([x.narrow(dim, 0, 1), x, x.narrow(dim, n - 1, 1)], dim=dim)
    return (padded.narrow(dim, 2, n) - padded.narrow(dim, 0, n)) * 0.5


def spatial_gradient(x: Tensor, spacing: Sequence[float] | None = None) -> Tensor:
    """Gradient of every channel along every spatial axis.

    Args:
        x: ``(B, C, *S)`` with ``len(S)`` = ndim in {2, 3}.
        spacing: ``ndim`` grid spacings (default 1: voxel units).

    Returns:
        ``(B, C, ndim, *S)``: component ``i`` is the derivative along spatial axis ``i``.
    """
    ndim = x.dim() - 2
    grads = []
    for i in range(ndim):
        g = central_difference(x, 2 + i)
        if spacing is not None:
            g = g / float(spacing[i])
        grads.append(g)
    return torch.stack(grads, dim=2)


def jacobian_matrix(displacement: Tensor) -> Tensor:
    """``J = I + ∇d`` in voxel units.

    Args:
        displacement: ``(B, ndim, *S)``, voxel units.

    Returns:
        ``(B, ndim, ndim, *S)`` with ``J[:, i, j] = δ_ij + ∂_j d_i``.
    """
    ndim = displacement.shape[1]
    grad = spatial_gradient(displacement)  # (B, ndim(i), ndim(j), *S)
    eye = torch.eye(ndim, dtype=displacement.dtype, device=displacement.device)
    return grad + eye.view(1, ndim, ndim, *([1] * ndim))


def determinant(jac: Tensor) -> Tensor:
    """Point-wise determinant of ``(B, n, n, *S)`` matrices (n = 2 or 3): ``(B, *S)``."""
    n = jac.shape[1]
    if n not in (2, 3):
        raise ValueError(f"determinant: expected 2x2 or 3x3 matrices, got {n}x{n}")
    return _determinant(n, lambda i, j: jac[:, i, j])


def _determinant(n: int, entry: Callable[[int, int], Tensor]) -> Tensor:
    """Determinant (n = 2 or 3) from a function giving entry ``(i, j)`` as a tensor."""
    if n == 2:
        return entry(0, 0) * entry(1, 1) - entry(0, 1) * entry(1, 0)
    a, b, c = entry(0, 0), entry(0, 1), entry(0, 2)
    d, e, f = entry(1, 0), entry(1, 1), entry(1, 2)
    g, h, i = entry(2, 0), entry(2, 1), entry(2, 2)
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def jacobian_determinant(displacement: Tensor) -> Tensor:
    """``det(I + ∇d)`` (central differences, voxel units; independent of spacing).

    Args:
        displacement: ``(B, ndim, *S)``.

    Returns:
        ``(B, *S)``.
    """
    ndim = displacement.shape[1]
    if ndim not in (2, 3):
        return determinant(jacobian_matrix(displacement))
    # Entries of I + ∇d taken from the gradients directly, without building the (B, n, n, *S)
    # matrix: the safeguard evaluates this after every warp.
    grads = [central_difference(displacement, 2 + j) for j in range(ndim)]  # ∂_j d, (B, n, *S)
    return _determinant(
        ndim, lambda i, j: grads[j][:, i] + 1.0 if i == j else grads[j][:, i]
    )


def forward_difference(x: Tensor, dim: int) -> Tensor:
    """``x[i+1] - x[i]`` along ``dim`` (0 at the last index); same shape as ``x``."""
    n = x.shape[dim]
    if n == 1:
        return torch.zeros_like(x)
    diff = x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)
    return torch.cat([diff, torch.zeros_like(x.narrow(dim, 0, 1))], dim=dim)


def forward_jacobian_determinant(displacement: Tensor) -> Tensor:
    """``det(I + ∇d)`` with forward differences (voxel units): ``(B, ndim, *S)`` → ``(B, *S)``.

    At voxel ``x`` this is the determinant of the map on the cell spanned by ``x`` and its
    forward neighbours (at the last index of an axis, that axis's column is the identity's).
    """
    ndim = displacement.shape[1]
    grads = [forward_difference(displacement, 2 + j) for j in range(ndim)]
    return _determinant(
        ndim, lambda i, j: grads[j][:, i] + 1.0 if i == j else grads[j][:, i]
    )
