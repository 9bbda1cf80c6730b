"""One-call functions: ``register``, ``affine``, ``warp`` and ``warp_labels`` (validated).

``register`` also takes TorchIO images or a ``tio.Subject``, and ``warp`` / ``warp_labels``
TorchIO images, unpacked here by :mod:`nadmm_torch.io` (imported, with TorchIO, only then):
the core below (:class:`~nadmm_torch.module.NADMMRegistration`, ``ops``) sees tensors only.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._torchio import as_torchio_like, is_torchio, torchio_tensor
from .checks import (
    LOW_PRECISION,
    check_affine_matrix,
    check_affine_options,
    check_bool,
    check_choice,
    check_displacement,
    check_finite,
    check_nonempty,
    check_pyramid_size,
    check_spacing,
    check_tensor,
)
from .config import SolverConfig
from .module import NADMMRegistration, prepare_pair
from .ops import affine as _affine
from .ops import warp as _warp
from .ops.inverse import invert


def register(
    fixed: Tensor,
    moving: Tensor | None = None,
    *,
    spacing=None,
    preset: str | os.PathLike | SolverConfig = "fast",
    data_term: str | None = None,
    order: int | None = None,
    initial_displacement: Tensor | None = None,
    affine: bool | Mapping = False,
    return_diagnostics: bool = False,
    return_inverse: bool = False,
    compile: bool | str = False,
    mask: Tensor | None = None,
    **overrides,
):
    """Register ``moving`` to ``fixed``; returns the displacement ``(B, ndim, *S)`` (voxels).

    ``fixed``/``moving``: ``(B, C, *S)`` floating tensors on one device (2D or 3D), or TorchIO
    images / a ``tio.Subject`` with ``"fixed"`` and ``"moving"`` (spacing read from them).
    ``C > 1`` channels (the same in both: a multi-contrast pair) need ``data_term="l2"``,
    which sums over them. ``features="mind"`` (an override) registers MIND-SSC descriptors
    instead of intensities: for pairs whose intensities do not correspond (multi-modal).
    ``spacing``: ``ndim`` spacings in mm in the order of ``S`` (default 1).
    ``preset``: ``"fast"``, ``"balanced"``, ``"paper"``, ``"accurate"``, a settings file (from
    :meth:`nadmm_torch.tuning.TuneResult.save`; explicit settings win over its values) or a
    ready :class:`~nadmm_torch.config.SolverConfig`. ``data_term``: ``"l2"`` (default) or
    ``"l1"``; ``order``: regulariser order (default 2).
    ``affine``: ``True`` (or a dict of :func:`affine` settings, e.g. ``{"similarity": "mi"}``)
    aligns the pair affinely first and starts the deformable solver from that affine's
    displacement; the result is one displacement that includes it. Not with
    ``initial_displacement``.
    ``compile``: ``torch.compile`` the solver (see :class:`NADMMRegistration`).
    ``return_inverse``: also return the inverse ``e`` (``(Id + d) ∘ (Id + e) ≈ Id``): ``(d, e)``
    or ``(d, e, diagnostics)``; computed from the final ``d`` by :func:`nadmm_torch.invert`
    (damped fixed point to a largest residual ≤ 1e-3 voxel), not by composing inverses of the
    solver's steps. 10 ACDC pairs (``benchmarks/inverse.py``): ``|d ∘ e|`` 0.0003 voxel mean.
    ``mask``: ``(B or 1, 1, *S)`` fixed-image mask (bool) or weights of the data term: the
    images are compared only where it is non-zero; elsewhere the regulariser alone carries
    the field (see :func:`nadmm_torch.ops.solver.solve`).
    ``overrides``: any solver setting (``lam``, ``theta``, ``iterations``, ``warps``, ...).
    Runs without building an autograd graph unless an input requires grad.

    The returned field is fold-free (``det(I + ∇d) > 0``). A folding ``initial_displacement``
    is repaired before solving, with a warning (``diagnostics.initial_fold_percent`` holds its
    fold percentage), or refused with a ValueError where it folds at more than 50 % of the
    voxels (a mirror flip). A batch element with a constant fixed or moving image is not
    registered: it gets the initial displacement (or zero), with a warning naming it.
    """
    fixed, moving, spacing = _tensors(fixed, moving, spacing)
    if spacing is None and isinstance(fixed, Tensor) and fixed.dim() == 5:
        warnings.warn(
            "register: no spacing given for a 3D image: assuming 1 mm along every axis (the "
            "regulariser and the pyramid use it); pass spacing=(sz, sy, sx) in mm",
            UserWarning, stacklevel=2,
        )
    if affine is not False:
        initial_displacement = _affine_start(fixed, moving, spacing, affine, initial_displacement)
    model = NADMMRegistration(
        preset, data_term=data_term, order=order, compile=compile, **overrides
    )
    model = model.to(fixed.device) if isinstance(fixed, Tensor) else model
    needs_grad = any(
        isinstance(x, Tensor) and x.requires_grad for x in (fixed, moving, initial_displacement)
    )
    return_inverse = check_bool(return_inverse, "return_inverse")
    with torch.set_grad_enabled(needs_grad and torch.is_grad_enabled()):
        out = model(
            fixed,
            moving,
            spacing=spacing,
            initial_displacement=initial_displacement,
            return_diagnostics=return_diagnostics,
            mask=mask,
        )
        if not return_inverse:
            return out
        d, diag = out if return_diagnostics else (out, None)
        inverse = invert(d)
    return (d, inverse, diag) if return_diagnostics else (d, inverse)


def _tensors(fixed, moving, spacing):
    """TorchIO images / a ``tio.Subject`` as tensors and spacing (read from the fixed image
    unless given); tensors pass unchanged."""
    if isinstance(fixed, Tensor) and isinstance(moving, Tensor):
        return fixed, moving, spacing
    from .io import unpack_torchio_pair  # TorchIO (and SimpleITK) only when asked for

    fixed, moving, spacing, _ = unpack_torchio_pair(fixed, moving, spacing)
    return fixed, moving, spacing


def _affine_start(fixed, moving, spacing, affine_opts, initial_displacement) -> Tensor:
    """``register(affine=...)``: the displacement of the pair's affine alignment."""
    if not (affine_opts is True or isinstance(affine_opts, Mapping)):
        raise TypeError(
            f"affine: expected True, False or a dict of affine settings, got {affine_opts!r}"
        )
    if initial_displacement is not None:
        raise ValueError("affine: give either affine=... or initial_displacement, not both")
    opts = {} if affine_opts is True else dict(affine_opts)
    if "spacing" in opts:
        raise ValueError("affine: pass spacing to register itself, not in the affine settings")
    if isinstance(fixed, Tensor) and fixed.dim() > 1 and fixed.shape[1] > 1:
        raise ValueError(
            f"affine: the affine stage takes single-channel images, got C = {fixed.shape[1]}; "
            "align one channel with nadmm_torch.affine and pass its displacement as "
            "initial_displacement"
        )
    A = affine(fixed, moving, spacing=spacing, **opts)
    return _affine.affine_to_displacement(A, fixed.shape[2:])


def affine(
    fixed: Tensor,
    moving: Tensor,
    *,
    spacing=None,
    similarity: str = "ncc",
    levels: int = 3,
    iterations: int | Sequence[int] | None = None,
    max_step: float = 0.05,
    init: str = "com",
) -> Tensor:
    """Affine registration of ``moving`` to ``fixed``: the matrix ``A`` ``(B, ndim, ndim + 1)``.

    Coordinates: ``A`` maps a fixed-grid voxel index ``x`` (array order of ``S``, e.g.
    ``(z, y, x)``) to the moving-grid voxel index ``A[:, :, :ndim] @ x + A[:, :, ndim]``,
    a pull-back: ``warp(moving, affine_to_displacement(A, S))`` is the aligned moving image.
    :func:`nadmm_torch.io.affine_to_itk` turns it into an ITK transform (physical mm).

    ``fixed``/``moving``: ``(B, 1, *S)`` floating tensors on one device (2D or 3D), batched
    (each element registered on its own). ``spacing``: ``ndim`` spacings in mm in the order of
    ``S`` (default 1): the optimiser works in physical, centred coordinates.
    ``similarity``: ``"ncc"`` (global normalised cross-correlation, for images of one contrast)
    or ``"mi"`` (mutual information, 32-bin Parzen histogram, for intensities that differ).
    Intensities are scaled robustly per image (0.5 / 99.5 percentiles), so raw scanner values
    and hot voxels are fine. The pyramid optimiser
    (:func:`nadmm_torch.ops.affine.affine_register`) is tuned by ``levels``, ``iterations``
    (most BFGS steps per level, coarse → fine; default 50, …, 50, 30, 20), ``max_step``
    (largest parameter change per step relative to the image half-extent: 0.05 is 5 %, or
    about 3°) and ``init`` (``"com"``: start from the translation aligning the intensity
    centroids; ``"identity"``).

    Differentiable: if an image requires grad, ``A`` carries the gradient of the optimum
    (implicit function theorem); otherwise no graph is built.
    """
    fixed, moving = prepare_pair(fixed, moving)
    ndim = fixed.dim() - 2
    spacing = check_spacing(spacing, ndim)
    check_pyramid_size(fixed.shape[2:])
    levels, its, max_step = check_affine_options(
        similarity, levels, iterations, max_step, init, _affine.SIMILARITIES
    )
    return _affine.affine_register(
        fixed, moving, spacing, similarity=similarity, levels=levels, iterations=its,
        max_step=max_step, init=init,
    )


def affine_to_displacement(A: Tensor, shape: Sequence[int]) -> Tensor:
    """The displacement ``(B, ndim, *shape)`` (voxels, pull-back) of an affine ``A``
    ``(B, ndim, ndim + 1)`` from :func:`affine`: ``d(x) = A[:, :, :ndim] x + A[:, :, ndim] − x``.
    """
    if isinstance(shape, Tensor) or not isinstance(shape, Sequence) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape
    ) or len(shape) not in (2, 3):
        raise ValueError(f"shape: expected 2 or 3 positive integers, got {shape!r}")
    A = check_affine_matrix(A, "A", len(shape))
    return _affine.affine_to_displacement(A, tuple(shape))


def warp(image, displacement: Tensor, mode: str = "bilinear"):
    """Pull-back warp ``image(x + d(x))`` with border padding.

    ``image``: ``(B, C, *S)`` (integer label maps allowed with ``mode="nearest"``), or a TorchIO
    image (``tio.ScalarImage``, or a ``tio.LabelMap`` with ``mode="nearest"``) on the grid of
    the displacement; ``displacement``: ``(B, ndim, *S)`` voxel units (batch 1 for a TorchIO
    image, array order as :func:`register` returns it). ``mode``: ``"bilinear"`` or
    ``"nearest"``.

    Returns ``(B, C, *S)`` of the image's dtype (float16/bfloat16 images are sampled in float32);
    for a TorchIO image, a TorchIO image of the same class with its affine (data on the CPU,
    float32 / int64), ready to save or to put back into a ``tio.Subject``.
    Any number of channels ``C``; images and displacements must be finite.
    """
    source = image if is_torchio(image) else None
    if source is not None:
        image = torchio_tensor(image, "image", like=displacement)
    out = _warp_tensor(image, displacement, mode)
    return out if source is None else as_torchio_like(out, source)


def _warp_tensor(image: Tensor, displacement: Tensor, mode: str) -> Tensor:
    """:func:`warp` of a tensor."""
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


def warp_labels(labels, displacement: Tensor):
    """Warp an integer label map: argmax of the linearly warped one-hot encoding.

    Smoother than nearest-neighbour warping (each voxel takes the label with the largest
    interpolated share). Only the labels present are encoded, a few at a time, so large ids
    (FreeSurfer-style, e.g. 60000) cost no more memory than small ones. This is the warp of
    ``nadmm-register``'s ``warped_labels.nii.gz``, so Python and the CLI give the same labels.

    ``labels``: ``(B, 1, *S)`` integer (or bool) label map, or a ``tio.LabelMap`` on the grid of
    the displacement; ``displacement``: ``(B, ndim, *S)`` voxel units, finite (batch 1 for a
    ``tio.LabelMap``). Returns ``(B, 1, *S)`` of the labels' dtype; for a ``tio.LabelMap``, a
    ``tio.LabelMap`` with its affine (int64 data on the CPU).
    """
    source = labels if is_torchio(labels) else None
    if source is not None:
        labels = torchio_tensor(labels, "labels", like=displacement, label=True)
    out = _warp_labels_tensor(labels, displacement)
    return out if source is None else as_torchio_like(out, source)


def _warp_labels_tensor(labels: Tensor, displacement: Tensor) -> Tensor:
    """:func:`warp_labels` of a tensor."""
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

