"""Input validation in one place: every public entry point checks its arguments here.

Each error names the argument and says what was expected. Checks that need the values (finite,
non-constant) cost one reduction and one host synchronisation per image; they run once per
call, never inside the solver's loops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_image(x: object, name: str, ndim: int | None = None) -> Tensor:
    """``(B, C, *S)`` with ``len(S)`` in {2, 3} (or ``ndim``), non-empty, floating, finite."""
    x = check_tensor(x, name)
    if x.dim() not in (4, 5):
        raise ValueError(
            f"{name}: expected a (B, C, H, W) or (B, C, D, H, W) tensor, got shape "
            f"{tuple(x.shape)} ({x.dim()} dims); add batch/channel dims with x[None, None]"
        )
    if ndim is not None and x.dim() - 2 != ndim:
        raise ValueError(f"{name}: expected {ndim} spatial dims, got {x.dim() - 2}")
    if x.numel() == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating dtype (float32/float64), got {x.dtype}; "
            "convert with .float()"
        )
    check_finite(x, name)
    return x


def check_finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name}: contains non-finite values ({n_nan} NaN, {n_inf} Inf)")


def check_not_constant(x: Tensor, name: str) -> None:
    """Each batch element must vary: a constant image carries no information to register."""
    flat = x.detach().flatten(1)
    const = flat.amax(dim=1) == flat.amin(dim=1)
    if bool(const.any()):
        idx = torch.nonzero(const).flatten().tolist()
        raise ValueError(f"{name}: is constant (batch element(s) {idx}); nothing to register")


def check_pair(fixed: Tensor, moving: Tensor) -> tuple[Tensor, Tensor]:
    """Fixed and moving: valid images of one shape, dtype and device, one channel each."""
    fixed = check_image(fixed, "fixed")
    moving = check_image(moving, "moving")
    if fixed.dim() != moving.dim():
        raise ValueError(
            f"moving: expected {fixed.dim() - 2} spatial dims like fixed, got {moving.dim() - 2}"
        )
    if fixed.shape[0] != moving.shape[0]:
        raise ValueError(
            f"moving: batch size {moving.shape[0]} does not match fixed batch size {fixed.shape[0]}"
        )
    if fixed.shape[1] != 1 or moving.shape[1] != 1:
        raise ValueError(
            "fixed/moving: expected single-channel images (C = 1), got "
            f"C = {fixed.shape[1]} and {moving.shape[1]}; select or average channels first"
        )
    if fixed.shape[2:] != moving.shape[2:]:
        raise ValueError(
            f"moving: spatial shape {tuple(moving.shape[2:])} does not match fixed "
            f"{tuple(fixed.shape[2:])}; resample moving onto the fixed grid first "
            "(nadmm_torch.io.resample_to or the nadmm-register command do this)"
        )
    if fixed.device != moving.device:
        raise ValueError(f"moving: on {moving.device}, fixed on {fixed.device}; use one device")
    if fixed.dtype != moving.dtype:
        raise TypeError(f"moving: dtype {moving.dtype} differs from fixed dtype {fixed.dtype}")
    check_not_constant(fixed, "fixed")
    check_not_constant(moving, "moving")
    return fixed, moving


def check_spacing(spacing: object, ndim: int) -> tuple[float, ...] | None:
    """``None`` or ``ndim`` positive finite numbers (mm, in the order of the spatial axes)."""
    if spacing is None:
        return None
    if isinstance(spacing, Tensor):
        spacing = spacing.detach().flatten().tolist()
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * ndim
    if not isinstance(spacing, Sequence) or len(spacing) != ndim:
        raise ValueError(
            f"spacing: expected {ndim} numbers (one per spatial axis), got {spacing!r}"
        )
    out = tuple(float(h) for h in spacing)
    if not all(h > 0 and h < float("inf") for h in out):
        raise ValueError(f"spacing: expected positive finite values, got {out}")
    return out


def check_displacement(d: object, name: str, like: Tensor | None = None) -> Tensor:
    """``(B, ndim, *S)`` floating and finite; matching ``like`` (an image) where given."""
    d = check_tensor(d, name)
    if d.dim() not in (4, 5) or d.shape[1] != d.dim() - 2:
        raise ValueError(
            f"{name}: expected a (B, ndim, *S) displacement with ndim = len(S) in (2, 3), "
            f"got shape {tuple(d.shape)}"
        )
    if not d.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {d.dtype}")
    check_finite(d, name)
    if like is not None:
        if d.shape[0] != like.shape[0] or d.shape[2:] != like.shape[2:]:
            raise ValueError(
                f"{name}: shape {tuple(d.shape)} does not fit the image of shape "
                f"{tuple(like.shape)}: expected ({like.shape[0]}, {like.dim() - 2}, "
                f"{', '.join(str(s) for s in like.shape[2:])})"
            )
        if d.device != like.device:
            raise ValueError(f"{name}: on {d.device}, the image on {like.device}; use one device")
    return d


def check_choice(value: object, name: str, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_pyramid_size(shape: Sequence[int], min_size: int) -> None:
    """Every axis but a single-slice one needs at least ``min_size`` voxels."""
    small = [n for n in shape if 1 < n < min_size] or ([] if max(shape) >= min_size else [shape])
    if small:
        raise ValueError(
            f"fixed: spatial shape {tuple(shape)} is too small: every axis needs >= {min_size} "
            "voxels (or exactly 1)"
        )
