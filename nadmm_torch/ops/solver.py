"""The registration solver: pyramid × greedy velocity compositions × Nesterov-ADMM.

Everything is out-of-place torch code, so autograd reaches the images, the initial
displacement and every hyperparameter tensor (λ, θ, momentum and step-scale schedules).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Protocol

import torch
from torch import Tensor

from ..checks import check_checkpoint
from .admm import nesterov_admm
from .checkpoint import checkpoint_call
from .diff import (
    central_difference,
    forward_jacobian_determinant,
    jacobian_determinant,
    spatial_gradient,
)
from .features import image_features
from .warp import compose, resize, resize_displacement, warp

# Step scales tried, largest first, by the safeguard; 0 keeps the previous displacement.
SAFEGUARD_SCALES = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0)
# An initial displacement folding (det J <= 0) at more than this percentage of a batch
# element's voxels is refused rather than repaired: it reverses orientation over much of the
# image (a mirror flip: det J = -1 everywhere), and no smoothing turns it into a
# diffeomorphism that means what the caller meant.
MAX_INITIAL_FOLD_PERCENT = 50.0
# ``compile=`` choices of :func:`solve`: False (eager), True (= "default"), or a torch.compile
# mode; "reduce-overhead" replays CUDA graphs on a GPU (on a CPU it is the default mode).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# ``normalize`` modes of :func:`normalise_pair` (the config validates the option).
NORMALIZE_MODES = ("percentile", "minmax", "none")
# The joint percentiles that "percentile" maps to 0 and 1 (values outside are clipped): a few
# hot or dead voxels (up to 0.5 % of the pair) no longer set the scale of the whole problem.
NORMALIZE_PERCENTILES = (0.5, 99.5)
# Percentiles of larger pairs are taken on an evenly strided subsample of this many values.
QUANTILE_SAMPLES = 1 << 21
# ``checkpoint="auto"`` checkpoints the warps of a level where that frees the graphs of more
# than this many field elements: ``(W − 1) × numel`` for W warps of a field ``(B, ndim, *S)``
# (in the backward pass one warp's graph is rebuilt at a time, so a level of one warp gains
# nothing). A warp's graph holds about 50 (K = 5) to 65 (K = 8) field-sized tensors (measured
# with benchmarks/training.py), so the threshold is ~200 MB of float32 graph freed, for about
# 30–40 % more time on that level's share of a training step. Below it (every level of ``fast``
# on the ACDC grid: 4 × 10 × 64 × 64 × 3 = 0.49 M; 2D slices) the graphs take tens of MB and
# not recomputing is faster; above it (``fast`` on 96 × 128 × 128: 4 × 0.59 M) they take GBs.
CHECKPOINT_AUTO_ELEMENTS = 1 << 20
# ``decision=`` of :func:`_warp_step` when the safeguard is to decide (not replay) the step.
_DECIDE = object()


class SolverSettings(Protocol):
    """What :func:`solve` reads of its settings (:class:`nadmm_torch.config.SolverConfig`)."""

    data_term: str
    order: int
    levels: int
    iterations: tuple[int, ...]
    warps: tuple[int, ...]
    tol_admm: float | None
    tol_warp: float | None
    accelerated: bool
    restart: bool
    restart_eta: float
    safeguard: bool
    min_jacobian: float
    boundary: str
    normalize: str
    lam_scaling: str
    theta_scaling: str
    anisotropic_pyramid: bool
    min_level_size: int
    frozen_axes: tuple[int, ...] | str
    features: str

    def per_level(self, name: str) -> tuple[float, ...]: ...


@dataclass
class Diagnostics:
    """What the solver did, per level (coarse → fine)."""

    shapes: list[tuple[int, ...]] = field(default_factory=list)
    warps: list[int] = field(default_factory=list)
    admm_iterations: list[list[Tensor]] = field(default_factory=list)  # per warp, (B,)
    residuals: list[list[list[Tensor]]] = field(default_factory=list)  # per warp, per iteration
    step_scales: list[list[Tensor]] = field(default_factory=list)  # safeguard, per warp, (B,)
    # Batch elements with a constant image: not registered (initial displacement returned).
    constant_elements: list[int] = field(default_factory=list)
    # Per batch element, % of voxels where the given initial displacement folded (repaired
    # before solving); None without an initial displacement or with the safeguard off.
    initial_fold_percent: list[float] | None = None

    def start_level(self, shape: tuple[int, ...]) -> None:
        """A level solved at ``shape``; its warps follow through :meth:`record_warp`."""
        self.shapes.append(tuple(shape))
        for per_level in (self.admm_iterations, self.residuals, self.step_scales):
            per_level.append([])
        self.warps.append(0)

    def skip_level(self, shape: tuple[int, ...]) -> None:
        """A level without warps: the field passes on at ``shape``."""
        self.start_level(shape)

    def record_warp(self, info, scale: Tensor) -> None:
        """One warp of the current level: its ADMM info and safeguard step scale ``(B,)``."""
        self.admm_iterations[-1].append(info.iterations)
        self.residuals[-1].append(info.residuals)
        self.step_scales[-1].append(scale)
        self.warps[-1] += 1


def pyramid_factors(
    shape: Sequence[int],
    spacing: Sequence[float],
    levels: int,
    anisotropic: bool = True,
    min_size: int = 4,
) -> list[tuple[int, ...]]:
    """Downsampling factor per axis for each level, coarse → fine (finest is all ones).

    An axis is halved per level unless that would leave fewer than ``min_size`` voxels, or,
    with ``anisotropic``, unless it is a thick axis (spacing > 2 × the finest spacing), such as
    the 5–10 mm slice axis of cardiac cine MRI against 1.5 mm in-plane.
    """
    h_min = min(spacing)
    out = []
    for level in range(levels):
        target = 2 ** (levels - 1 - level)
        factors = []
        for n, h in zip(shape, spacing):
            f = 1 if (anisotropic and h > 2.0 * h_min) else target
            while f > 1 and n / f < min_size:
                f //= 2
            factors.append(f)
        out.append(tuple(factors))
    return out


def frozen_axes(config: SolverSettings, spacing: Sequence[float]) -> tuple[int, ...]:
    """The axes whose displacement component the solver keeps at zero."""
    if config.frozen_axes == "thick":
        h_min = min(spacing)
        return tuple(i for i, h in enumerate(spacing) if h > 2.0 * h_min)
    bad = [a for a in config.frozen_axes if not 0 <= a < len(spacing)]
    if bad:
        raise ValueError(f"frozen_axes: axes {bad} out of range for {len(spacing)} dims")
    return tuple(config.frozen_axes)


def _flat_quantiles(x: Tensor, qs: Sequence[float]) -> list[Tensor]:
    """Lower-rank quantiles ``qs`` (fractions in [0, 1]) of each row of ``x`` ``(B, N)``, each
    ``(B, 1)``. Rows longer than :data:`QUANTILE_SAMPLES` are evenly subsampled first (no size
    limit, unlike ``torch.quantile``); differentiable (to the selected value).

    The ``k``-th smallest value is the largest of the ``k`` smallest (or the smallest of the
    ``n − k + 1`` largest): an unsorted ``topk`` of the shorter side, which for the tails asked
    here (0.5 %, 99.5 %) takes half the time of ``kthvalue`` for the same value."""
    n = x.shape[1]
    if n > QUANTILE_SAMPLES:
        x = x[:, :: -(-n // QUANTILE_SAMPLES)]
        n = x.shape[1]
    out = []
    for q in qs:
        k = 1 + round(q * (n - 1))
        if k <= n - k + 1:
            out.append(x.topk(k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True))
        else:
            out.append(x.topk(n - k + 1, dim=1, sorted=False).values.amin(1, keepdim=True))
    return out


def normalise_pair(
    fixed: Tensor, moving: Tensor, mode: str = "percentile"
) -> tuple[Tensor, Tensor]:
    """Scale each pair jointly (one affine map for both images) so λ means the same for any
    scanner range.

    Args:
        fixed, moving: ``(B, C, *S)``; each batch element gets its own map.
        mode: ``"percentile"`` maps the joint :data:`NORMALIZE_PERCENTILES` (0.5 %, 99.5 %) of
            the pair to 0 and 1 and clips the rest to [0, 1], so a few outlier voxels (a hot
            pixel, an artefact; up to 0.5 % of the pair) do not compress the contrast of the
            rest; where those percentiles coincide (an image almost all one value) it falls
            back to min–max. ``"minmax"``: the joint minimum and maximum map to 0 and 1.
            ``"none"``: the images as given.

    Returns:
        ``(fixed, moving)`` scaled, same shapes and dtype.

    With ``C > 1`` channels each channel gets its own map, joint over the pair.
    """
    if mode == "none":
        return fixed, moving
    if fixed.shape[1] > 1:
        f, m = normalise_pair(_channels_as_batch(fixed), _channels_as_batch(moving), mode)
        return f.view_as(fixed), m.view_as(moving)
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"mode: expected one of {list(NORMALIZE_MODES)}, got {mode!r}")
    b = fixed.shape[0]
    both = torch.cat([fixed.reshape(b, -1), moving.reshape(b, -1)], dim=1)
    lo, hi = both.amin(dim=1, keepdim=True), both.amax(dim=1, keepdim=True)
    tiny = torch.finfo(fixed.dtype).tiny
    if mode == "percentile":
        p_lo, p_hi = _flat_quantiles(both, [p / 100 for p in NORMALIZE_PERCENTILES])
        robust = (p_hi - p_lo) > tiny
        lo, hi = torch.where(robust, p_lo, lo), torch.where(robust, p_hi, hi)
    shape = (b,) + (1,) * (fixed.dim() - 1)
    span = hi - lo  # a constant pair is divided by 1, not by ~0: finite gradients
    lo, scale = lo.view(shape), torch.where(span > tiny, span, torch.ones_like(span)).view(shape)
    fixed, moving = (fixed - lo) / scale, (moving - lo) / scale
    if mode == "percentile":
        fixed, moving = fixed.clamp(0.0, 1.0), moving.clamp(0.0, 1.0)
    return fixed, moving


def _channels_as_batch(x: Tensor) -> Tensor:
    """``(B, C, *S)`` as ``(B·C, 1, *S)``."""
    return x.reshape(-1, 1, *x.shape[2:])


def gradient_scale(fixed: Tensor, moving: Tensor, mask: Tensor | None = None) -> Tensor:
    """RMS image gradient of a pair, ``sqrt(mean |∇I|²)`` averaged over both images, ``(B, 1, …)``.

    Dividing both images by it makes the linearised residual ``(g·u + c) / s`` the data term
    sees invariant to the images' contrast: with the L2 term this is λ relative to the pair's
    gradient energy (λ / mean |∇I|²), with L1 λ relative to its RMS gradient. Central
    differences in voxel units of the level; ``mask`` ``(1, ndim, 1, …)`` drops frozen axes.

    ``C > 1`` channels: ``(B, C, 1, …)``, each channel's own RMS gradient times ``√C``, so
    every channel weighs alike and the channels' gradient energies add up to that of one
    channel: λ keeps its meaning (relative to the total gradient energy) for any ``C``.
    """
    if fixed.shape[1] > 1:
        channels = fixed.shape[1]
        rms = gradient_scale(_channels_as_batch(fixed), _channels_as_batch(moving), mask)
        return rms.view(fixed.shape[0], channels, *rms.shape[2:]) * channels**0.5
    energy = []
    for x in (fixed, moving):
        g = spatial_gradient(x)[:, 0]
        if mask is not None:
            g = g * mask
        energy.append(g.pow(2).sum(1).flatten(1).mean(1))
    rms = (0.5 * (energy[0] + energy[1])).sqrt()
    return rms.clamp_min(torch.finfo(fixed.dtype).eps).view(-1, *([1] * (fixed.dim() - 1)))


def spectral_scale(
    fixed: Tensor, moving: Tensor, spacing: Sequence[float], mask: Tensor | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """Squared characteristic frequency of a pair, ``k² = mean |Δ_h I|² / mean |∇_h I|²``
    (physical units, mm⁻²; central differences), the mean of both images' ratios, ``(B,)``.

    The u-step low-passes the velocity where the regulariser's symbol ``h²Λ_n`` (units
    mm⁻²ⁿ) reaches θ, so θ relative to ``k²ⁿ`` places that cut-off relative to the scale of
    the images' own structures: finely structured images (cortex) keep finer deformations
    than coarse ones (a heart) at the same relative θ. Invariant to contrast. ``mask``
    ``(1, ndim, 1, …)`` drops frozen axes; ``weight`` ``(B or 1, 1, *S)``: the data term's
    weights (a fixed-image mask), so content the data term ignores does not set θ either;
    ``C > 1`` channels: the mean over channels. Clamped
    to ``[1e-4, 1] (π/h_min)²`` so that a ramp (no curvature) or a constant image still gives
    a positive, finite θ.
    """
    batch, channels = fixed.shape[:2]
    f, m = _channels_as_batch(fixed), _channels_as_batch(moving)
    w = None
    if weight is not None:
        w = weight.expand(batch, 1, *weight.shape[2:]).repeat_interleave(channels, 0)
    ratios = []
    for x in (f, m):
        g = spatial_gradient(x, spacing)[:, 0]  # (B·C, ndim, *S)
        if mask is not None:
            g = g * mask
        lap = sum(central_difference(g[:, a], 1 + a) / float(spacing[a])
                  for a in range(g.shape[1]))  # (B·C, *S)
        curvature, energy = lap.pow(2).unsqueeze(1), g.pow(2).sum(1, keepdim=True)
        if w is not None:
            curvature, energy = curvature * w, energy * w
        ratios.append(curvature.flatten(1).sum(1)
                      / energy.flatten(1).sum(1).clamp_min(torch.finfo(x.dtype).tiny))
    nyquist = (math.pi / min(spacing)) ** 2
    k2 = (0.5 * (ratios[0] + ratios[1])).clamp(1e-4 * nyquist, nyquist)
    return k2.view(batch, -1).mean(1)


def constant_elements(fixed: Tensor, moving: Tensor) -> Tensor:
    """``(B,)`` bool: batch elements where the fixed or the moving image is constant."""
    def const(x: Tensor) -> Tensor:
        flat = x.detach().flatten(1)
        return flat.amax(dim=1) == flat.amin(dim=1)

    return const(fixed) | const(moving)


def repair_initial(
    d: Tensor, min_jacobian: float = 0.0, name: str = "initial_displacement"
) -> tuple[Tensor, list[float]]:
    """An initial displacement made fold-free before solving, so the returned field is too.

    Where ``det(I + ∇d) <= min_jacobian`` somewhere (central or forward differences, see
    :func:`fold_determinant`) it is repaired by :func:`repair_folds` (local smoothing around
    the folds) with a warning. A batch element whose fold percentage (central differences,
    as :func:`nadmm_torch.metrics.fold_percent`) exceeds :data:`MAX_INITIAL_FOLD_PERCENT` is
    refused with a ValueError: that is an orientation-reversing field, not a noisy one. One
    host synchronisation when nothing folds.

    Returns:
        ``(d, fold percent per batch element before the repair)``.
    """
    central = jacobian_determinant(d.detach()).flatten(1)
    percent = (central <= 0).to(d.dtype).mean(1) * 100.0  # = metrics.fold_percent
    bad = (fold_determinant(d.detach()).flatten(1) <= min_jacobian).any(1).to(d.dtype)
    percent, bad = torch.stack([percent, bad]).tolist()  # one host synchronisation
    if not any(bad):
        return d, percent
    refused = {i: p for i, p in enumerate(percent) if p > MAX_INITIAL_FOLD_PERCENT}
    if refused:
        figures = ", ".join(f"element {i}: {p:.1f} %" for i, p in refused.items())
        raise ValueError(
            f"{name}: folds (det J <= 0) at more than {MAX_INITIAL_FOLD_PERCENT:g} % of the "
            f"voxels ({figures}): an orientation-reversing field (e.g. a mirror flip) cannot "
            "be repaired into a diffeomorphism; pass a field that folds less, or none"
        )
    folded = {i: p for i, p in enumerate(percent) if p > 0}
    warnings.warn(
        f"{name}: folds (det J <= 0) at "
        + ", ".join(f"{p:.2f} % of the voxels of batch element {i}" for i, p in folded.items())
        + "; repaired by local smoothing before registering (the returned field is fold-free)",
        UserWarning,
        stacklevel=3,
    )
    return repair_folds(d, min_jacobian, forward=True), percent


def _min_jacobian(d: Tensor) -> Tensor:
    return jacobian_determinant(d).flatten(1).amin(dim=1)


def fold_determinant(d: Tensor) -> Tensor:
    """``(B, *S)``: the smaller of the central- and forward-difference ``det(I + ∇d)``.

    Central differences alone miss voxel-to-voxel oscillations (a noisy field, such as a
    network's prediction): :func:`repair_initial` checks and repairs both.
    """
    return torch.minimum(jacobian_determinant(d), forward_jacobian_determinant(d))


def safeguarded_compose(
    d: Tensor,
    u: Tensor,
    min_jacobian: float = 0.0,
    full: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``d ← s u + d ∘ (Id + s u)`` with the largest ``s`` in :data:`SAFEGUARD_SCALES` for which
    ``det(I + ∇d_new) > min_jacobian`` everywhere (per batch element).

    Only where the full step folds are the smaller steps tried (one host synchronisation).
    If no scale passes (an initial field that already folds), the scale with the largest
    minimum determinant is kept. ``full``: the full step ``compose(d, u)`` and its minimum
    determinant ``(B,)``, where the caller has them already. The trials only choose ``s``:
    they run without an autograd graph, and the graph holds the chosen step alone.

    Returns:
        ``(d_new, s)`` with ``s`` of shape ``(B,)``.
    """
    d_new, s, _ = _safeguarded(d, u, min_jacobian, full)
    return d_new, s


def _safeguarded(d: Tensor, u: Tensor, min_jacobian: float, full=None):
    """:func:`safeguarded_compose`, also returning its decision: ``None`` where the full step
    passed everywhere, else the scales ``(B,)`` (to recompute the step with
    :func:`_scaled_step`)."""
    full, full_min = full if full is not None else _full_step(d, u)
    ok = full_min > min_jacobian
    if bool(ok.all()):
        return full, torch.ones(d.shape[0], dtype=d.dtype, device=d.device), None
    scales = _safeguard_scales(d.detach(), u.detach(), full_min, min_jacobian)
    return _scaled_step(d, u, scales), scales, scales


@torch.no_grad()
def _safeguard_scales(d: Tensor, u: Tensor, full_min: Tensor, min_jacobian: float) -> Tensor:
    """The step scale ``(B,)`` the safeguard keeps (see :func:`safeguarded_compose`)."""
    mins = torch.stack(
        [full_min] + [_min_jacobian(compose(d, s * u)) if s > 0 else _min_jacobian(d)
                      for s in SAFEGUARD_SCALES[1:]]
    )  # (n_scales, B)
    passed = mins > min_jacobian
    n = len(SAFEGUARD_SCALES)
    order = torch.arange(n, device=d.device).unsqueeze(1).expand_as(passed)
    first_ok = torch.where(passed, order, torch.full_like(order, n)).amin(dim=0)
    choice = torch.where(first_ok < n, first_ok, mins.argmax(dim=0))  # (B,)
    return torch.tensor(SAFEGUARD_SCALES, dtype=d.dtype, device=d.device)[choice]


def _scaled_step(d: Tensor, u: Tensor, scales: Tensor) -> Tensor:
    """``s u + d ∘ (Id + s u)`` per batch element, ``d`` itself where ``s = 0``."""
    s = scales.view(-1, *([1] * (d.dim() - 1)))
    return torch.where(s == 0, d, compose(d, s * u))


def _box_smooth(x: Tensor) -> Tensor:
    """3-tap (per axis) mean filter of a ``(B, C, *S)`` field, replicate padding."""
    ndim = x.dim() - 2
    for axis in range(ndim):
        dim = axis + 2
        pad = [0, 0] * ndim
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = 1
        xp = torch.nn.functional.pad(x, pad, mode="replicate") if x.shape[dim] > 1 else x
        if x.shape[dim] > 1:
            n = x.shape[dim]
            x = (xp.narrow(dim, 0, n) + xp.narrow(dim, 1, n) + xp.narrow(dim, 2, n)) / 3.0
    return x


def _full_step(d: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """``compose(d, u)`` and its minimum det J ``(B,)`` (a decision: no graph)."""
    full = compose(d, u)
    return full, _min_jacobian(full.detach())


def repair_folds(
    d: Tensor, min_jacobian: float = 0.0, max_rounds: int = 50, forward: bool = False
) -> Tensor:
    """Smooth ``d`` locally (around voxels with ``det(I + ∇d) <= min_jacobian``) until none is
    left: by central differences, and with ``forward`` by forward differences too (see
    :func:`fold_determinant`).

    Linear upsampling of a fold-free coarse displacement can create isolated folds on the finer
    grid (central differences of the interpolated field are not those of the coarse one); a few
    rounds of local smoothing remove them without touching the rest of the field. If local
    rounds do not suffice, a batch element that still folds is smoothed everywhere (the others
    keep their field). Where a fold is is a decision: found without an autograd graph.
    """
    def folded(x: Tensor) -> Tensor:
        x = x.detach()
        det = fold_determinant(x) if forward else jacobian_determinant(x)
        return det <= min_jacobian

    if not bool(folded(d).any()):  # one host sync per call
        return d
    ndim = d.dim() - 2
    pool = torch.nn.functional.max_pool2d if ndim == 2 else torch.nn.functional.max_pool3d
    for _ in range(max_rounds):
        bad = folded(d).unsqueeze(1).to(d.dtype)
        if not bool(bad.any()):
            return d
        region = pool(bad, kernel_size=5, stride=1, padding=2) > 0
        d = torch.where(region, _box_smooth(d), d)
    for _ in range(10 * max_rounds):  # global smoothing tends to a constant field (det 1)
        still = folded(d).flatten(1).any(dim=1)  # (B,): only those batch elements are smoothed,
        if not bool(still.any()):  # so a pair's field does not depend on its batch
            return d
        d = torch.where(still.view(-1, *([1] * (d.dim() - 1))), _box_smooth(d), d)
    if bool(folded(d).any()):
        warnings.warn(
            "repair_folds: the displacement still folds after smoothing; it is returned as is",
            RuntimeWarning,
            stacklevel=2,
        )
    return d


def _level_value(x, level: int):
    """Entry ``level`` of a per-level sequence (list/tuple), else ``x`` itself."""
    if isinstance(x, (list, tuple)):
        return x[level]
    return x


def solve(
    fixed: Tensor,
    moving: Tensor,
    config: SolverSettings,
    *,
    spacing: Sequence[float] | None = None,
    initial_displacement: Tensor | None = None,
    lam: Sequence[Tensor | float] | Tensor | float | None = None,
    theta: Sequence[Tensor | float] | Tensor | float | None = None,
    momentum: Sequence[Tensor | None] | None = None,
    step_scale: Sequence[Tensor | None] | None = None,
    checkpoint: bool | str = "auto",
    diagnostics: bool = False,
    compile: bool | str = False,
    mask: Tensor | None = None,
) -> tuple[Tensor, Diagnostics | None]:
    """Register ``moving`` to ``fixed``.

    Args:
        fixed, moving: ``(B, C, *S)`` floating (checked by the caller; C > 1: _prepared_images).
        config: solver settings.
        spacing: ``ndim`` physical spacings (mm), used by the regulariser and the pyramid.
        initial_displacement: ``(B, ndim, *S)`` voxel units (e.g. a network's prediction).
        lam, theta: override ``config`` values: a scalar / 0-d tensor for all levels, or one
            entry per level, each a scalar, 0-d tensor or ``(K_level,)`` per-iteration schedule.
        momentum: per level, ``None`` (Nesterov ``t_k``) or a ``(K_level,)`` tensor of ``a_k``.
        step_scale: per level, ``None`` or a ``(W_level,)`` tensor multiplying each velocity.
        checkpoint: ``True``: recompute each warp in the backward pass (less memory); ``"auto"``:
            where that frees > :data:`CHECKPOINT_AUTO_ELEMENTS` (see :func:`uses_checkpoint`).
        mask: ``(B or 1, 1, *S)`` non-negative data-term weights on the fixed grid (0 outside a
            fixed-image mask): ``m (g·u + c)²`` (l2), ``m |g·u + c|`` (l1) keep the v-step's
            closed form (``g``, ``c`` scaled by ``√m``, ``m``); area-averaged to each level.
        diagnostics: also return a :class:`Diagnostics`.
        compile: ``torch.compile`` each linearisation step (warp, image gradient, the K ADMM
            iterations, composition): ``True`` or a mode from :data:`COMPILE_MODES`. The first
            call per level shape compiles (tens of seconds); later calls run fused kernels
            (the same numbers as eager to float tolerance). Default ``False``: eager.

    Returns:
        ``(displacement (B, ndim, *S) in voxel units, diagnostics or None)``.

    With ``config.safeguard`` (the default) the returned field is fold-free (``det(I + ∇d) >
    min_jacobian`` by central and forward differences), whatever the initial displacement: a
    folding one is repaired first with a warning, or refused (ValueError) where it folds at
    more than :data:`MAX_INITIAL_FOLD_PERCENT` % of the voxels (see :func:`repair_initial`).
    A batch element whose fixed or moving image is constant carries nothing to register: it
    gets the (repaired) initial displacement, or zero, with a warning naming it (a blank crop
    in a training batch does not stop the run); its gradients are zero, never NaN.
    """
    ndim = fixed.dim() - 2
    shape = tuple(fixed.shape[2:])
    spacing = tuple(float(h) for h in spacing) if spacing is not None else (1.0,) * ndim
    diag = Diagnostics() if diagnostics else None
    if initial_displacement is not None and config.safeguard:
        initial_displacement, percent = repair_initial(initial_displacement, config.min_jacobian)
        if diag is not None:
            diag.initial_fold_percent = percent
    constant = _constant_elements(fixed, moving, diag)
    fixed, moving = _prepared_images(fixed, moving, constant, config.normalize, config.features)
    mode = compile_mode(compile)
    run = _Run(
        fixed, moving, config, spacing, initial_displacement,
        lam=config.per_level("lam") if lam is None else lam,
        theta=config.per_level("theta") if theta is None else theta,
        momentum=momentum, step_scale=step_scale, keep=_frozen_mask(config, spacing, fixed),
        velocity=_velocity if mode is None else _compiled_velocity(mode),
        checkpoint=check_checkpoint(checkpoint), diag=diag, mask=mask,
    )  # fmt: skip
    factors = pyramid_factors(
        shape, spacing, config.levels, config.anisotropic_pyramid, config.min_level_size
    )
    d: Tensor | None = None
    for level, fac in enumerate(factors):
        if config.warps[level] > 0:
            d = _solve_level(run, level, fac, d)
        elif diag is not None:
            # A level without warps is skipped: the field passes on at the coarser resolution
            # (e.g. the finest level of ``fast``: solved at half resolution, then upsampled).
            diag.skip_level(tuple(d.shape[2:]) if d is not None else shape)
    return _finish(run, d, constant), diag


@dataclass
class _Run:
    """One call of :func:`solve`: its prepared inputs and what every level needs."""

    fixed: Tensor  # (B, C, *S), normalised (features, where asked for)
    moving: Tensor
    config: SolverSettings
    spacing: tuple[float, ...]
    initial: Tensor | None  # (B, ndim, *S), repaired
    lam: object
    theta: object
    momentum: Sequence[Tensor | None] | None
    step_scale: Sequence[Tensor | None] | None
    keep: Tensor | None  # (1, ndim, 1, ...): 0 on frozen axes
    velocity: object
    checkpoint: bool | str  # True, False or "auto"
    diag: Diagnostics | None
    mask: Tensor | None = None  # (B or 1, 1, *S) data-term weights


def _prepared_images(
    fixed: Tensor, moving: Tensor, constant: Tensor | None, normalize: str, features: str = "none"
) -> tuple[Tensor, Tensor]:
    """Zeros for constant batch elements (nothing to register there), the intensity scaling
    of :func:`normalise_pair` (``normalize``: one of :data:`NORMALIZE_MODES`), then what is
    registered (``features``, one of :data:`~nadmm_torch.ops.features.FEATURES`): the images,
    or their MIND-SSC descriptors (``"mind"``: 12 channels in 3D, 4 in 2D, for pairs whose
    intensities do not correspond), computed once at full resolution, where the
    self-similarity of the finest structures is seen, and area-averaged to each level like
    intensities. ``C > 1`` channels are normalised and gradient-scaled each on its own."""
    if constant is not None:
        fixed = torch.where(constant, torch.zeros_like(fixed), fixed)
        moving = torch.where(constant, torch.zeros_like(moving), moving)
    fixed, moving = normalise_pair(fixed, moving, normalize)
    return image_features(fixed, features), image_features(moving, features)


def _frozen_mask(config: SolverSettings, spacing, like: Tensor) -> Tensor | None:
    """``(1, ndim, 1, ...)``: 0 along the frozen axes, 1 elsewhere; ``None`` if none is."""
    frozen = frozen_axes(config, spacing)
    if not frozen:
        return None
    ndim = like.dim() - 2
    keep = torch.ones(ndim, dtype=like.dtype, device=like.device)
    keep[list(frozen)] = 0.0
    return keep.view(1, ndim, *([1] * ndim))


def _solve_level(run: _Run, level: int, factors: tuple[int, ...], d: Tensor | None) -> Tensor:
    """The warps of one pyramid level, from the coarser level's field ``d`` (or the start)."""
    config, shape = run.config, run.fixed.shape[2:]
    size = tuple(max(1, round(n / f)) for n, f in zip(shape, factors))
    level_spacing = tuple(h * n / m for h, n, m in zip(run.spacing, shape, size))
    f_l = resize(run.fixed, size, mode="area")
    m_l = resize(run.moving, size, mode="area")
    if config.lam_scaling == "gradient":  # λ relative to the pair's gradient energy here
        scale = gradient_scale(f_l, m_l, run.keep)
        f_l, m_l = f_l / scale, m_l / scale
    level_mask = resize(run.mask, size, mode="area") if run.mask is not None else None
    weight = _data_weight(level_mask, config.data_term)
    d = _level_start(run, d, size)
    admm_kwargs = _admm_settings(run, level, level_spacing)
    if config.theta_scaling == "spectral":  # θ relative to the pair's k²ⁿ here
        k2n = spectral_scale(f_l, m_l, level_spacing, run.keep, level_mask).pow(config.order)
        admm_kwargs["theta"] = _relative_theta(admm_kwargs["theta"], k2n, d.dim())
    scales = _level_value(run.step_scale, level) if run.step_scale is not None else None
    active = torch.ones(run.fixed.shape[0], dtype=torch.bool, device=run.fixed.device)
    if run.diag is not None:
        run.diag.start_level(size)
    ckpt = uses_checkpoint(run.checkpoint, d, config.warps[level])
    for w in range(config.warps[level]):
        scale = scales[w] if scales is not None else None
        d, active = _solve_warp(run, d, f_l, m_l, admm_kwargs, scale, active, weight, ckpt)
        if config.tol_warp is not None and not bool(active.any()):
            break
    return d


def _relative_theta(theta, k2n: Tensor, dim: int):
    """θ (a number, 0-d tensor or ``(K,)`` schedule) times each element's ``k²ⁿ`` ``(B,)``:
    one element keeps θ's form; several get ``(B, 1, …)`` values (a list of K of them for a
    schedule), which :func:`nesterov_admm` applies per element."""
    if k2n.shape[0] == 1:
        return theta * k2n.reshape(())
    per_element = k2n.view(-1, *([1] * (dim - 1)))
    if isinstance(theta, Tensor) and theta.dim() == 1:
        return [t * per_element for t in theta]
    return theta * per_element


def _level_start(run: _Run, d: Tensor | None, size: tuple[int, ...]) -> Tensor:
    """The field a level starts from: the coarser level's (or the initial one, or zero)
    resampled to ``size``, made fold-free again where the safeguard is on."""
    if d is None:
        if run.initial is None:
            return run.fixed.new_zeros((run.fixed.shape[0], len(size), *size))
        d = resize_displacement(run.initial.to(run.fixed.dtype), size)
    else:
        d = resize_displacement(d, size)
    if run.config.safeguard:
        d = repair_folds(d, run.config.min_jacobian)
    return d


def _admm_settings(run: _Run, level: int, spacing: tuple[float, ...]) -> dict:
    """The keyword arguments of :func:`nesterov_admm` at ``level``."""
    c = run.config
    return dict(
        lam=_level_value(run.lam, level),
        theta=_level_value(run.theta, level),
        iterations=c.iterations[level],
        order=c.order,
        spacing=spacing,
        data_term=c.data_term,
        boundary=c.boundary,
        accelerated=c.accelerated,
        restart=c.restart,
        restart_eta=c.restart_eta,
        tol=c.tol_admm,
        momentum=_level_value(run.momentum, level) if run.momentum is not None else None,
        record=run.diag is not None,
    )


def _data_weight(level_mask: Tensor | None, data_term: str) -> Tensor | None:
    """The mask at a level as the factor on ``g`` and ``c``: ``√m`` (l2), ``m`` (l1), so the
    data term is weighted by ``m`` (see :func:`solve`)."""
    if level_mask is None:
        return None
    return level_mask.sqrt() if data_term == "l2" else level_mask


def _solve_warp(run: _Run, d, f_l, m_l, admm_kwargs: dict, scale, active: Tensor,
                weight: Tensor | None = None, checkpoint: bool = False):
    """One warp (linearisation) of a level, ``checkpoint``-ed or not; with ``tol_warp``, batch
    elements whose step fell under it keep their field and leave ``active``. Returns ``(d,
    active)``."""
    config = run.config
    if checkpoint:
        d_new, (u, info, s, _) = _checkpointed_warp(run, d, f_l, m_l, admm_kwargs, scale, weight)
    else:
        d_new, u, info, s, _ = _warp_step(d, f_l, m_l, admm_kwargs, scale, config, run.keep,
                                          run.velocity, weight)
    if config.tol_warp is not None:
        act = active.view(-1, *([1] * (d.dim() - 1)))
        d = torch.where(act, d_new, d)
        # The step actually taken (s u): a safeguarded step of scale 0 leaves d as it was, so
        # the next warp would repeat it exactly: the level has stalled, stop it too.
        rms = s * u.detach().pow(2).sum(1).flatten(1).mean(1).sqrt()
        active = active & ~(rms < config.tol_warp)
    else:
        d = d_new
    if run.diag is not None:
        run.diag.record_warp(info, s)
    return d, active


def uses_checkpoint(checkpoint: bool | str, d: Tensor, warps: int) -> bool:
    """Whether the ``warps`` warps of a level with field ``d`` are checkpointed:
    ``checkpoint=True``, or ``"auto"`` where checkpointing frees the graphs of more than
    :data:`CHECKPOINT_AUTO_ELEMENTS` field elements, ``(warps − 1) · d.numel()`` (in the backward
    pass one warp's graph is rebuilt at a time, so a level of one warp gains nothing); never
    without grad mode (nothing to backpropagate)."""
    if not torch.is_grad_enabled():
        return False
    if checkpoint == "auto":
        return (warps - 1) * d.numel() > CHECKPOINT_AUTO_ELEMENTS
    return bool(checkpoint)


def _checkpointed_warp(run: _Run, d, f_l, m_l, admm_kwargs: dict, scale, weight):
    """:func:`_warp_step` through :func:`~nadmm_torch.ops.checkpoint.checkpoint_call`: the
    warp runs without a graph and is recomputed in the backward pass, with the safeguard's
    decision of the first pass. Returns ``(d_new, (u, info, s, decision))``. The tensors that
    gradients reach (field, images, λ, θ, momentum, step scale, mask) are passed explicitly."""
    config = run.config

    def first(d, f, m, lam, theta, momentum, scale, weight):
        kwargs = dict(admm_kwargs, lam=lam, theta=theta, momentum=momentum)
        d_new, *aux = _warp_step(d, f, m, kwargs, scale, config, run.keep, run.velocity, weight)
        return d_new, tuple(aux)

    def again(d, f, m, lam, theta, momentum, scale, weight, aux):
        kwargs = dict(admm_kwargs, lam=lam, theta=theta, momentum=momentum, record=False)
        return _warp_step(d, f, m, kwargs, scale, config, run.keep, run.velocity, weight,
                          decision=aux[3])[0]

    k = admm_kwargs
    return checkpoint_call(first, again, d, f_l, m_l, k["lam"], k["theta"], k["momentum"],
                           scale, weight)


def _finish(run: _Run, d: Tensor | None, constant: Tensor | None) -> Tensor:
    """The field at full resolution, fold-free, and the initial one (or zero) where an image
    was constant."""
    fixed, initial, config = run.fixed, run.initial, run.config
    shape = tuple(fixed.shape[2:])
    if d is None:  # every level skipped
        d = (fixed.new_zeros((fixed.shape[0], len(shape), *shape)) if initial is None
             else initial.to(fixed.dtype))
    if tuple(d.shape[2:]) != shape:
        d = resize_displacement(d, shape)
    if config.safeguard:
        d = repair_folds(d, config.min_jacobian)
    if constant is not None:
        fallback = torch.zeros_like(d) if initial is None else initial.to(d.dtype)
        d = torch.where(constant, fallback, d)
    return d


def _constant_elements(fixed: Tensor, moving: Tensor, diag: Diagnostics | None) -> Tensor | None:
    """``(B, 1, ..., 1)`` mask of the batch elements with a constant image (``None`` if there
    are none; one host synchronisation), with a warning naming them."""
    constant = constant_elements(fixed, moving)
    idx = torch.nonzero(constant).flatten().tolist()
    if not idx:
        return None
    if diag is not None:
        diag.constant_elements = idx
    warnings.warn(
        f"fixed/moving: constant image in batch element(s) {idx}: nothing to register there; "
        "their displacement is the initial displacement (zero where none is given)",
        UserWarning,
        stacklevel=4,
    )
    return constant.view(-1, *([1] * (fixed.dim() - 1)))


def compile_mode(compile: bool | str) -> str | None:
    """The torch.compile mode that ``compile=`` asks for (``None``: eager), or a ValueError."""
    if compile is False:
        return None
    if compile is True:
        return "default"
    if compile not in COMPILE_MODES:
        raise ValueError(
            f"compile: expected False, True or one of {list(COMPILE_MODES)}, got {compile!r}"
        )
    return compile


@cache
def _compiled_velocity(mode: str):
    """One compiled :func:`_velocity` per mode, shared by every solve (and so is its cache of
    compiled shapes)."""
    compiled = torch.compile(_velocity, mode=mode)
    graphs = mode == "reduce-overhead"

    def run(d, *args):
        with warnings.catch_warnings():
            # Dynamo traces through the lru_cache of the DCT matrices and symbols: harmless
            # here (pure functions of shape/spacing), so its warning is not passed on.
            warnings.filterwarnings("ignore", message=".*lru_cache", category=UserWarning)
            if graphs:  # each warp step is a new replay of the CUDA graph
                torch.compiler.cudagraph_mark_step_begin()
            out = compiled(d, *args)
        if graphs and d.is_cuda:
            # A replay overwrites the graph's output memory, and the next warp step replays
            # it while these outputs are still in use: own copies.
            out = _own_outputs(out)
        return out

    return run


def _own_outputs(out):
    u, info, (full, full_min) = out
    info = replace(
        info,
        iterations=info.iterations.clone(),
        residuals=[r.clone() for r in info.residuals],
        restarts=None if info.restarts is None else info.restarts.clone(),
    )
    return u.clone(), info, (full.clone(), None if full_min is None else full_min.clone())


def _velocity(d, fixed, moving, admm_kwargs: dict, scale, mask, safeguard: bool, weight=None):
    """Warp, linearise, ADMM for the velocity ``u``, and the full step ``compose(d, u)`` with,
    for the safeguard, its minimum det J: everything of a warp step up to the host check.
    ``weight``: ``(B or 1, 1, *S)`` factor on ``g`` and ``c`` (the data term's mask)."""
    warped = warp(moving, d)
    g = spatial_gradient(warped)  # (B, C, ndim, *S), voxel units
    # one channel: (B, ndim, *S); C > 1: (B, C, ndim, *S), so the spatial factors get an axis
    g, axis = (g[:, 0], 0) if g.shape[1] == 1 else (g, 1)
    if mask is not None:  # frozen axes: no gradient along them, so no motion either
        g = g * (mask.unsqueeze(1) if axis else mask)
    c = warped - fixed
    if weight is not None:
        g, c = g * (weight.unsqueeze(2) if axis else weight), c * weight
    u, info = nesterov_admm(g, c, **admm_kwargs)
    if scale is not None:
        u = u * scale
    full = _full_step(d, u) if safeguard else (compose(d, u), None)
    return u, info, full


def _warp_step(d, fixed, moving, admm_kwargs: dict, scale, config, mask=None, velocity=_velocity,
               weight=None, decision=_DECIDE):
    """One linearisation: warp, ADMM for the velocity, (safeguarded) composition. Returns
    ``(d_new, u, info, s, decision)``; ``decision``: the safeguard's (``None``: the full step
    everywhere, else the scales ``(B,)``), given to redo the step without deciding again."""
    decide = config.safeguard and decision is _DECIDE
    u, info, full = velocity(d, fixed, moving, admm_kwargs, scale, mask, decide, weight)
    ones = torch.ones(d.shape[0], dtype=d.dtype, device=d.device)
    if decide:
        d_new, s, decision = _safeguarded(d, u, config.min_jacobian, full=full)
    elif not config.safeguard or decision is None:
        d_new, s, decision = full[0], ones, None
    else:
        d_new, s = _scaled_step(d, u, decision), decision
    return d_new, u, info, s, decision
