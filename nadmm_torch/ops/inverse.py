"""Inverse of a displacement field by fixed-point iteration, and inverse-consistency residuals.

A displacement ``d`` ``(B, ndim, *S)`` (voxel units, component ``i`` along axis ``i`` of ``S``)
stands for the map ``φ = Id + d``. Its inverse is the displacement ``e`` on the same grid with
``φ ∘ (Id + e) = Id``, i.e. ``e(y) = −d(y + e(y))`` for every voxel ``y``: ``e`` is a fixed
point of ``e ↦ −d ∘ (Id + e)`` (Chen et al., "A simple fixed-point approach to invert a
deformation field", Med. Phys. 35(1), 2008; ITK's ``InvertDisplacementFieldImageFilter``).
The equation at a voxel involves only ``e`` at that voxel, so every voxel converges on its own.

Damping. The plain iteration ``e ← −d ∘ (Id + e)`` multiplies the error by ``−∇d``: it
diverges wherever an eigenvalue of ``∇d`` has modulus ≥ 1 — on ACDC pairs the in-plane
displacement changes by up to 5 voxels from one 10 mm slice to the next, and the plain
iteration leaves a 99th-percentile residual of 3.4 voxels (10 pairs; damped: < 1e-4).
:func:`invert` therefore takes damped steps ``e ← e − s (e + d ∘ (Id + e))`` (``s = 1`` is
the plain iteration), which multiply the error by ``(1 − s) I − s ∇d``; the default
``s = 0.5`` (ITK's) converges for every real eigenvalue in ``(−1, 3)``, and ``λ > −1`` holds
wherever ``det(I + ∇d) > 0``.

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


def _squared_norm(v: Tensor) -> Tensor:
    """``|v|²`` over dim 1, ``(B, *S)``: a sum of channel slices (``norm(dim=1)`` reduces over
    a strided axis and costs more than the warp itself on CPU)."""
    out = v[:, 0] * v[:, 0]
    for i in range(1, v.shape[1]):
        out = out + v[:, i] * v[:, i]
    return out


def invert(
    displacement: Tensor, *, iterations: int = 50, tolerance: float = 1e-3, step: float = 0.5
) -> Tensor:
    """The inverse displacement ``e`` of ``d``: ``(Id + d) ∘ (Id + e) ≈ Id``.

    Damped fixed-point iteration ``e ← e − step · (e + d ∘ (Id + e))`` from ``e = 0`` (module
    docstring: convergence, border). Each sample of the batch stops on its own, once its
    largest residual ``|e(y) + d(y + e(y))|`` over the grid is at most ``tolerance`` voxels
    (checked before each update), so a batch gives what its samples give one by one.

    Args:
        displacement: ``d``, ``(B, ndim, *S)`` in voxel units, ``ndim`` 2 or 3.
        iterations: at most this many updates (≥ 0; each is one linear warp of ``d``).
        tolerance: largest residual norm (voxels) accepted as converged (≥ 0; 0 runs all
            ``iterations``).
        step: damping ``s`` in ``(0, 1]``; 1 is the plain fixed point ``e ← −d ∘ (Id + e)``.

    Returns:
        ``e``, ``(B, ndim, *S)`` in voxel units on the same grid, dtype of ``d`` (half
        precision is computed in float32). ``d = 0`` gives ``e = 0`` exactly.
    """
    d = _check_displacement(displacement, "displacement")
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"iterations: expected an int, got {type(iterations).__name__}")
    if iterations < 0:
        raise ValueError(f"iterations: expected >= 0, got {iterations}")
    for name, value in (("tolerance", tolerance), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not tolerance >= 0:  # also rejects NaN
        raise ValueError(f"tolerance: expected a number >= 0, got {tolerance}")
    if not 0 < step <= 1:
        raise ValueError(f"step: expected a number in (0, 1], got {step}")
    if d.dtype in _LOW_PRECISION:
        return invert(d.float(), iterations=iterations, tolerance=tolerance,
                      step=step).to(d.dtype)
    batch = d.shape[0]
    view = (batch,) + (1,) * (d.dim() - 1)
    e = torch.zeros_like(d)
    done = torch.zeros(batch, dtype=torch.bool, device=d.device)
    for _ in range(iterations):
        residual = e + warp(d, e)  # e(y) + d(y + e(y))
        with torch.no_grad():
            worst = _squared_norm(residual).flatten(1).amax(dim=1)  # (B,)
            done = done | (worst <= tolerance**2)
        if bool(done.all()):
            break
        e = torch.where(done.view(view), e, e - step * residual)
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
