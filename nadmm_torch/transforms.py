"""Applying saved transforms: a displacement, an affine, or both, to images and label maps.

Two ways in:

* :func:`apply` — tensors on the transform's grid (the fixed grid), in this package's
  conventions: images ``(B, C, *S)``, displacements ``(B, ndim, *S)`` in voxel units
  (pull-back), affines ``(B, ndim, ndim + 1)`` mapping fixed array indices to moving array
  indices, as :func:`nadmm_torch.affine` returns them.
* :func:`apply_file` — files, as ``nadmm-apply`` does: ``displacement.nii.gz`` (an ITK
  displacement field, read with :func:`nadmm_torch.io.read_displacement`) and/or ``affine.tfm``
  (an ITK affine, read with :func:`nadmm_torch.io.itk_to_affine`), an image or label map on any
  grid (resampled into the reference grid through physical space first, as ``nadmm-register``
  does), the result written atomically and verified.

What each combination means (``φ`` is the map whose pull-back is applied,
``out(x) = moving(φ(x))``):

* displacement ``d`` alone: ``φ(x) = x + d(x)``. The ``displacement.nii.gz`` of
  ``nadmm-register`` is its whole result: with ``--affine`` it already contains the affine
  stage (the solver starts from the affine's displacement), so it is applied alone;
* affine ``A`` alone: ``φ(x) = A x`` — the affine stage by itself (``affine.tfm``), or any
  affine (an ANTs ``.mat``);
* both: ``φ(x) = A (x + d(x))`` — ``d`` first, then ``A``: for a displacement estimated
  *after* the moving image was moved by ``A`` (``moving ∘ A`` registered by ``d``). It equals
  ``antsApplyTransforms -t d -t A`` and ``sitk.CompositeTransform([A, d])``. Never pair a
  ``displacement.nii.gz`` with the ``affine.tfm`` of the same ``nadmm-register`` run: the
  affine would be applied twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from .api import warp, warp_labels
from .ops.warp import identity_grid

__all__ = ["apply", "total_displacement", "apply_file"]


def _check_affine(affine: object, ndim: int) -> Tensor:
    if not isinstance(affine, Tensor):
        raise TypeError(f"affine: expected a torch.Tensor, got {type(affine).__name__}")
    if affine.dim() != 3 or tuple(affine.shape[1:]) != (ndim, ndim + 1):
        raise ValueError(
            f"affine: expected a (B, {ndim}, {ndim + 1}) matrix for a {ndim}D image, got shape "
            f"{tuple(affine.shape)}"
        )
    if not affine.is_floating_point():
        raise TypeError(f"affine: expected a floating dtype, got {affine.dtype}")
    if not bool(torch.isfinite(affine).all()):
        raise ValueError("affine: expected finite values, got NaN or Inf")
    return affine


def total_displacement(
    shape: tuple[int, ...], displacement: Tensor | None = None, affine: Tensor | None = None
) -> Tensor:
    """The one displacement that :func:`apply` warps with (see the module docstring).

    Args:
        shape: the spatial grid ``S`` (2 or 3 axes).
        displacement: ``d``, ``(B, ndim, *S)`` voxel units, or ``None``.
        affine: ``A``, ``(B, ndim, ndim + 1)`` voxel convention of :func:`nadmm_torch.affine`,
            or ``None``. At least one of the two.

    Returns:
        ``(B, ndim, *S)``: ``d``; ``A x − x``; or ``A (x + d(x)) − x`` (computed in closed
        form, exact also where ``x + d(x)`` leaves the grid).
    """
    ndim = len(shape)
    if displacement is None and affine is None:
        raise ValueError("apply: expected a displacement, an affine or both, got neither")
    if affine is None:
        return displacement
    if displacement is not None:
        if not isinstance(displacement, Tensor):
            raise TypeError(
                f"displacement: expected a torch.Tensor, got {type(displacement).__name__}"
            )
        if displacement.dim() != ndim + 2 or tuple(displacement.shape[1:]) != (ndim, *shape):
            raise ValueError(
                f"displacement: expected (B, {ndim}, {', '.join(map(str, shape))}), got shape "
                f"{tuple(displacement.shape)}"
            )
    dtype = affine.dtype if displacement is None else torch.promote_types(
        displacement.dtype, affine.dtype
    )
    device = affine.device if displacement is None else displacement.device
    x = identity_grid(shape, dtype, device).unsqueeze(0)  # (1, n, *S)
    y = x if displacement is None else x + displacement.to(dtype)  # (B or 1, n, *S)
    A = affine.to(device, dtype)
    batch = max(A.shape[0], y.shape[0])
    A, y = A.expand(batch, *A.shape[1:]), y.expand(batch, *y.shape[1:])
    mapped = torch.einsum("bij,bj...->bi...", A[:, :, :ndim], y)
    return mapped + A[:, :, ndim].view(batch, ndim, *([1] * ndim)) - x


def apply(
    image: Tensor,
    displacement: Tensor | None = None,
    *,
    affine: Tensor | None = None,
    labels: bool = False,
    mode: str = "bilinear",
) -> Tensor:
    """Warp an image or a label map on the fixed grid by a saved transform.

    Args:
        image: ``(B, C, *S)`` intensities, or with ``labels=True`` an integer label map
            ``(B, 1, *S)``; on the grid of the displacement (for a moving image on another
            grid, resample it first: :func:`nadmm_torch.io.resample_to`, or use
            :func:`apply_file`).
        displacement: ``d``, ``(B, ndim, *S)`` or ``(1, ndim, *S)`` (one transform for the
            whole batch), voxel units, pull-back.
        affine: ``A``, ``(B, ndim, ndim + 1)`` or ``(1, ndim, ndim + 1)``, fixed array index →
            moving array index (:func:`nadmm_torch.affine`; :func:`nadmm_torch.io.itk_to_affine`
            reads ``affine.tfm``). With ``d``: ``d`` first, then ``A`` (module docstring).
        labels: warp as labels (argmax of the warped one-hot, :func:`nadmm_torch.warp_labels`,
            as ``nadmm-register`` does).
        mode: for intensities, ``"bilinear"`` or ``"nearest"``.

    Returns:
        ``(B, C, *S)``: ``image(φ(x))`` with border padding; the image's dtype (labels: theirs).
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"image: expected a torch.Tensor, got {type(image).__name__}")
    if image.dim() not in (4, 5):
        raise ValueError(
            f"image: expected a (B, C, H, W) or (B, C, D, H, W) tensor, got shape "
            f"{tuple(image.shape)}"
        )
    shape, batch = tuple(image.shape[2:]), image.shape[0]
    if affine is not None:
        affine = _check_affine(affine, len(shape))
    total = total_displacement(shape, displacement, affine)
    if isinstance(total, Tensor) and total.dim() == image.dim() and total.shape[0] == 1 < batch:
        total = total.expand(batch, *total.shape[1:])
    if labels:
        return warp_labels(image, total)
    return warp(image, total, mode=mode)


@contextmanager
def _role(kind: str) -> Iterator[None]:
    """Prefix the message of a read error with the file's role (``transform: no such …``)."""
    try:
        yield
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise type(exc)(f"{kind}: {exc}") from None


def _dimension_check(kind: str, geometry: Any, target: Any) -> None:
    if geometry.ndim != target.ndim:
        raise ValueError(
            f"{kind}: a {geometry.ndim}D image for a {target.ndim}D reference grid"
        )


def apply_file(
    moving: str | os.PathLike,
    output: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    transform: str | os.PathLike | None = None,
    affine: str | os.PathLike | None = None,
    labels: bool = False,
) -> dict[str, Any]:
    """``nadmm-apply`` as a function: warp an image file into the reference grid.

    Args:
        moving: image (or label map, with ``labels``) on any grid SimpleITK reads.
        output: the file to write (format from the extension), atomically and verified; the
            folder must exist.
        reference: the fixed image (its grid is the output's).
        transform: ITK displacement field (``displacement.nii.gz``/``.mha``), expressed on the
            reference grid (:func:`nadmm_torch.io.read_displacement`).
        affine: ITK affine transform file (``affine.tfm``, ANTs ``.mat``). At least one of
            ``transform`` and ``affine``; see the module docstring for what both mean.
        labels: the input is a label map (nearest-neighbour resampling between grids, argmax
            of the warped one-hot).

    The input is first resampled into the reference grid through physical space (linear, or
    nearest neighbour for labels) when its grid differs, then warped — the steps of
    ``nadmm-register``, so its ``displacement.nii.gz`` applied to its own inputs gives back its
    ``warped.nii.gz`` / ``warped_labels.nii.gz``.

    Returns:
        a dict: ``output`` (path), ``resampled`` (whether the input was resampled first),
        ``geometry`` (the reference grid, :meth:`Geometry.to_dict`).

    Raises:
        FileNotFoundError, ValueError (naming the file), OSError (the write failed; nothing
        is left under ``output``).
    """
    from . import io

    if transform is None and affine is None:
        raise ValueError("apply_file: expected a transform, an affine or both, got neither")
    with _role("reference"):
        target = io.Geometry.from_sitk(io._read_sitk(reference))
    d = A = None
    if transform is not None:
        with _role("transform"):
            d, target = io.read_displacement(transform, reference=target)
    if affine is not None:
        with _role("affine"):
            A = io.itk_to_affine(affine, target)
    with _role("labels" if labels else "input"):
        image, geometry = (io.read_labels if labels else io.read_image)(moving)
    _dimension_check(f"'{moving}'", geometry, target)
    resampled = not geometry.matches(target)
    if resampled:
        image = io.resample_to(image, target, geometry=geometry, label=labels)
    out = apply(image, d, affine=A, labels=labels)
    io.write_image(out, target, output)
    return {"output": str(output), "resampled": resampled, "geometry": target.to_dict()}
