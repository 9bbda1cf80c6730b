"""One-call functions: ``register``, ``warp`` and ``warp_labels`` (validated; for tensors)."""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import (
    LOW_PRECISION,
    check_choice,
    check_displacement,
    check_finite,
    check_nonempty,
    check_tensor,
)
from .module import NADMMRegistration
from .ops import warp as _warp


def register(
    fixed: Tensor,
    moving: Tensor | None = None,
    *,
    spacing=None,
    preset: str = "fast",
    data_term: str = "l2",
    order: int = 2,
    initial_displacement: Tensor | None = None,
    return_diagnostics: bool = False,
    compile: bool | str = False,
    **overrides,
):
    """Register ``moving`` to ``fixed``; returns the displacement ``(B, ndim, *S)`` (voxels).

    ``fixed``/``moving``: ``(B, 1, *S)`` floating tensors on one device (2D or 3D), or TorchIO
    images / a ``tio.Subject`` with ``"fixed"`` and ``"moving"`` (spacing read from them).
    ``spacing``: ``ndim`` spacings in mm in the order of ``S`` (default 1).
    ``compile``: ``torch.compile`` the solver (see :class:`NADMMRegistration`).
    ``overrides``: any solver setting (``lam``, ``theta``, ``iterations``, ``warps``, ...).
    Runs without building an autograd graph unless an input requires grad.

    The returned field is fold-free (``det(I + ∇d) > 0``). A folding ``initial_displacement``
    is repaired before solving, with a warning (``diagnostics.initial_fold_percent`` holds its
    fold percentage), or refused with a ValueError where it folds at more than 50 % of the
    voxels (a mirror flip). A batch element with a constant fixed or moving image is not
    registered: it gets the initial displacement (or zero), with a warning naming it.
    """
    model = NADMMRegistration(
        preset, data_term=data_term, order=order, compile=compile, **overrides
    )
    model = model.to(fixed.device) if isinstance(fixed, Tensor) else model
    needs_grad = any(
        isinstance(x, Tensor) and x.requires_grad for x in (fixed, moving, initial_displacement)
    )
    with torch.set_grad_enabled(needs_grad and torch.is_grad_enabled()):
        return model(
            fixed,
            moving,
            spacing=spacing,
            initial_displacement=initial_displacement,
            return_diagnostics=return_diagnostics,
        )


def warp(image: Tensor, displacement: Tensor, mode: str = "bilinear") -> Tensor:
    """Pull-back warp ``image(x + d(x))`` with border padding.

    ``image``: ``(B, C, *S)`` (integer label maps allowed with ``mode="nearest"``);
    ``displacement``: ``(B, ndim, *S)`` voxel units. ``mode``: ``"bilinear"`` or ``"nearest"``.
    Returns ``(B, C, *S)`` of the image's dtype (float16/bfloat16 images are sampled in float32).
    Any number of channels ``C``; images and displacements must be finite.
    """
    image = check_tensor(image, "image")
    check_choice(mode, "mode", ("bilinear", "nearest"))
    if image.dim() not in (4, 5):
        raise ValueError(
            f"image: expected a (B, C, H, W) or (B, C, D, H, W) tensor, got shape "
            f"{tuple(image.shape)}"
        )
    check_nonempty(image, "image")
    displacement = check_displacement(displacement, "displacement", like=image)
    if image.is_complex():
        raise TypeError(f"image: expected a real dtype, got {image.dtype}")
    if not image.is_floating_point():
        if mode != "nearest":
            raise TypeError(f"image: integer images (dtype {image.dtype}) need mode='nearest'")
        return _warp.warp(image.to(displacement.dtype), displacement, "nearest").to(image.dtype)
    check_finite(image, "image")
    if image.dtype in LOW_PRECISION:
        # Sampling coordinates in half precision are off by up to ~0.1 voxel at 128 voxels:
        # compute in float32 (the policy of register) and return the image's dtype.
        return _warp.warp(image.float(), displacement.float(), mode).to(image.dtype)
    return _warp.warp(image, displacement.to(image.dtype), mode)


def warp_labels(labels: Tensor, displacement: Tensor) -> Tensor:
    """Warp an integer label map: argmax of the linearly warped one-hot encoding.

    Smoother than nearest-neighbour warping (each voxel takes the label with the largest
    interpolated share). Only the labels present are encoded, a few at a time, so large ids
    (FreeSurfer-style, e.g. 60000) cost no more memory than small ones.

    ``labels``: ``(B, 1, *S)`` integer (or bool) label map; ``displacement``: ``(B, ndim, *S)``
    voxel units, finite. Returns ``(B, 1, *S)`` of the labels' dtype.
    """
    labels = check_tensor(labels, "labels")
    if labels.dim() not in (4, 5) or labels.shape[1] != 1:
        raise ValueError(
            f"labels: expected a (B, 1, H, W) or (B, 1, D, H, W) label map, got shape "
            f"{tuple(labels.shape)}"
        )
    check_nonempty(labels, "labels")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"labels: expected an integer label map, got dtype {labels.dtype}; convert with "
            ".long() (or use nadmm_torch.warp for intensities)"
        )
    displacement = check_displacement(displacement, "displacement", like=labels)
    if displacement.dtype in LOW_PRECISION:
        displacement = displacement.float()
    return _warp.warp_labels(labels, displacement)
