"""Affine registration: a pyramid of BFGS steps on NCC or mutual information, batched.

Coordinates of the result. The matrix ``A`` ``(B, ndim, ndim + 1)`` maps a *fixed*-grid voxel
index ``x`` (array order of ``S``: ``(z, y, x)`` or ``(y, x)``) to the *moving*-grid voxel index
``y = A[:, :, :ndim] @ x + A[:, :, ndim]``: a pull-back, like the library's displacements, whose
displacement is ``d(x) = A x + t − x`` (:func:`affine_to_displacement`). Voxel ``x`` sits at
``x`` exactly (index 0 is the first voxel centre).

Parametrisation used by the optimiser (physical and centred, so that rotations, scalings and
translations are equally well conditioned whatever the image size or spacing): with ``H =
diag(spacing)`` (mm), the grid centre ``c = (n − 1) / 2`` (voxels) and ``R`` the largest
half-extent of the image in mm, a point ``x`` has centred normalised coordinates
``p = H (x − c) / R``, and the transform is ``q = (I + δ) p + τ`` with the moving point at
``y = c + R H⁻¹ q``. The parameters ``δ`` ``(ndim, ndim)`` and ``τ`` ``(ndim,)`` are
dimensionless (``τ = 0.01`` is 1 % of the half-extent), and do not depend on the pyramid level:
a level of ``m`` voxels along an axis of ``n`` has spacing ``h n / m`` and centre ``(m − 1)/2``
(voxel-centre convention of :func:`nadmm_torch.ops.warp.resize`), the same physical frame.

Differentiability: the optimisation runs without an autograd graph; when an image requires
grad, the result carries the implicit-function-theorem gradient at the optimum
(``dθ*/dI = −∇²ₚL⁻¹ ∂(∇ₚL)/∂I``), attached by one zero-valued Newton step, so the returned
values are the same with or without grad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .solver import pyramid_factors
from .warp import identity_grid, resize, sample

SIMILARITIES = ("ncc", "mi")


# -- coordinates -----------------------------------------------------------------------------


def affine_to_displacement(A: Tensor, shape: Sequence[int]) -> Tensor:
    """The displacement ``d(x) = A[:, :, :n] x + A[:, :, n] − x`` of ``A`` ``(B, n, n + 1)``
    on a grid of ``shape`` (``n`` axes): ``(B, n, *shape)`` in voxel units (pull-back)."""
    n = len(shape)
    x = identity_grid(shape, A.dtype, A.device).flatten(1)  # (n, N)
    y = torch.einsum("bij,jk->bik", A[:, :, :n], x) + A[:, :, n:]
    return (y - x).view(A.shape[0], n, *shape)


def _frame(shape: Sequence[int], spacing: Sequence[float], ref: Tensor):
    """``(c, h, R)``: grid centre (voxels), spacing (mm) as ``(n,)`` tensors, half-extent (mm)."""
    c = torch.tensor([(m - 1) / 2 for m in shape], dtype=ref.dtype, device=ref.device)
    h = torch.tensor(list(spacing), dtype=ref.dtype, device=ref.device)
    radius = max(max(m * s / 2 for m, s in zip(shape, spacing)), 1e-12)
    return c, h, radius


def params_to_matrix(
    theta: Tensor, shape: Sequence[int], spacing: Sequence[float]
) -> Tensor:
    """Centred physical parameters ``θ = (δ.flatten(), τ)`` ``(B, n² + n)`` → voxel matrix
    ``A`` ``(B, n, n + 1)`` on a grid of ``shape`` with ``spacing`` (see the module doc)."""
    n = len(shape)
    c, h, radius = _frame(shape, spacing, theta)
    delta = theta[:, : n * n].view(-1, n, n)
    tau = theta[:, n * n :]
    eye = torch.eye(n, dtype=theta.dtype, device=theta.device)
    lin = (eye + delta) * h[None, None, :] / h[None, :, None]  # H⁻¹ (I + δ) H
    trans = c + radius * tau / h - torch.einsum("bij,j->bi", lin, c)
    return torch.cat([lin, trans[:, :, None]], dim=2)


def matrix_to_params(A: Tensor, shape: Sequence[int], spacing: Sequence[float]) -> Tensor:
    """Inverse of :func:`params_to_matrix`: ``(B, n, n + 1)`` → ``(B, n² + n)``."""
    n = len(shape)
    c, h, radius = _frame(shape, spacing, A)
    lin, trans = A[:, :, :n], A[:, :, n]
    delta = lin * h[None, :, None] / h[None, None, :] - torch.eye(n, dtype=A.dtype, device=A.device)
    tau = (trans - c + torch.einsum("bij,j->bi", lin, c)) * h / radius
    return torch.cat([delta.flatten(1), tau], dim=1)


def inside_mask(A: Tensor, shape: Sequence[int], margin: float = 0.0) -> Tensor:
    """``(B, 1, *shape)``: 1 where ``A x`` lies inside the moving grid (``margin`` voxels in)."""
    y = affine_to_displacement(A, shape) + identity_grid(shape, A.dtype, A.device)
    return _inside(y.flatten(2), shape, margin).view(A.shape[0], 1, *shape)


def _inside(y: Tensor, shape: Sequence[int], margin: float = 0.0) -> Tensor:
    """``(B, 1, N)`` float: 1 where the points ``y`` ``(B, n, N)`` lie inside the grid."""
    upper = torch.tensor([m - 1 for m in shape], dtype=y.dtype, device=y.device).view(1, -1, 1)
    ok = (y >= margin) & (y <= upper - margin)
    return ok.all(dim=1, keepdim=True).to(y.dtype)


# -- similarities ----------------------------------------------------------------------------


def robust_scale(x: Tensor, low: float = 0.005, high: float = 0.995) -> Tensor:
    """Each image of ``x`` ``(B, C, *S)`` mapped linearly so its ``low``/``high`` quantiles go
    to 0 and 1, then clipped to [0, 1]: one hot voxel cannot squash the rest of the range."""
    flat = x.detach().flatten(1)
    if flat.shape[1] > 2**24:  # torch.quantile's size limit: a regular subsample
        flat = flat[:, :: math.ceil(flat.shape[1] / 2**24)]
    q = torch.quantile(flat, torch.tensor([low, high], dtype=x.dtype, device=x.device), dim=1)
    lo, hi = q[0], q[1]
    hi = torch.where(hi > lo, hi, flat.amax(dim=1))
    scale = (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)
    view = (-1,) + (1,) * (x.dim() - 1)
    return ((x - lo.view(view)) / scale.view(view)).clamp(0.0, 1.0)


def ncc_loss(fixed: Tensor, warped: Tensor, weight: Tensor | None = None) -> Tensor:
    """``1 − NCC`` per batch element ``(B,)``, global over the (weighted) voxels.

    ``fixed``, ``warped``: ``(B, 1, *S)``; ``weight``: ``(B, 1, *S)`` or ``None``. Invariant to
    each image's offset and positive scale; 0 for a perfect linear intensity match.
    """
    w = torch.ones_like(fixed) if weight is None else weight
    w = w.flatten(1) / w.flatten(1).sum(1, keepdim=True).clamp_min(1e-12)
    f, m = fixed.flatten(1), warped.flatten(1)
    f = f - (w * f).sum(1, keepdim=True)
    m = m - (w * m).sum(1, keepdim=True)
    cov = (w * f * m).sum(1)
    var = (w * f * f).sum(1) * (w * m * m).sum(1)
    return 1.0 - cov * torch.rsqrt(var.clamp_min(1e-12))


def _bspline3(t: Tensor) -> Tensor:
    """Cubic B-spline weights ``(..., 4)`` of the bins ``i − 1 … i + 2`` at fraction ``t``."""
    t2, t3 = t * t, t * t * t
    return torch.stack(
        [(1 - t) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3], dim=-1
    ) / 6.0


def mi_loss(
    fixed: Tensor, warped: Tensor, weight: Tensor | None = None, bins: int = 32
) -> Tensor:
    """``−MI`` per batch element ``(B,)`` (nats), with Mattes' Parzen windows.

    ``fixed``, ``warped``: ``(B, 1, *S)`` (or ``(B, 1, N)`` samples) with intensities in
    [0, 1] (see :func:`robust_scale`); ``weight``: same shape or ``None``. As in Mattes et al.
    (IEEE TMI 2003): the fixed intensity falls in one bin, the warped one spreads over four
    with a cubic B-spline, so the joint histogram and the loss are smooth in the warped
    intensities; two bins of padding each side keep the spline inside the ``bins``.
    """
    B = fixed.shape[0]
    w = torch.ones_like(fixed) if weight is None else weight
    w = w.reshape(B, -1)
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    span = bins - 4
    fbin = (fixed.reshape(B, -1).detach() * span + 2.0).round().long().clamp(2, bins - 2)
    z = warped.reshape(B, -1).clamp(0.0, 1.0) * span + 2.0
    i0 = z.detach().floor().clamp(2, bins - 3)
    weights = _bspline3(z - i0) * w[..., None]  # (B, N, 4)
    mbin = i0.long()[..., None] + torch.arange(-1, 3, device=z.device)
    index = (fbin[..., None] * bins + mbin).reshape(B, -1)
    joint = z.new_zeros(B, bins * bins).scatter_add(1, index, weights.reshape(B, -1))
    joint = joint.view(B, bins, bins).clamp_min(1e-12)
    mf, mm = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
    return -(joint * (joint.log() - mf.log() - mm.log())).sum((1, 2))


def similarity_loss(name: str, fixed: Tensor, warped: Tensor, weight: Tensor | None) -> Tensor:
    """The loss ``(B,)`` of :data:`SIMILARITIES` ``name`` (lower is better)."""
    if name == "ncc":
        return ncc_loss(fixed, warped, weight)
    if name == "mi":
        return mi_loss(fixed, warped, weight)
    raise ValueError(f"similarity: expected one of {list(SIMILARITIES)}, got {name!r}")


# -- optimiser -------------------------------------------------------------------------------


def centre_of_mass(x: Tensor) -> Tensor:
    """Intensity centroid ``(B, ndim)`` in voxels of non-negative images ``(B, 1, *S)``."""
    shape = x.shape[2:]
    grid = identity_grid(shape, x.dtype, x.device).flatten(1)  # (n, N)
    w = x.flatten(1)
    total = w.sum(1, keepdim=True).clamp_min(1e-12)
    return (w @ grid.T) / total


def initial_params(fixed: Tensor, moving: Tensor, spacing: Sequence[float]) -> Tensor:
    """``θ`` ``(B, n² + n)``: identity linear part, the translation that aligns the intensity
    centroids of the (non-negative, scaled) images."""
    shape = fixed.shape[2:]
    n = len(shape)
    c, h, radius = _frame(shape, spacing, fixed)
    tau = (centre_of_mass(moving) - centre_of_mass(fixed)) * h / radius
    delta = fixed.new_zeros(fixed.shape[0], n * n)
    return torch.cat([delta, tau], dim=1)


def sample_points(shape: Sequence[int], max_points: int, ref: Tensor) -> Tensor:
    """Fixed-grid voxel indices ``(n, N)`` where a level's similarity is evaluated: every voxel,
    or ``max_points`` of them drawn at random (a fixed seed, so runs repeat) on large grids."""
    grid = identity_grid(shape, ref.dtype, ref.device).flatten(1)
    if grid.shape[1] <= max_points:
        return grid
    gen = torch.Generator().manual_seed(0)
    keep = torch.randperm(grid.shape[1], generator=gen)[:max_points].sort().values
    return grid[:, keep.to(ref.device)]


def level_loss(
    theta: Tensor,
    points: Tensor,
    fixed_values: Tensor,
    moving: Tensor,
    spacing: Sequence[float],
    similarity: str,
) -> Tensor:
    """Similarity ``(B,)`` at one pyramid level under ``θ`` ``(B, P)``.

    ``points``: fixed voxel indices ``(n, N)``; ``fixed_values``: the fixed image there
    ``(B, 1, N)``; ``moving``: the level's moving image ``(B, 1, *S)``. Points whose sample falls
    outside the moving grid are left out (their values would be border copies).
    """
    shape = moving.shape[2:]
    n = len(shape)
    A = params_to_matrix(theta, shape, spacing)
    y = torch.einsum("bij,jk->bik", A[:, :, :n], points) + A[:, :, n:]
    warped = sample(moving, y)
    weight = _inside(y.detach(), shape)
    # Sums over many voxels in float64: line searches compare losses to ~1e-7.
    loss = similarity_loss(
        similarity, fixed_values.double(), warped.double(), weight.double()
    )
    return loss.to(theta.dtype)


def _value_and_grad(loss_fn, theta: Tensor) -> tuple[Tensor, Tensor]:
    theta = theta.detach().requires_grad_(True)
    loss = loss_fn(theta)
    (grad,) = torch.autograd.grad(loss.sum(), theta)
    return loss.detach(), grad


def _line_search(loss_fn, theta, f, g, p, trials: int = 12):
    """Backtracking (Armijo) per batch element: the step ``α ∈ {1, ½, ¼, …}`` along ``p``
    ``(B, P)`` that lowers each element's loss enough; ``α = 0`` where none does."""
    alpha = torch.ones_like(f)
    slope = (g * p).sum(1)
    accepted = torch.zeros_like(f, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(trials):
            trial = loss_fn(theta + alpha[:, None] * p)
            ok = ~accepted & (trial <= f + 1e-4 * alpha * slope)
            accepted |= ok
            if bool(accepted.all()):
                break
            alpha = torch.where(accepted, alpha, alpha / 2)
    return torch.where(accepted, alpha, torch.zeros_like(alpha))


def _optimise_level(theta, loss_fn, iterations: int, max_step: float, tol: float, hinv=None):
    """BFGS, batched: one inverse-Hessian estimate ``(B, P, P)`` and one line search per batch
    element (the loss sums independent elements, so each is optimised as it would be alone).

    No step moves a parameter by more than ``max_step``; an element stops once its steps are
    below ``tol``. ``hinv``: the estimate to start from (the previous level's), else a scaled
    identity. Returns ``(θ, hinv)``.
    """
    B, P = theta.shape
    eye = torch.eye(P, dtype=theta.dtype, device=theta.device)
    f, g = _value_and_grad(loss_fn, theta)
    if hinv is None:
        hinv = eye * (max_step / g.abs().amax(1).clamp_min(1e-30))[:, None, None]
    active = torch.ones(B, dtype=torch.bool, device=theta.device)
    fresh = torch.ones(B, dtype=torch.bool, device=theta.device)  # hinv is a scaled identity
    for _ in range(iterations):
        p = -(hinv @ g[:, :, None])[:, :, 0]
        p = p * (max_step / p.abs().amax(1).clamp_min(max_step))[:, None]
        alpha = _line_search(loss_fn, theta, f, g, p) * active
        s = alpha[:, None] * p
        theta = theta + s
        f_new, g_new = _value_and_grad(loss_fn, theta)
        y = g_new - g
        sy = (s * y).sum(1)
        upd = sy > 1e-12 * (s.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-30)
        rho = torch.where(upd, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))[:, None, None]
        v = eye - rho * s[:, :, None] * y[:, None, :]
        hinv = v @ hinv @ v.transpose(1, 2) + rho * s[:, :, None] * s[:, None, :]
        f, g = torch.where(active, f_new, f), g_new
        # No descent along the quasi-Newton direction: restart from steepest descent once; an
        # element stops when that fails too, or when its step is negligible.
        failed = active & (alpha == 0)
        active = active & ~(failed & fresh) & ~((alpha > 0) & (s.abs().amax(1) < tol))
        scale = (max_step / g.abs().amax(1).clamp_min(1e-30))[:, None, None]
        hinv = torch.where(failed[:, None, None], eye * scale, hinv)
        fresh = failed
        if not bool(active.any()):
            break
    return theta.detach(), hinv


def _implicit(theta: Tensor, loss_fn) -> Tensor:
    """``θ`` unchanged in value, with the gradient ``−∇²L⁻¹ ∂(∇L)/∂images`` attached."""
    theta = theta.detach().requires_grad_(True)
    loss = loss_fn(theta).sum()
    (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
    rows = [
        torch.autograd.grad(grad[:, j].sum(), theta, retain_graph=True)[0]
        for j in range(theta.shape[1])
    ]
    hess = torch.stack(rows, dim=1).detach()  # (B, P, P): the loss sums independent elements
    eye = torch.eye(theta.shape[1], dtype=theta.dtype, device=theta.device)
    hess = hess + 1e-8 * hess.diagonal(dim1=1, dim2=2).abs().amax(1)[:, None, None] * eye
    step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
    return theta.detach() - (step - step.detach())


def affine_register(
    fixed: Tensor,
    moving: Tensor,
    spacing: Sequence[float] | None = None,
    *,
    similarity: str = "ncc",
    levels: int = 3,
    iterations: Sequence[int] = (50, 30, 20),
    max_step: float = 0.05,
    init: str = "com",
    max_points: int = 2**15,
) -> Tensor:
    """Affine ``A`` ``(B, n, n + 1)`` (voxel indices, fixed → moving, see the module doc).

    Args:
        fixed, moving: ``(B, 1, *S)`` floating images (validated by the caller), ``n = len(S)``.
        spacing: ``n`` spacings in mm in the order of ``S`` (default 1).
        similarity: ``"ncc"`` (global normalised cross-correlation: same contrast up to a
            linear map) or ``"mi"`` (mutual information: any one-to-one intensity relation).
        levels: pyramid levels, each halving the axes (not thick or short ones) of the next.
        iterations: most BFGS steps per level, coarse → fine (one value, or one per level).
        max_step: the largest change of a parameter in one step (dimensionless, see the module
            doc: 0.05 is 5 % of the half-extent, or about 3°).
        init: ``"com"`` (translation aligning the intensity centroids) or ``"identity"``.
        max_points: most voxels per level at which the similarity is evaluated (a random,
            seeded subset beyond that; see :func:`sample_points`).
    """
    shape = tuple(fixed.shape[2:])
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * len(shape)
    its = [int(iterations)] * levels if isinstance(iterations, int) else list(iterations)
    want_grad = torch.is_grad_enabled() and (fixed.requires_grad or moving.requires_grad)
    f_s, m_s = robust_scale(fixed), robust_scale(moving)
    with torch.no_grad():
        if init == "com":
            theta = initial_params(f_s, m_s, spacing)
        else:
            theta = f_s.new_zeros(fixed.shape[0], len(shape) ** 2 + len(shape))
    factors = pyramid_factors(shape, spacing, levels, True, 16)
    hinv = None

    def loss_at(f_l, m_l, sp, points):
        values = sample(f_l, points.expand(f_l.shape[0], -1, -1))
        return lambda th: level_loss(th, points, values, m_l, sp, similarity)

    with torch.enable_grad():
        for level, fac in enumerate(factors):
            size = tuple(max(1, round(n / f)) for n, f in zip(shape, fac))
            sp = tuple(h * n / m for h, n, m in zip(spacing, shape, size))
            f_l = resize(f_s.detach(), size, mode="area")
            m_l = resize(m_s.detach(), size, mode="area")
            loss_fn = loss_at(f_l, m_l, sp, sample_points(size, max_points, f_l))
            # Stop at steps that move no point by more than ~0.01 voxel of this level.
            tol = 0.01 * min(sp) / _frame(size, sp, f_l)[2]
            theta, hinv = _optimise_level(theta, loss_fn, its[level], max_step, tol, hinv)
        if want_grad:
            points = sample_points(shape, max_points, f_s)
            theta = _implicit(theta, loss_at(f_s, m_s, spacing, points))
    return params_to_matrix(theta, shape, spacing)
