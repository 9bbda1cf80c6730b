"""Inverse of a displacement field by fixed-point iteration, and inverse-consistency residuals.

A displacement ``d`` ``(B, ndim, *S)`` (voxel units, component ``i`` along axis ``i`` of ``S``)
stands for the map ``φ = Id + d``. Its inverse is the displacement ``e`` on the same grid with
``φ ∘ (Id + e) = Id``, i.e. ``e(y) = −d(y + e(y))`` for every voxel ``y``: ``e`` is a fixed
point of ``e ↦ −d ∘ (Id + e)``. Iterating that map from ``e = 0`` is the "fixed-point inverse"
of Chen et al. (Med. Phys. 35(1), 2008), which ITK's ``InvertDisplacementFieldImageFilter``
also uses. One iteration is one linear warp of ``d``; the error shrinks each iteration by the
local Lipschitz constant of ``d`` (about ``max |∇d|``), so smooth fields of moderate stretch
converge in a few tens of iterations.

Borders: ``d`` is evaluated with :func:`nadmm_torch.ops.warp.warp`, which extends it beyond
the grid by its border values (border padding). Near the grid's edge, where ``y + e(y)`` leaves
the grid, ``e`` is the inverse of that extension; unlike ITK's filter (whose default sets the
inverse to zero on the boundary voxels), nothing is forced there. The residuals of
:func:`inverse_residuals` use the same extension, so they measure what :func:`invert` solved.

Everything is plain differentiable torch (``grid_sample`` and arithmetic): gradients flow
through the unrolled iterations to ``d``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .warp import compose, warp

__all__ = ["invert", "inverse_residuals"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_displacement(displacement: object, name: str) -> Tensor:
    if not isinstance(displacement, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(displacement).__name__}")
    if displacement.dim() not in (4, 5) or displacement.shape[1] != displacement.dim() - 2:
        raise ValueError(
            f"{name}: expected a (B, 2, H, W) or (B, 3, D, H, W) displacement, got shape "
            f"{tuple(displacement.shape)}"
        )
    if not displacement.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {displacement.dtype}")
    if displacement.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape "
                         f"{tuple(displacement.shape)}")
    if not bool(torch.isfinite(displacement).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or Inf")
    return displacement


def invert(displacement: Tensor, *, iterations: int = 50, tolerance: float = 1e-3) -> Tensor:
    """The inverse displacement ``e`` of ``d``: ``(Id + d) ∘ (Id + e) ≈ Id``.

    Fixed-point iteration ``e ← −d ∘ (Id + e)`` from ``e = 0`` (see the module docstring for
    convergence and the border). Each sample of the batch stops on its own, once its largest
    residual ``|e(y) + d(y + e(y))|`` over the grid is at most ``tolerance`` voxels (checked
    before each update), so a batch gives what its samples give one by one.

    Args:
        displacement: ``d``, ``(B, ndim, *S)`` in voxel units, ``ndim`` 2 or 3.
        iterations: at most this many updates (≥ 0; each is one linear warp of ``d``).
        tolerance: largest residual norm (voxels) accepted as converged (≥ 0; 0 runs all
            ``iterations``).

    Returns:
        ``e``, ``(B, ndim, *S)`` in voxel units on the same grid, dtype of ``d`` (half
        precision is computed in float32). ``d = 0`` gives ``e = 0`` exactly.
    """
    d = _check_displacement(displacement, "displacement")
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"iterations: expected an int, got {type(iterations).__name__}")
    if iterations < 0:
        raise ValueError(f"iterations: expected >= 0, got {iterations}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float):
        raise TypeError(f"tolerance: expected a number, got {type(tolerance).__name__}")
    if not tolerance >= 0:  # also rejects NaN
        raise ValueError(f"tolerance: expected a number >= 0, got {tolerance}")
    if d.dtype in _LOW_PRECISION:
        return invert(d.float(), iterations=iterations, tolerance=tolerance).to(d.dtype)
    batch = d.shape[0]
    view = (batch,) + (1,) * (d.dim() - 1)
    e = torch.zeros_like(d)
    done = torch.zeros(batch, dtype=torch.bool, device=d.device)
    for _ in range(iterations):
        w = warp(d, e)  # d(y + e(y))
        with torch.no_grad():
            worst = (e + w).norm(dim=1).flatten(1).amax(dim=1)  # (B,)
            done = done | (worst <= tolerance)
        if bool(done.all()):
            break
        e = torch.where(done.view(view), e, -w)
    return e


def inverse_residuals(displacement: Tensor, inverse: Tensor) -> tuple[Tensor, Tensor]:
    """How far ``inverse`` is from inverting ``displacement``, per voxel, in voxels.

    Args:
        displacement: ``d``, ``(B, ndim, *S)`` voxel units.
        inverse: ``e``, same shape.

    Returns:
        ``(right, left)``, each ``(B, *S)``: the norms of the residual displacements of
        ``(Id + d) ∘ (Id + e) − Id`` (``compose(d, e)``, "``d ∘ d⁻¹``") and
        ``(Id + e) ∘ (Id + d) − Id`` (``compose(e, d)``, "``d⁻¹ ∘ d``"). Both are 0 for an
        exact inverse.
    """
    d = _check_displacement(displacement, "displacement")
    e = _check_displacement(inverse, "inverse")
    if e.shape != d.shape:
        raise ValueError(
            f"inverse: expected the displacement's shape {tuple(d.shape)}, got {tuple(e.shape)}"
        )
    e = e.to(d.dtype)
    return compose(d, e).norm(dim=1), compose(e, d).norm(dim=1)
