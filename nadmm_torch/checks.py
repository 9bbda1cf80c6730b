"""Input validation: pure checks of tensors and plain values, each naming the argument.

This module imports nothing of the package (solver options are validated by
:meth:`nadmm_torch.config.SolverConfig.from_preset`, built on the checks here). TypeError for a
wrong type, ValueError for a wrong value; messages read "name: expected …, got …".

Each error names the argument and says what was expected. Checks that need the values (finite)
cost one reduction and one host synchronisation per image; they run once per
call, never inside the solver's loops. Structural checks (type, shape, dtype, device) run
before any check that reads values, so a tensor on the wrong device is reported as such.

Policies:

* channels: the deformable registration takes ``C >= 1`` channels, the same number in both
  images (multi-contrast pairs: the l2 data term sums over them; l1 needs ``C = 1``); the
  affine stage and the baselines take single-channel images (``C = 1``);
  :func:`nadmm_torch.warp` warps any ``C``.
* dtypes: float32/float64 are computed as given; float16/bfloat16 are computed in float32
  (the displacement is float32); integer, bool and complex images are refused.
* constant images are not refused: the solver returns the initial displacement (or zero) for
  such a batch element, with a warning (one blank crop must not stop a training run).
* sizes: every spatial axis needs at least :data:`MIN_AXIS` voxels, or exactly 1 (a single
  slice, which the pyramid never downsamples); a 2- or 3-voxel axis is almost always a mix-up
  of axes (e.g. RGB or a vector component taken as a spatial axis).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)
# Smallest spatial axis the registration accepts (besides a single slice); see module docstring.
MIN_AXIS = 4


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_nonempty(x: Tensor, name: str) -> None:
    if x.numel() == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(x.shape)}); expected at least 1 voxel")


def check_image_layout(x: object, name: str, ndim: int | None = None) -> Tensor:
    """Structure only (reads no values): ``(B, C, *S)``, ``len(S)`` in {2, 3}, non-empty, float."""
    x = check_tensor(x, name)
    if x.dim() not in (4, 5):
        raise ValueError(
            f"{name}: expected a (B, C, H, W) or (B, C, D, H, W) tensor, got shape "
            f"{tuple(x.shape)} ({x.dim()} dims); add batch/channel dims with x[None, None]"
        )
    if ndim is not None and x.dim() - 2 != ndim:
        raise ValueError(f"{name}: expected {ndim} spatial dims, got {x.dim() - 2}")
    check_nonempty(x, name)
    if not x.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating dtype (float32/float64), got {x.dtype}; "
            "convert with .float()"
        )
    return x


def check_has_data(x: Tensor, name: str) -> None:
    """``x`` must hold values: a meta tensor (shape and dtype only) cannot be registered."""
    if x.is_meta:
        raise ValueError(
            f"{name}: meta tensors have no data; create or load it on a real device "
            "(cpu, cuda) instead"
        )


def check_finite(x: Tensor, name: str) -> None:
    check_has_data(x, name)  # the first check that reads values
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name}: contains non-finite values ({n_nan} NaN, {n_inf} Inf)")


def check_same_device(x: Tensor, device: torch.device, name: str, other: str) -> None:
    """``x`` must be on ``device`` (where ``other``, e.g. "fixed", lives)."""
    if x.device != device:
        raise ValueError(f"{name}: on {x.device}, {other} on {device}; use one device")


def check_pair(
    fixed: Tensor, moving: Tensor, multichannel: bool = False
) -> tuple[Tensor, Tensor]:
    """Fixed and moving: valid images of one shape, dtype and device; one channel each, or
    with ``multichannel`` the same number ``C >= 1`` of channels."""
    fixed = check_image_layout(fixed, "fixed")
    moving = check_image_layout(moving, "moving")
    if fixed.dim() != moving.dim():
        raise ValueError(
            f"moving: expected {fixed.dim() - 2} spatial dims like fixed, got {moving.dim() - 2}"
        )
    if fixed.shape[0] != moving.shape[0]:
        raise ValueError(
            f"moving: batch size {moving.shape[0]} does not match fixed batch size {fixed.shape[0]}"
        )
    if multichannel and fixed.shape[1] != moving.shape[1]:
        raise ValueError(
            f"moving: {moving.shape[1]} channel(s), fixed {fixed.shape[1]}; expected the same "
            "number of channels C in both images (channel c of moving is compared with channel "
            "c of fixed)"
        )
    if not multichannel and (fixed.shape[1] != 1 or moving.shape[1] != 1):
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
    check_same_device(moving, fixed.device, "moving", "fixed")
    if fixed.dtype != moving.dtype:
        raise TypeError(f"moving: dtype {moving.dtype} differs from fixed dtype {fixed.dtype}")
    # Values last: these synchronise with the device.
    check_finite(fixed, "fixed")
    check_finite(moving, "moving")
    # A constant image is not an error: the solver returns the initial displacement (or zero)
    # for that batch element, with a warning (see nadmm_torch.ops.solver.solve).
    return fixed, moving


def is_real(v: object) -> bool:
    """A real number (Python or NumPy) that is not a bool (True would silently mean 1)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# Spacings that keep the solver's float32 arithmetic finite (h^-2n, h² Λ_n): beyond them a
# field silently comes back zero or an overflow error is raised from deep inside.
SPACING_BOUNDS = (1e-6, 1e6)  # mm


def as_python(value: object) -> object:
    """Tensors, NumPy arrays and NumPy scalars as Python numbers (0-d) or flat lists; any
    other value as it is."""
    if isinstance(value, Tensor):
        value = value.detach()
    elif not (type(value).__module__ == "numpy" and hasattr(value, "tolist")):
        return value
    return value.tolist() if value.ndim == 0 else value.flatten().tolist()


def check_spacing(spacing: object, ndim: int) -> tuple[float, ...] | None:
    """``None`` or ``ndim`` positive finite numbers (mm, in the order of the spatial axes), each
    within :data:`SPACING_BOUNDS`. A number, a sequence, a tensor or a NumPy array."""
    if spacing is None:
        return None
    spacing = as_python(spacing)
    if isinstance(spacing, Sequence) and not isinstance(spacing, (str, bytes)):
        # One-element tensors (e.g. from a header) count as numbers.
        spacing = [h.item() if isinstance(h, Tensor) and h.numel() == 1 else h for h in spacing]
    if is_real(spacing):
        spacing = (float(spacing),) * ndim
    if (
        isinstance(spacing, (str, bytes))
        or not isinstance(spacing, Sequence)
        or len(spacing) != ndim
        or not all(is_real(h) for h in spacing)
    ):
        raise ValueError(
            f"spacing: expected {ndim} numbers (one per spatial axis), got {spacing!r}"
        )
    out = tuple(float(h) for h in spacing)
    if not all(h > 0 and h < float("inf") for h in out):
        raise ValueError(f"spacing: expected positive finite values, got {out}")
    lo, hi = SPACING_BOUNDS
    if not all(lo <= h <= hi for h in out):
        raise ValueError(
            f"spacing: expected values in [{lo:g}, {hi:g}] mm (beyond them the solver's "
            f"float32 arithmetic overflows), got {out}"
        )
    return out


def check_displacement(d: object, name: str, like: Tensor | None = None) -> Tensor:
    """``(B, ndim, *S)`` floating and finite; matching ``like`` (an image) where given."""
    d = check_displacement_layout(d, name)
    if like is not None:
        if d.shape[0] != like.shape[0] or d.shape[2:] != like.shape[2:]:
            raise ValueError(
                f"{name}: shape {tuple(d.shape)} does not fit the image of shape "
                f"{tuple(like.shape)}: expected ({like.shape[0]}, {like.dim() - 2}, "
                f"{', '.join(str(s) for s in like.shape[2:])})"
            )
        check_same_device(d, like.device, name, "the image")
    check_finite(d, name)
    return d


def check_choice(value: object, name: str, choices: Sequence[object]) -> None:
    """``value`` is one of ``choices``: TypeError if it is of none of their types, else
    ValueError. Compared by equality only, so an unhashable value gets the message too."""
    if any(isinstance(value, type(c)) and value == c for c in choices):
        return
    error = ValueError if any(isinstance(value, type(c)) for c in choices) else TypeError
    raise error(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_pyramid_size(shape: Sequence[int], min_size: int = MIN_AXIS) -> None:
    """Every axis needs at least ``min_size`` voxels, or exactly 1 (not all of them 1)."""
    small = [n for n in shape if 1 < n < min_size] or ([] if max(shape) >= min_size else [shape])
    if small:
        raise ValueError(
            f"fixed: spatial shape {tuple(shape)} is too small: every axis needs >= {min_size} "
            "voxels (or exactly 1, a single slice, with at least one axis larger)"
        )


# -- plain values -----------------------------------------------------------------------------

def check_bool(value: object, name: str) -> bool:
    """``True`` or ``False`` (NumPy's too); a truthy string such as ``'no'`` must not pass."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if isinstance(value, bool) or numpy_bool:
        return bool(value)
    raise TypeError(f"{name}: expected True or False, got {value!r}")


def check_checkpoint(value: object, name: str = "checkpoint") -> bool | str:
    """Gradient checkpointing: ``True``, ``False`` (NumPy's too) or ``"auto"`` (checkpoint
    where the field is large; see :data:`nadmm_torch.ops.solver.CHECKPOINT_AUTO_ELEMENTS`).
    TypeError for a value of another type, ValueError for another string."""
    if isinstance(value, str):
        if value == "auto":
            return value
        raise ValueError(f"{name}: expected True, False or 'auto', got {value!r}")
    try:
        return check_bool(value, name)
    except TypeError:
        raise TypeError(f"{name}: expected True, False or 'auto', got {value!r}") from None


def is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(value: object, name: str, minimum: int) -> int:
    """An integer (Python or NumPy, not a bool) ``>= minimum``."""
    if not is_int(value):
        raise TypeError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_real(value: object, name: str, what: str, ok) -> float:
    """A real number (Python or NumPy, not a bool) for which ``ok(float(value))`` holds;
    ``what`` describes the accepted values in the message."""
    if not is_real(value):
        raise TypeError(f"{name}: expected {what}, got {value!r}")
    if not ok(float(value)):
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return float(value)


def check_positive(value: object, name: str, what: str = "a positive finite number") -> float:
    return check_real(value, name, what, lambda v: 0 < v < math.inf)


def check_per_level(value: object, name: str, check):
    """A scalar, or a sequence (one per level), each passing ``check``; returns the same kind.
    NumPy arrays and scalars count as sequences and numbers."""
    if not isinstance(value, Tensor):  # a tensor λ is refused by ``check`` (not a number)
        value = as_python(value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) == 0:
            raise ValueError(f"{name}: expected a value or one value per level, got {value!r}")
        return tuple(check(v) for v in value)
    return check(value)


def check_learnable(learnable: object, names: Sequence[str]) -> frozenset[str]:
    """The learnable names: ``None``/``False`` (none), ``True``/``"all"`` (all of ``names``),
    one name, or an iterable of names from ``names``."""
    if learnable is None or learnable is False:
        return frozenset()
    if learnable is True or learnable == "all":
        return frozenset(names)
    if isinstance(learnable, str):
        values = [learnable]
    elif isinstance(learnable, Iterable) and not isinstance(learnable, (bytes, Mapping, Tensor)):
        values = list(learnable)
    else:
        values = None
    if values is None or not all(isinstance(v, str) for v in values):
        raise ValueError(
            f"learnable: expected None, True, 'all' or names from {list(names)}, got {learnable!r}"
        )
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f"learnable: unknown name(s) {unknown}; expected True, 'all' or a subset of "
            f"{list(names)}"
        )
    return frozenset(values)


def check_module_device(x: Tensor, module: torch.nn.Module, name: str) -> None:
    """The module's parameters and buffers must live where the input does."""
    from itertools import chain

    for p in chain(module.parameters(), module.buffers()):
        if p.device != x.device:
            raise ValueError(
                f"{name}: on {x.device}, the module's parameters on {p.device}; move the "
                f"module with .to({str(x.device)!r}) or the input to {p.device}"
            )
        return  # they all move together with .to(); the first one tells


# -- affine stage -----------------------------------------------------------------------------


def check_affine_options(
    similarity: object, levels: object, iterations: object, max_step: object, init: object,
    similarities: Sequence[str],
) -> tuple[int, tuple[int, ...], float]:
    """The settings of ``affine``: returns ``(levels, iterations per level, max_step)``."""
    check_choice(similarity, "similarity", tuple(similarities))
    levels = check_int(levels, "levels", 1)
    if iterations is None:
        its = ((50,) * max(levels - 2, 0) + (30, 20))[-levels:]
    elif isinstance(iterations, Sequence) and not isinstance(iterations, (str, bytes)):
        its = tuple(check_int(v, "iterations (per level)", 0) for v in iterations)
        if len(its) != levels:
            raise ValueError(
                f"iterations: expected one value or {levels} (one per level), got {len(its)}"
            )
    else:
        its = (check_int(iterations, "iterations", 0),) * levels
    max_step = check_positive(max_step, "max_step")
    check_choice(init, "init", ("com", "identity"))
    return levels, its, max_step


def check_affine_matrix(A: object, name: str, ndim: int, like: Tensor | None = None) -> Tensor:
    """``(B, ndim, ndim + 1)`` floating and finite (batch and device of ``like`` if given)."""
    A = check_tensor(A, name)
    if A.dim() != 3 or tuple(A.shape[1:]) != (ndim, ndim + 1):
        raise ValueError(
            f"{name}: expected a (B, {ndim}, {ndim + 1}) affine matrix, got shape {tuple(A.shape)}"
        )
    if not A.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {A.dtype}")
    if like is not None:
        if A.shape[0] != like.shape[0]:
            raise ValueError(f"{name}: batch size {A.shape[0]}, the images have {like.shape[0]}")
        check_same_device(A, like.device, name, "the image")
    check_finite(A, name)
    return A


# -- generic checks for the upper layers (metrics, losses, baselines, lightning, cli) -----------
# These know no domain and import nothing from the package: structure checks read no values
# (no host synchronisation: losses run them at every training step).


def check_grid(x: object, name: str) -> Tensor:
    """``(B, C, *S)`` with ``len(S)`` in {2, 3}, non-empty; any dtype (images, labels, one-hot)."""
    x = check_tensor(x, name)
    if x.dim() not in (4, 5):
        raise ValueError(
            f"{name}: expected a (B, C, H, W) or (B, C, D, H, W) tensor, got shape "
            f"{tuple(x.shape)}"
        )
    check_nonempty(x, name)
    return x


def check_displacement_layout(d: object, name: str = "displacement") -> Tensor:
    """``(B, ndim, *S)`` with ``ndim = len(S)`` in {2, 3}, non-empty, floating; reads no values."""
    d = check_tensor(d, name)
    if d.dim() not in (4, 5) or d.shape[1] != d.dim() - 2:
        raise ValueError(
            f"{name}: expected a (B, ndim, *S) displacement with ndim = len(S) in (2, 3), "
            f"got shape {tuple(d.shape)}"
        )
    check_nonempty(d, name)
    if not d.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {d.dtype}")
    return d


def check_label_map(x: object, name: str, min_dims: int = 2) -> Tensor:
    """An integer (or bool) tensor with at least ``min_dims`` dims, non-empty."""
    x = check_tensor(x, name)
    if x.is_floating_point() or x.is_complex():
        raise TypeError(
            f"{name}: expected an integer label map, got dtype {x.dtype}; convert with .long()"
        )
    if x.dim() < min_dims:
        raise ValueError(
            f"{name}: expected at least {min_dims} dims (a batch axis and spatial axes), got "
            f"shape {tuple(x.shape)}"
        )
    check_nonempty(x, name)
    return x


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """``b`` must have the shape of ``a``."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b}: expected the same shape as {name_a} {tuple(a.shape)}, got "
            f"{tuple(b.shape)}"
        )


def check_int_list(values: object, name: str) -> tuple[int, ...]:
    """A non-empty sequence of integers (NumPy's too), e.g. label values."""
    values = as_python(values)
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name}: expected a sequence of integers, got {values!r}")
    out = list(values)
    if not all(is_int(v) for v in out):
        raise TypeError(f"{name}: expected a sequence of integers, got {values!r}")
    if not out:
        raise ValueError(f"{name}: expected at least one value, got {values!r}")
    return tuple(int(v) for v in out)


def check_spacing_rows(spacing: object, batch: int, ndim: int) -> list[tuple[float, ...] | None]:
    """One spacing per batch element from ``None``, ``ndim`` numbers (shared) or a
    ``(batch, ndim)`` table (a tensor or nested sequences); each row as :func:`check_spacing`."""
    if spacing is None:
        return [None] * batch
    if isinstance(spacing, Tensor):
        spacing = spacing.detach().cpu()
    if getattr(spacing, "ndim", None) == 2 and hasattr(spacing, "tolist"):  # tensor, NumPy
        table = spacing.tolist()
    elif isinstance(spacing, Sequence) and spacing and all(
        isinstance(r, Sequence) and not isinstance(r, (str, bytes)) for r in spacing
    ):
        table = list(spacing)
    else:
        return [check_spacing(spacing, ndim)] * batch
    if len(table) not in (1, batch):
        raise ValueError(
            f"spacing: expected {ndim} numbers or one row per batch element ({batch}), got "
            f"{len(table)} rows"
        )
    rows = [check_spacing(r, ndim) for r in table]
    return rows * batch if len(rows) == 1 else rows


def resolve_device(name: object) -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), or a device name / ``torch.device`` that exists
    here."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, (str, torch.device)):
        raise TypeError(f"device: expected a device name or torch.device, got {name!r}")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"device: expected auto, cpu, cuda or cuda:N, got {str(name)!r}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(name)!r} requested but CUDA is not available")
    return device


def check_weight_map(w: object, name: str, like: Tensor) -> Tensor:
    """A ``(B or 1, 1, *S)`` map of non-negative weights (bool or floating) on ``like``'s grid
    (``like``: ``(B, C, *S)``); returned in ``like``'s dtype."""
    w = check_tensor(w, name)
    shape = (like.shape[0], 1, *like.shape[2:])
    if w.dim() != like.dim() or w.shape[1] != 1 or w.shape[2:] != like.shape[2:] or (
        w.shape[0] not in (1, like.shape[0])
    ):
        raise ValueError(f"{name}: expected shape {shape} (or batch 1), got {tuple(w.shape)}")
    if not (w.dtype == torch.bool or w.is_floating_point()):
        raise TypeError(f"{name}: expected a bool or floating tensor, got {w.dtype}")
    check_same_device(w, like.device, name, "the image")
    w = w.to(like.dtype)
    check_finite(w, name)
    if bool((w < 0).any()):
        raise ValueError(f"{name}: expected weights >= 0, got a minimum of {float(w.min())}")
    return w


def one_line(message: object) -> str:
    """An error message (an exception or text) on one line, whitespace collapsed: for the
    one-line errors of the command-line tools and of wrapped library errors. An exception
    without a message gives its type's name."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        return type(message).__name__
    return text
