"""Nesterov-accelerated ADMM for one linearisation of the registration model.

Model (``docs/method.md``), for a velocity ``u`` of shape ``(B, ndim, *S)``::

    minimise  (λ/p) Σ_x |g·u + c|^p  +  ½ Σ_i h_i² ⟨u_i, (−Δ_h)^n u_i⟩

with ``g = ∇(warped moving)`` ``(B, ndim, *S)``, ``c = warped − fixed`` ``(B, 1, *S)`` and
``p ∈ {1, 2}``. Images of ``C > 1`` channels (p = 2 only) sum the data term over them,
``(λ/2) Σ_x Σ_c |g_c·u + c_c|²``, with ``g`` ``(B, C, ndim, *S)`` and ``c`` ``(B, C, *S)``.
Splitting ``v = u`` gives a point-wise v-step (closed form) and a spectral u-step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .fourier import (
    apply_spectral,
    dct_into,
    laplacian_symbol,
    regulariser_weights,
    shifted_inverse,
)

DATA_TERMS = ("l2", "l1")
# The v-step of l2 over C > 1 channels (an internal kind: the caller asks for "l2"). Its data
# term is the per-voxel quadratic ``(λ/2)(vᵀHv + 2 qᵀv + const)`` of :func:`normal_equations`.
L2_CHANNELS = "l2-channels"
# Guards the p = 1 middle case against s = |g|² = 0 (there g = 0, so the step does not matter).
L1_EPS = 1e-8

Schedule = float | Tensor  # a scalar, or a (K,) tensor indexed by iteration


def l2_coefficient(s: Tensor, lam: Schedule, theta: Schedule) -> Tensor:
    """``κ = λ / (θ + λ|g|²)`` of the p = 2 v-step; ``s = |g|²`` ``(B, 1, *S)``."""
    return lam / (theta + lam * s)


def l2_apply(w: Tensor, g: Tensor, c: Tensor, kappa: Tensor) -> Tensor:
    """p = 2 v-step from its precomputed coefficient: ``w − κ (g·w + c) g``."""
    r = (g * w).sum(dim=1, keepdim=True) + c
    return torch.addcmul(w, kappa * r, g, value=-1.0)


def l1_coefficient(s: Tensor, lam: Schedule, theta: Schedule) -> tuple[Schedule, Tensor]:
    """``(τ = λ/θ, 1/(|g|² + ε))`` of the p = 1 v-step."""
    return lam / theta, 1.0 / (s + L1_EPS)


def l1_apply(w: Tensor, g: Tensor, c: Tensor, coefficient: tuple[Schedule, Tensor]) -> Tensor:
    """p = 1 v-step from its precomputed coefficients.

    The three cases (``r < −τ|g|²``: step τ; ``r > τ|g|²``: step −τ; else ``−r/|g|²``) are one
    clamp of ``−r/|g|²`` to ``[−τ, τ]``.
    """
    tau, inv_s = coefficient
    r = (g * w).sum(dim=1, keepdim=True) + c
    step = torch.clamp(-r * inv_s, -tau, tau) if isinstance(tau, Tensor) else (
        (-r * inv_s).clamp(-tau, tau)
    )
    return torch.addcmul(w, step, g)


def v_step_l2(w: Tensor, g: Tensor, c: Tensor, s: Tensor, lam: Schedule, theta: Schedule) -> Tensor:
    """``argmin_v (λ/2)|g·v + c|² + (θ/2)|v − w|²`` point-wise (Sherman–Morrison).

    Shapes: ``w, g`` ``(B, ndim, *S)``; ``c, s = |g|²`` ``(B, 1, *S)``.
    """
    return l2_apply(w, g, c, l2_coefficient(s, lam, theta))


def v_step_l1(w: Tensor, g: Tensor, c: Tensor, s: Tensor, lam: Schedule, theta: Schedule) -> Tensor:
    """``argmin_v λ|g·v + c| + (θ/2)|v − w|²`` point-wise (three-case thresholding)."""
    return l1_apply(w, g, c, l1_coefficient(s, lam, theta))


def normal_equations(g: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The per-voxel quadratic of the l2 data term over ``C`` channels,
    ``Σ_c |g_c·v + c_c|² = vᵀHv + 2 qᵀv + Σ_c c_c²``.

    Shapes: ``g`` ``(B, C, ndim, *S)``, ``c`` ``(B, C, *S)``; returns ``H = Σ_c g_c g_cᵀ``
    ``(B, ndim, ndim, *S)`` (symmetric, positive semi-definite) and ``q = Σ_c c_c g_c``
    ``(B, ndim, *S)``.
    """
    ndim = g.shape[2]
    entries = {(i, j): (g[:, :, i] * g[:, :, j]).sum(1) for i in range(ndim)
               for j in range(i, ndim)}
    h = torch.stack([torch.stack([entries[min(i, j), max(i, j)] for j in range(ndim)], 1)
                     for i in range(ndim)], 1)
    return h, (g * c.unsqueeze(2)).sum(1)


def _shifted_inverse_matrix(h: Tensor, beta: Schedule) -> Tensor:
    """``(I + βH)⁻¹`` per voxel for symmetric ``H`` ``(B, n, n, *S)``, ``n`` in {2, 3}: the
    adjugate over the determinant, written out (vectorised, no per-voxel LAPACK call)."""
    n = h.shape[1]
    if isinstance(beta, Tensor) and beta.dim() == h.dim() - 1:  # (B, 1, …): one per element
        beta = beta.squeeze(1)
    a = [[(1.0 if i == j else 0.0) + beta * h[:, i, j] for j in range(n)] for i in range(n)]
    if n == 2:
        det = a[0][0] * a[1][1] - a[0][1] * a[0][1]
        adj = [[a[1][1], -a[0][1]], [-a[0][1], a[0][0]]]
    else:
        c00 = a[1][1] * a[2][2] - a[1][2] * a[1][2]
        c01 = a[0][2] * a[1][2] - a[0][1] * a[2][2]
        c02 = a[0][1] * a[1][2] - a[0][2] * a[1][1]
        c11 = a[0][0] * a[2][2] - a[0][2] * a[0][2]
        c12 = a[0][1] * a[0][2] - a[0][0] * a[1][2]
        c22 = a[0][0] * a[1][1] - a[0][1] * a[0][1]
        det = a[0][0] * c00 + a[0][1] * c01 + a[0][2] * c02
        adj = [[c00, c01, c02], [c01, c11, c12], [c02, c12, c22]]
    inv_det = 1.0 / det  # det >= 1: I + βH is SPD with eigenvalues >= 1
    return torch.stack([torch.stack([x * inv_det for x in row], 1) for row in adj], 1)


def l2_channels_coefficient(
    system: tuple[Tensor, Tensor], lam: Schedule, theta: Schedule
) -> tuple[Tensor, Tensor]:
    """``(M, p)`` of the C-channel p = 2 v-step, ``v = M w − p``, from ``system = (H, q)``
    (:func:`normal_equations`): ``(λH + θI) v = θw − λq`` gives ``M = (I + βH)⁻¹`` ``(B, ndim,
    ndim, *S)`` and ``p = β M q`` ``(B, ndim, *S)``, ``β = λ/θ``."""
    h, q = system
    beta = lam / theta
    m = _shifted_inverse_matrix(h, beta)
    return m, beta * _matvec(m, q)


def _matvec(m: Tensor, w: Tensor) -> Tensor:
    """``M w`` per voxel for symmetric ``M`` ``(B, n, n, *S)``: ``Σ_j M[:, j] w_j`` (row ``j``
    is column ``j``: contiguous slices)."""
    out = m[:, 0] * w[:, :1]
    for j in range(1, m.shape[1]):
        out = torch.addcmul(out, m[:, j], w[:, j:j + 1])
    return out


def l2_channels_apply(w: Tensor, g, c, coefficient: tuple[Tensor, Tensor]) -> Tensor:
    """C-channel p = 2 v-step from its precomputed coefficients: ``M w − p`` (``g``, ``c``
    are in the coefficients already)."""
    m, p = coefficient
    return _matvec(m, w) - p


def v_step_l2_channels(w: Tensor, g: Tensor, c: Tensor, lam: Schedule, theta: Schedule) -> Tensor:
    """``argmin_v (λ/2) Σ_c |g_c·v + c_c|² + (θ/2)|v − w|²`` point-wise: the ``ndim × ndim``
    system ``(λ Σ_c g_c g_cᵀ + θI) v = θw − λ Σ_c c_c g_c``, solved in closed form.

    Shapes: ``w`` ``(B, ndim, *S)``; ``g`` ``(B, C, ndim, *S)``; ``c`` ``(B, C, *S)``.
    """
    return l2_channels_apply(w, g, c, l2_channels_coefficient(normal_equations(g, c), lam, theta))


# data term -> (coefficient, apply): the coefficients are built once per solve unless λ or θ
# follow a per-iteration schedule.
V_STEP_PARTS = {
    "l2": (l2_coefficient, l2_apply),
    "l1": (l1_coefficient, l1_apply),
    L2_CHANNELS: (l2_channels_coefficient, l2_channels_apply),
}


def data_energy(u: Tensor, g: Tensor, c: Tensor, lam: float | Tensor, data_term: str) -> Tensor:
    """``(λ/p) Σ |g·u + c|^p`` per batch element, ``(B,)``; over ``C`` channels (``g``
    ``(B, C, ndim, *S)``, ``c`` ``(B, C, *S)``) the sum runs over them too."""
    if g.dim() == c.dim() + 1:
        r = (g * u.unsqueeze(1)).sum(dim=2) + c
    else:
        r = (g * u).sum(dim=1) + c[:, 0]
    if data_term == "l2":
        return 0.5 * lam * (r * r).flatten(1).sum(1)
    return lam * r.abs().flatten(1).sum(1)


@dataclass
class ADMMInfo:
    """Diagnostics of one ADMM solve (tensors; no host synchronisation to build them)."""

    iterations: Tensor  # (B,) iterations each batch element ran before it converged or hit K
    residuals: list[Tensor] = field(default_factory=list)  # per iteration, (B,) ‖Δu‖ / ‖u‖
    restarts: Tensor | None = None  # (B,) number of restarts


def _at(x: Schedule, k: int) -> Schedule:
    """Value of a scalar-or-schedule at iteration ``k``."""
    if _is_schedule(x):
        return x[k]
    return x


def _is_schedule(x: Schedule) -> bool:
    """A ``(K,)`` tensor, or a sequence of K per-element ``(B, 1, …)`` tensors."""
    return (isinstance(x, Tensor) and x.dim() == 1) or isinstance(x, (list, tuple))


def _needs_grad(x) -> bool:
    return isinstance(x, Tensor) and x.requires_grad


def _detached(x):
    """``x`` without its autograd history, where it is a tensor."""
    return x.detach() if isinstance(x, Tensor) else x


def _batch_norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1)


def nesterov_step(t: Tensor, accelerated: bool = True) -> tuple[Tensor, Tensor]:
    """Momentum weight ``a_k = (t_k − 1) / t_{k+1}`` and ``t_{k+1} = (1 + √(1 + 4 t_k²)) / 2``
    per batch element (plain ADMM: ``a = 0``, ``t`` unchanged). The one place this recurrence
    is written."""
    if not accelerated:
        return torch.zeros_like(t), t
    t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
    return (t - 1.0) / t_new, t_new


def nesterov_weights(iterations: int) -> list[float]:
    """The Nesterov weights ``a_1 … a_K`` from ``t_0 = 1`` (float64), e.g. to initialise
    learnable momentum schedules."""
    t, out = torch.ones((), dtype=torch.float64), []
    for _ in range(iterations):
        a, t = nesterov_step(t)
        out.append(float(a))
    return out


def _residual_measure(e: Tensor, du: Tensor, theta: Schedule) -> Tensor:
    """``θ (‖e‖² + ‖Δu‖²)`` per batch element: the combined residual of the restart test."""
    if isinstance(theta, Tensor) and theta.dim() > 1:  # one θ per batch element
        theta = theta.flatten()
    return theta * (_batch_norm(e) ** 2 + _batch_norm(du) ** 2)


def restart_step(
    alpha: Tensor, t_new: Tensor, combined: Tensor, c_prev: Tensor, restart_eta: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Goldstein et al.'s restart: keep the momentum where the combined residual shrank by
    ``restart_eta``, else restart it (``α = 0``, ``t = 1``).

    Returns ``(alpha, t_new, c_prev, keep)``, all ``(B,)``.
    """
    keep = combined < restart_eta * c_prev
    c_prev = torch.where(keep, combined, c_prev / restart_eta)
    t_new = torch.where(keep, t_new, torch.ones_like(t_new))
    alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
    return alpha, t_new, c_prev, keep


class _Momentum:
    """The per-element scalars of accelerated ADMM, ``(B,)`` tensors: Nesterov's ``t_k`` (or
    given weights ``a_k``), the restart test's residual and the restart count.

    ``dtype``/``device``: where they live; the in-place CPU loop keeps them in float64 on the
    host (as Python scalars would be), the others in the field's dtype on its device.
    """

    def __init__(self, batch, dtype, device, accelerated: bool, restart: bool, eta: float):
        self.t = torch.ones(batch, dtype=dtype, device=device)
        self.c_prev = torch.full((batch,), math.inf, dtype=dtype, device=device)
        self.restarts = torch.zeros(batch, dtype=torch.long, device=device)
        self.accelerated, self.restart, self.eta = accelerated, restart, eta

    def alpha(self, e: Tensor, du: Tensor, theta, a=None, active: Tensor | None = None):
        """Extrapolation factor ``α = 1 + a_k`` (0 where the momentum restarts) and the next
        ``t`` (the caller commits it to :attr:`t`). ``e``: primal residual, ``du = u^{k+1} −
        u^k``; ``a``: a given weight (then ``t`` stays); ``active``: which elements count
        their restarts (default all)."""
        if a is not None:
            a, t_new = a * torch.ones_like(self.t), self.t
        else:
            a, t_new = nesterov_step(self.t, self.accelerated)
        alpha = 1.0 + a
        if self.restart:
            # A decision (restart or not): no autograd graph for it.
            combined = _residual_measure(e.detach(), du.detach(), _detached(theta))
            combined = combined.to(self.t.dtype)
            alpha, t_new, self.c_prev, keep = restart_step(
                alpha, t_new, combined, self.c_prev, self.eta
            )
            restarted = ~keep if active is None else ~keep & active
            self.restarts = self.restarts + restarted.long()
        return alpha, t_new


def _bview(x: Tensor, ndim: int) -> Tensor:
    """``(B,)`` → ``(B, 1, *[1]*ndim)`` for broadcasting over ``(B, C, *S)``."""
    return x.view(-1, *([1] * (ndim + 1)))


def nesterov_admm(
    g: Tensor,
    c: Tensor,
    *,
    lam: Schedule,
    theta: Schedule,
    iterations: int,
    order: int = 2,
    spacing: Sequence[float] | None = None,
    data_term: str = "l2",
    boundary: str = "neumann",
    accelerated: bool = True,
    restart: bool = False,
    restart_eta: float = 0.999,
    tol: float | None = None,
    momentum: Tensor | None = None,
    record: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
) -> tuple[Tensor, ADMMInfo]:
    """Solve the convex model for one linearisation with (Nesterov-accelerated) ADMM.

    Args:
        g: ``(B, ndim, *S)`` image gradient of the warped moving image (voxel units), or
            ``(B, C, ndim, *S)``, the gradient of each of its ``C`` channels.
        c: ``(B, 1, *S)`` residual ``warped − fixed``, or ``(B, C, *S)`` with ``C`` channels
            (then ``data_term="l2"``: the terms of the channels add up).
        lam, theta: data weight λ and penalty θ: floats, 0-d tensors, or ``(K,)`` schedules;
            θ may also be a ``(B, 1, *[1]*ndim)`` tensor, one value per batch element, or a
            list of K of them (a per-iteration schedule per element).
        iterations: maximum number of iterations ``K``.
        order: regulariser order ``n ≥ 1``.
        spacing: ``ndim`` spacings of the regulariser (default 1).
        data_term: ``"l2"`` (p = 2) or ``"l1"`` (p = 1).
        boundary: ``"neumann"`` (DCT) or ``"periodic"`` (FFT) for the u-step.
        accelerated: Nesterov momentum on ``u`` and ``b``; ``False`` is plain ADMM.
        restart: restart the momentum where the combined residual does not shrink by
            ``restart_eta`` (Goldstein et al. 2014).
        tol: stop a batch element once ``‖u^k − u^{k−1}‖ / ‖u^{k−1}‖ < tol`` (one host
            synchronisation per iteration); ``None`` runs exactly ``iterations``, sync-free.
        momentum: optional ``(K,)`` momentum weights ``a_k`` replacing the Nesterov sequence.
        record: keep the residual history in the returned info.
        callback: called as ``callback(k, u^k)`` after every iteration (analysis, tests).

    Returns:
        ``u`` ``(B, ndim, *S)`` (the smooth iterate ``u^K``) and an :class:`ADMMInfo`.
    """
    g, c, data_term = _linearisation(g, c, data_term)
    ops = _Operators.build(g, c, lam, theta, order, spacing, boundary, data_term)
    plain_inference = (
        not (torch.is_grad_enabled() and any(_needs_grad(x) for x in (g, c, lam, theta)))
        and ops.coef is not None and ops.mult is not None and boundary == "neumann"
        and momentum is None and tol is None and not record and callback is None
        and not torch.compiler.is_compiling()  # compiled: the functional loop, fused by inductor
    )
    if plain_inference:
        u, n_restart = _admm_in_place(
            g, c, ops.coef, ops.mult, _host_theta(theta), data_term, iterations, accelerated,
            restart, restart_eta, host=g.device.type == "cpu",
        )  # fmt: skip
        n_iter = torch.full((g.shape[0],), iterations, dtype=torch.long, device=g.device)
        return u, ADMMInfo(iterations=n_iter, restarts=n_restart)
    state = _Momentum(g.shape[0], g.dtype, g.device, accelerated, restart, restart_eta)
    return _admm_loop(g, c, ops, lam, theta, iterations, boundary, state, momentum, tol, record,
                      callback)


def _host_theta(theta) -> float | Tensor:
    """θ for the in-place loop: a float, or the ``(B, 1, …)`` tensor of per-element values."""
    if isinstance(theta, Tensor) and theta.numel() > 1:
        return theta.detach()
    return float(theta)


def _linearisation(g: Tensor, c: Tensor, data_term: str) -> tuple[Tensor, Tensor, str]:
    """``(g, c, v-step kind)`` as the loops take them. One channel (``g`` ``(B, ndim, *S)`` or
    ``(B, 1, ndim, *S)``): ``g`` ``(B, ndim, *S)``, ``c``, ``data_term``. ``C > 1`` channels
    (l2): the v-step needs only :func:`normal_equations`, so the loops get ``q`` ``(B, ndim,
    *S)`` (shaped like ``u``) in place of ``g``, ``H`` in place of ``c``, and
    :data:`L2_CHANNELS`."""
    if g.dim() != c.dim() + 1:
        return g, c, data_term
    if g.shape[:2] != c.shape[:2] or g.shape[3:] != c.shape[2:] or g.shape[2] != c.dim() - 2:
        raise ValueError(
            f"g: expected (B, C, ndim, *S) matching c (B, C, *S) = {tuple(c.shape)}, got "
            f"{tuple(g.shape)}"
        )
    if g.shape[1] == 1:
        return g[:, 0], c, data_term
    if data_term != "l2":
        raise ValueError(
            f"data_term: {data_term!r} has no closed-form v-step over C = {g.shape[1]} "
            "channels; multi-channel images need data_term='l2'"
        )
    h, q = normal_equations(g, c)
    return q, h, L2_CHANNELS


@dataclass
class _Operators:
    """What one ADMM solve precomputes: the regulariser's symbol and per-axis weights,
    ``s = |g|²`` (over C channels: ``(H, q)``), and (unless λ or θ follow a per-iteration
    schedule) the v-step coefficients ``coef`` and the u-step multiplier ``mult``."""

    symbol: Tensor
    weights: Tensor
    s: Tensor | tuple[Tensor, Tensor]
    coefficient: Callable
    v_apply: Callable
    coef: object
    mult: Tensor | None

    @classmethod
    def build(cls, g, c, lam, theta, order, spacing, boundary, data_term) -> _Operators:
        ndim, shape = g.dim() - 2, tuple(g.shape[2:])
        spacing = tuple(float(h) for h in spacing) if spacing is not None else (1.0,) * ndim
        symbol = laplacian_symbol(shape, spacing, int(order), boundary, g.dtype, g.device)
        weights = regulariser_weights(spacing, g.dtype, g.device)
        coefficient, v_apply = V_STEP_PARTS[data_term]
        # (H, q) over C channels (see _linearisation), else |g|²
        s = (c, g) if data_term == L2_CHANNELS else (g * g).sum(dim=1, keepdim=True)
        scheduled = _is_schedule(lam) or _is_schedule(theta)
        coef = None if scheduled else coefficient(s, lam, theta)
        mult = None if _is_schedule(theta) else shifted_inverse(theta, symbol, weights)
        return cls(symbol, weights, s, coefficient, v_apply, coef, mult)

    def step(self, g, c, u_hat, b_hat, lam_k, theta_k, boundary) -> tuple[Tensor, ...]:
        """One ADMM iteration from the extrapolated ``(û, b̂)``: ``(u, b, e = v − u)``."""
        coef = self.coef if self.coef is not None else self.coefficient(self.s, lam_k, theta_k)
        mult = self.mult if self.mult is not None else shifted_inverse(
            theta_k, self.symbol, self.weights
        )
        w = u_hat - b_hat / theta_k
        v = self.v_apply(w, g, c, coef)
        u_new = apply_spectral(theta_k * v + b_hat, mult, boundary)
        e = v - u_new  # primal residual, shared by the dual update and the restart test
        return u_new, b_hat + theta_k * e, e


def _admm_loop(g, c, ops: _Operators, lam, theta, iterations, boundary, state: _Momentum,
               momentum, tol, record, callback) -> tuple[Tensor, ADMMInfo]:
    """The functional (autograd-friendly) loop of :func:`nesterov_admm`."""
    batch, ndim = g.shape[0], g.dim() - 2
    u = b = u_hat = b_hat = torch.zeros_like(g)
    active = torch.ones(batch, dtype=torch.bool, device=g.device)
    n_iter = torch.zeros(batch, dtype=torch.long, device=g.device)
    info = ADMMInfo(iterations=n_iter)
    for k in range(iterations):
        theta_k = _at(theta, k)
        u_new, b_new, e = ops.step(g, c, u_hat, b_hat, _at(lam, k), theta_k, boundary)
        du = u_new - u
        a_k = _at(momentum, k) if momentum is not None else None
        alpha, t_new = state.alpha(e, du, theta_k, a_k, active)
        # Extrapolation û = u + α Δu, b̂ = b + α Δb with α = 1 + a (a restart sets α = 0,
        # i.e. û = u, b̂ = b): one fused multiply-add per field instead of add + where.
        alpha_b = _bview(alpha, ndim)
        u_hat_new = torch.addcmul(u, alpha_b, du)
        b_hat_new = torch.addcmul(b, alpha_b, b_new - b)
        if record or tol is not None:  # two reductions: skipped on the sync-free fast path
            rel = _batch_norm(du.detach()) / _batch_norm(u.detach()).clamp_min(
                torch.finfo(g.dtype).tiny
            )
            if record:
                info.residuals.append(rel)
        n_iter = n_iter + active.long()
        if callback is not None:
            callback(k + 1, u_new)
        if tol is None:
            u, b, u_hat, b_hat, state.t = u_new, b_new, u_hat_new, b_hat_new, t_new
            continue
        # Freeze batch elements that have converged, so a pair's result does not depend on
        # the other pairs of its batch.
        act = _bview(active, ndim)
        u, b = torch.where(act, u_new, u), torch.where(act, b_new, b)
        u_hat, b_hat = torch.where(act, u_hat_new, u_hat), torch.where(act, b_hat_new, b_hat)
        state.t = torch.where(active, t_new, state.t)
        active = active & ~(rel < tol)
        if not bool(active.any()):
            break
    info.iterations, info.restarts = n_iter, state.restarts
    return u, info


@torch.no_grad()
def _admm_in_place(
    g: Tensor,
    c: Tensor,
    coef,
    mult: Tensor,
    theta: float | Tensor,
    data_term: str,
    iterations: int,
    accelerated: bool,
    restart: bool,
    restart_eta: float,
    host: bool,
) -> tuple[Tensor, Tensor]:
    """The loop of :func:`nesterov_admm` for fixed λ/θ, Neumann boundaries and no gradients,
    written into preallocated buffers (same operations, same order: the same numbers).

    ``host``: keep the per-element momentum / restart scalars in float64 on the CPU (where
    reading them costs nothing); otherwise in the field's dtype on its device (no
    synchronisation).

    Temporaries of every iteration would otherwise be fresh multi-MB allocations, and on the
    CPU their page faults cost as much as the arithmetic (measured: −30 % time at 10×128×128).
    Returns ``(u, restarts (B,))``.
    """
    batch, ndim = g.shape[0], g.dim() - 2
    bshape = (batch, *([1] * (ndim + 1)))
    u, b, u_hat, b_hat, u_new, b_new = (torch.zeros_like(g) for _ in range(6))
    v, e, du, db, work = (torch.empty_like(g) for _ in range(5))
    spectral = (torch.empty_like(g), torch.empty_like(g))
    r = torch.empty_like(c)
    state = _Momentum(batch, torch.float64 if host else g.dtype, "cpu" if host else g.device,
                      accelerated, restart, restart_eta)
    per_element = isinstance(theta, Tensor)
    if per_element:
        neg_inv_theta = (-1.0 / theta.double()).to(g.dtype)
    for _ in range(iterations):
        # w = û − b̂/θ  (into `work`), then the v-step into `v`
        if per_element:  # −1/θ rounded as the scalar path rounds it: same numbers per element
            torch.addcmul(u_hat, b_hat, neg_inv_theta, out=work)
        else:
            torch.add(u_hat, b_hat, alpha=-1.0 / theta, out=work)
        _v_step_into(v, work, g, c, coef, data_term, e, r)
        # u-step: u_new = T⁻¹ (mult · T (θ v + b̂))
        _add_scaled(b_hat, v, theta, work)
        spec = dct_into(work, spectral)
        spec.mul_(mult)
        u_new.copy_(dct_into(spec, (work, spectral[0] if spec is spectral[1] else spectral[1]),
                             inverse=True))
        torch.sub(v, u_new, out=e)
        _add_scaled(b_hat, e, theta, b_new)
        torch.sub(u_new, u, out=du)
        alpha, state.t = state.alpha(e, du, theta)
        alpha_b = alpha.to(g.dtype).view(bshape)
        torch.addcmul(u, alpha_b, du, out=u_hat)
        torch.sub(b_new, b, out=db)
        torch.addcmul(b, alpha_b, db, out=b_hat)
        u, u_new = u_new, u
        b, b_new = b_new, b
    return u, state.restarts.to(g.device)


def _add_scaled(x: Tensor, y: Tensor, theta: float | Tensor, out: Tensor) -> None:
    """``out = x + θ y`` for a scalar θ or a per-element ``(B, 1, …)`` θ."""
    if isinstance(theta, Tensor):
        torch.addcmul(x, y, theta, out=out)
    else:
        torch.add(x, y, alpha=theta, out=out)


def _v_step_into(v: Tensor, w: Tensor, g: Tensor, c: Tensor, coef, data_term: str,
                 scratch: Tensor, r: Tensor) -> None:
    """The v-step of ``w`` into ``v`` (``scratch`` like ``g``, ``r`` like ``c``)."""
    if data_term == L2_CHANNELS:  # v = M w − p, coef = (M, p)
        _matvec_into(v, coef[0], w)
        v.sub_(coef[1])
        return
    torch.mul(g, w, out=scratch)
    torch.sum(scratch, dim=1, keepdim=True, out=r)
    r.add_(c)
    if data_term == "l2":
        r.mul_(coef)
        torch.addcmul(w, r, g, value=-1.0, out=v)
    else:
        tau, inv_s = coef
        r.mul_(inv_s).neg_().clamp_(-tau, tau)
        torch.addcmul(w, r, g, out=v)


def _matvec_into(out: Tensor, m: Tensor, w: Tensor) -> None:
    """:func:`_matvec` written into ``out`` (no temporaries)."""
    torch.mul(m[:, 0], w[:, :1], out=out)
    for j in range(1, m.shape[1]):
        out.addcmul_(m[:, j], w[:, j:j + 1])
