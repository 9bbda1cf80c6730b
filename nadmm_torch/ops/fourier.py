"""Spectral solves of ``(θ I + h_i² (−Δ_h)^n) u_i = r_i``: the u-step of the ADMM.

The finite-difference Laplacian ``Δ_h`` (spacing ``h``) is diagonalised by

* the real FFT under **periodic** boundaries, with symbol
  ``Σ_d (2 − 2 cos(2π k_d / N_d)) / h_d²`` (the paper's choice), and
* the orthonormal DCT-II under **Neumann** (mirror, half-sample) boundaries, with symbol
  ``Σ_d (2 − 2 cos(π k_d / N_d)) / h_d²``.

Neumann is the default of the package: ACDC volumes have 6–18 slices, and under periodic
boundaries the top slice is a neighbour of the bottom one, so a displacement at one end would
pull on the other. The DCT is applied as a dense ``N × N`` matrix per axis (exact, differentiable,
GPU-friendly; fine for the ≤ 512-voxel axes of medical images).

Shapes: right-hand sides ``(B, ndim, *S)``; component ``i`` is weighted by ``h_i²`` (the model
regularises the physical displacement ``h_i u_i``; see ``docs/method.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import scipy.fft
import torch
from torch import Tensor

BOUNDARIES = ("neumann", "periodic")
# CPU fields with a spatial axis at least this long are transformed by scipy's pocketfft DCT
# in the inference loop (:func:`dct_into`): O(N log N) per line instead of the dense matrix's
# O(N²). Measured (one thread, (1, 3, 10, N, N)): 0.27 vs 0.34 ms at N = 32, 1.2 vs 1.3 ms at
# 64, 8.2 vs 4.9 ms at 128, 112 vs 53 ms at 96 × 128 × 128 (matrix vs pocketfft).
POCKETFFT_MIN_AXIS = 96


@lru_cache(maxsize=64)
def dct_matrix(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Orthonormal DCT-II matrix ``C`` (``n × n``): ``X = C x``, inverse ``x = Cᵀ X``."""
    with torch.inference_mode(False):  # cached: must stay usable by later autograd passes
        return _dct_matrix(n, dtype, device)


def _dct_matrix(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Built on ``device``: under torch.compile these constructors are traced into the graph,
    # and CPU constructors feeding CUDA ops failed Inductor's device check.
    k = torch.arange(n, dtype=torch.float64, device=device).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64, device=device).unsqueeze(0)
    c = torch.cos(math.pi * k * (2 * i + 1) / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype=dtype, device=device)


def _axis_symbol(n: int, h: float, boundary: str, half: bool, device=None) -> Tensor:
    """1-D symbol of ``−∂²`` (float64): ``(2 − 2 cos ω_k) / h²``."""
    k = torch.arange(n // 2 + 1 if half else n, dtype=torch.float64, device=device)
    omega = (2.0 * math.pi / n) * k if boundary == "periodic" else (math.pi / n) * k
    return (2.0 - 2.0 * torch.cos(omega)) / (h * h)


@lru_cache(maxsize=64)
def laplacian_symbol(
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    order: int,
    boundary: str,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Symbol ``Λ_n`` of ``(−Δ_h)^n`` on the transform grid of ``boundary``.

    Returns ``(*S_hat)``: ``S`` for Neumann, ``S`` with the last axis halved (``N//2 + 1``) for
    periodic (``rfftn`` layout). Cached per (shape, spacing, order, boundary, dtype, device).
    """
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    with torch.inference_mode(False):  # cached: must stay usable by later autograd passes
        return _laplacian_symbol(shape, spacing, order, boundary, dtype, device)


def _laplacian_symbol(shape, spacing, order, boundary, dtype, device) -> Tensor:
    ndim = len(shape)
    total = torch.zeros((), dtype=torch.float64, device=device)  # on device: see _dct_matrix
    for d, (n, h) in enumerate(zip(shape, spacing)):
        half = boundary == "periodic" and d == ndim - 1
        view = [1] * ndim
        view[d] = -1
        total = total + _axis_symbol(n, h, boundary, half, device).view(view)
    return (total**order).to(dtype=dtype, device=device)


def _along(x: Tensor, m: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
    """``y_k = Σ_i m[k, i] x_i`` along ``dim``, as one (batched) matmul without moving axes;
    into ``out`` (shaped like ``x``, contiguous) where given."""
    if dim == x.dim() - 1:
        return torch.matmul(x, m.T, out=out)
    if dim == x.dim() - 2:
        return torch.matmul(m, x, out=out)
    rows = math.prod(x.shape[:dim])
    view = (rows, x.shape[dim], -1)
    if out is None:
        return (m @ x.reshape(view)).reshape(x.shape)
    torch.matmul(m, x.view(view), out=out.view(view))
    return out


def forward_transform(x: Tensor, boundary: str) -> Tensor:
    """Transform the spatial axes of ``(B, C, *S)`` into the basis that diagonalises ``Δ``."""
    ndim = x.dim() - 2
    dims = tuple(range(2, 2 + ndim))
    if boundary == "periodic":
        return torch.fft.rfftn(x, dim=dims)
    for d in dims:
        n = x.shape[d]
        if n > 1:
            x = _along(x, dct_matrix(n, x.dtype, x.device), d)
    return x


def inverse_transform(x: Tensor, shape: Sequence[int], boundary: str) -> Tensor:
    """Inverse of :func:`forward_transform`; ``shape`` is the spatial shape ``S``."""
    ndim = len(shape)
    dims = tuple(range(2, 2 + ndim))
    if boundary == "periodic":
        return torch.fft.irfftn(x, s=tuple(shape), dim=dims)
    for d in dims:
        n = x.shape[d]
        if n > 1:
            x = _along(x, dct_matrix(n, x.dtype, x.device).T, d)
    return x


def dct_into(x: Tensor, buffers: tuple[Tensor, Tensor], inverse: bool = False) -> Tensor:
    """The Neumann :func:`forward_transform` (or, ``inverse``, :func:`inverse_transform`) of
    ``x`` written into two ping-pong ``buffers`` shaped like ``x`` (no allocation: the ADMM
    inference loop); returns the buffer holding the result (``x`` itself if nothing to do).
    Large CPU fields (an axis ≥ :data:`POCKETFFT_MIN_AXIS`) go through scipy's DCT: the same
    transform to float rounding, in about half the time. No autograd (inference only)."""
    if _pocketfft_pays(x):
        return _pocketfft_into(x, buffers, inverse)
    out = x
    for dim in range(2, x.dim()):
        n = x.shape[dim]
        if n > 1:
            m = dct_matrix(n, x.dtype, x.device)
            dst = buffers[0] if out is not buffers[0] else buffers[1]
            out = _along(out, m.T if inverse else m, dim, out=dst)
    return out


def _pocketfft_pays(x: Tensor) -> bool:
    return (
        x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        and max(x.shape[2:]) >= POCKETFFT_MIN_AXIS and not x.requires_grad
    )


def _pocketfft_into(x: Tensor, buffers: tuple[Tensor, Tensor], inverse: bool) -> Tensor:
    """:func:`dct_into` by ``scipy.fft.dctn`` (``idctn``: the orthonormal DCT-III, ``Cᵀ``)."""
    axes = [d for d in range(2, x.dim()) if x.shape[d] > 1]
    if not axes:
        return x
    dst = buffers[0] if x is not buffers[0] else buffers[1]
    transform = scipy.fft.idctn if inverse else scipy.fft.dctn
    y = transform(x.contiguous().numpy(), type=2, norm="ortho", axes=axes,
                  workers=torch.get_num_threads())
    dst.copy_(torch.from_numpy(y))
    return dst


def regulariser_weights(spacing: Sequence[float], dtype: torch.dtype, device) -> Tensor:
    """``h_i²`` per displacement component, shaped ``(ndim,)``."""
    return torch.tensor([float(h) ** 2 for h in spacing], dtype=dtype, device=device)


def shifted_inverse(theta: Tensor | float, symbol: Tensor, weights: Tensor) -> Tensor:
    """Spectral multiplier ``1 / (θ + h_i² Λ_n)`` of the u-step, shaped ``(1, ndim, *S_hat)``.

    Constant over the iterations of one ADMM solve with a fixed θ, so the loop builds it once.
    """
    ndim = symbol.dim()
    return 1.0 / (theta + weights.view(1, -1, *([1] * ndim)) * symbol.unsqueeze(0).unsqueeze(0))


def apply_spectral(rhs: Tensor, multiplier: Tensor, boundary: str) -> Tensor:
    """``T⁻¹ (multiplier · T rhs)`` for the transform ``T`` of ``boundary``; rhs ``(B, C, *S)``."""
    return inverse_transform(forward_transform(rhs, boundary) * multiplier, rhs.shape[2:], boundary)


def solve_shifted(
    rhs: Tensor,
    theta: Tensor | float,
    symbol: Tensor,
    weights: Tensor,
    boundary: str,
) -> Tensor:
    """Solve ``(θ I + h_i² Λ_n) u_i = rhs_i`` for every component ``i``.

    Args:
        rhs: ``(B, ndim, *S)`` real.
        theta: positive scalar (float or 0-d tensor; may require grad).
        symbol: ``Λ_n`` from :func:`laplacian_symbol` for ``S``.
        weights: ``(ndim,)`` component weights ``h_i²``.
        boundary: ``"neumann"`` or ``"periodic"``.

    Returns:
        ``(B, ndim, *S)``.
    """
    return apply_spectral(rhs, shifted_inverse(theta, symbol, weights), boundary)
