"""Training losses as small ``nn.Module`` objects (2D and 3D).

Conventions (as in the rest of the package): images ``(B, C, *S)``, ``S`` 2D ``(H, W)`` or 3D
``(D, H, W)``; integer label maps ``(B, 1, *S)``; displacements ``(B, ndim, *S)`` in voxel
units, component ``i`` along spatial axis ``i``, pull-back (``moving(x + d(x))`` matches
``fixed(x)``). Every loss returns a 0-d tensor (mean over the batch) and is minimal (0) at a
perfect match / zero deformation:

* :class:`MSELoss`, :class:`NCCLoss` (``1 − mean local NCC²``): image similarity;
* :class:`DiceLoss` (``1 − mean soft Dice``): label supervision with warped one-hot labels
  (:func:`warp_onehot`);
* :class:`SmoothnessLoss`: squared forward differences of the displacement, spacing-aware;
* :class:`JacobianFoldLoss`: penalty on ``det(I + ∇d)`` below a margin (folding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import (
    check_displacement_layout,
    check_grid,
    check_image_layout,
    check_label_map,
    check_same_shape,
    check_spacing_rows,
)

# The unchecked operators: a loss runs at every training step and checks its inputs' structure
# itself; the public, value-checking forms (nadmm_torch.warp, metrics.jacobian_determinant)
# would synchronise with the device each time.
from .ops.diff import jacobian_determinant
from .ops.warp import warp

__all__ = [
    "MSELoss",
    "NCCLoss",
    "DiceLoss",
    "SmoothnessLoss",
    "JacobianFoldLoss",
    "local_ncc",
    "warp_onehot",
    "one_hot",
]

SpacingLike = Sequence[float] | Tensor | None


# -- checks ------------------------------------------------------------------------------------
# Structure only (no value is read): the losses run at every training step, where a check that
# synchronises with the device would cost more than the loss.


def _spacing(spacing: SpacingLike, batch: int, ndim: int, like: Tensor) -> Tensor | None:
    """``None`` or a ``(B, ndim)`` spacing tensor from ``ndim`` numbers or ``(B, ndim)``."""
    rows = check_spacing_rows(spacing, batch, ndim)
    if rows[0] is None:
        return None
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


# -- similarity ----------------------------------------------------------------------------------
class MSELoss(nn.Module):
    """Mean squared intensity difference ``mean((warped − fixed)²)``.

    Shapes: ``forward(warped (B, C, *S), fixed (B, C, *S))`` → 0-d.
    """

    def forward(self, warped: Tensor, fixed: Tensor) -> Tensor:
        check_image_layout(warped, "warped")
        check_image_layout(fixed, "fixed")
        check_same_shape(fixed, warped, "fixed", "warped")
        return (warped - fixed).pow(2).mean()


def _window(window: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    w = (int(window),) * ndim if isinstance(window, int) else tuple(int(v) for v in window)
    if len(w) != ndim or any(v < 1 or v % 2 == 0 for v in w):
        raise ValueError(f"window: expected {ndim} odd positive sizes (or one int), got {window!r}")
    return w


def local_ncc(a: Tensor, b: Tensor, window: int | Sequence[int] = 9, eps: float = 1e-5) -> Tensor:
    """Squared local normalised cross-correlation map (VoxelMorph's ``NCC``).

    Local means are box averages over ``window`` voxels (centred, borders use only the voxels
    inside the image); ``cc = cov(a, b)² / (var(a) var(b) + eps)`` per voxel and channel.

    Args:
        a, b: ``(B, C, *S)``, ``S`` 2D or 3D.
        window: odd box size, one int or one per spatial axis (e.g. ``(3, 9, 9)`` for
            thick-slice 3D stacks); cut to the largest odd size that fits an axis shorter
            than it.
        eps: stabiliser of the denominator (flat regions give ``cc ≈ 0``, not NaN).

    Returns:
        ``(B, C, *S)`` in ``[0, 1]`` (up to ``eps``); 1 where ``a`` and ``b`` agree up to an
        affine intensity change and are not locally flat.
    """
    check_image_layout(a, "a")
    check_image_layout(b, "b")
    check_same_shape(a, b, "a", "b")
    ndim = a.dim() - 2
    # An axis shorter than the window (a cardiac stack of 8 slices, window 9) gets the largest
    # odd window that fits it: the pooling refuses a kernel larger than its input.
    w = tuple(min(v, n - 1 + n % 2) for v, n in zip(_window(window, ndim), a.shape[2:]))
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    pad = tuple(v // 2 for v in w)

    def mean(x: Tensor) -> Tensor:
        # count_include_pad=False: border windows average only the voxels that exist.
        return pool(x, w, stride=1, padding=pad, count_include_pad=False)

    ma, mb = mean(a), mean(b)
    var_a = (mean(a * a) - ma * ma).clamp_min(0)
    var_b = (mean(b * b) - mb * mb).clamp_min(0)
    cov = mean(a * b) - ma * mb
    return cov * cov / (var_a * var_b + eps)


class NCCLoss(nn.Module):
    """``1 − mean(local NCC²)`` (see :func:`local_ncc`); 0 for identical, non-flat images.

    Args:
        window: odd box size, int or one per spatial axis (default 9, as VoxelMorph).
        eps: denominator stabiliser.

    Shapes: ``forward(warped (B, C, *S), fixed (B, C, *S))`` → 0-d.
    """

    def __init__(self, window: int | Sequence[int] = 9, eps: float = 1e-5) -> None:
        super().__init__()
        self.window = window
        self.eps = eps

    def forward(self, warped: Tensor, fixed: Tensor) -> Tensor:
        return 1.0 - local_ncc(warped, fixed, self.window, self.eps).mean()

    def extra_repr(self) -> str:
        return f"window={self.window}, eps={self.eps}"


# -- labels ------------------------------------------------------------------------------------
def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(B, 1, *S)`` integer labels → ``(B, num_classes, *S)`` one-hot of ``dtype``."""
    check_grid(labels, "labels")
    check_label_map(labels, "labels")
    if labels.shape[1] != 1:
        raise ValueError(f"labels: expected a (B, 1, *S) map, got shape {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"labels: values must lie in [0, {num_classes}), got [{int(labels.min())}, "
            f"{int(labels.max())}]"
        )
    return F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).to(dtype)


def warp_onehot(labels: Tensor, displacement: Tensor, num_classes: int) -> Tensor:
    """Soft warped labels: linear pull-back warp of the one-hot encoding.

    Args:
        labels: ``(B, 1, *S)`` integer moving labels.
        displacement: ``(B, ndim, *S)`` voxel units (gradients flow into it).
        num_classes: number of classes including background.

    Returns:
        ``(B, num_classes, *S)``, non-negative, summing to 1 over classes (linear weights).
    """
    d = check_displacement_layout(displacement)
    return warp(one_hot(labels, num_classes, d.dtype), d, mode="bilinear")


class DiceLoss(nn.Module):
    """``1 − mean soft Dice`` over the chosen classes and the batch.

    ``Dice_c = (2 Σ p_c t_c + smooth) / (Σ p_c + Σ t_c + smooth)``: 1 where both masks are
    empty, so an absent class neither helps nor hurts.

    Args:
        num_classes: classes including background (0).
        include_background: also score class 0.
        smooth: additive smoothing of numerator and denominator.

    Shapes: ``forward(pred, target)`` with ``pred`` ``(B, num_classes, *S)`` soft
    probabilities (e.g. :func:`warp_onehot`) or an integer ``(B, 1, *S)`` map, and ``target``
    an integer ``(B, 1, *S)`` map or a ``(B, num_classes, *S)`` one-hot → 0-d.
    """

    def __init__(
        self, num_classes: int, include_background: bool = False, smooth: float = 1e-5
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes: expected >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.include_background = include_background
        self.smooth = smooth

    def _probs(self, x: Tensor, name: str) -> Tensor:
        check_grid(x, name)
        if not x.is_floating_point():
            return one_hot(x, self.num_classes)
        if x.shape[1] != self.num_classes:
            raise ValueError(
                f"{name}: expected {self.num_classes} channels (one per class), got shape "
                f"{tuple(x.shape)}"
            )
        return x

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        p = self._probs(pred, "pred")
        t = self._probs(target, "target").to(p.dtype)
        check_same_shape(p, t, "pred", "target")
        if not self.include_background:
            p, t = p[:, 1:], t[:, 1:]
        dims = tuple(range(2, p.dim()))
        inter = (p * t).sum(dims)
        total = p.sum(dims) + t.sum(dims)
        d = (2 * inter + self.smooth) / (total + self.smooth)
        return 1.0 - d.mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, include_background={self.include_background}"


# -- regularity ----------------------------------------------------------------------------------
class SmoothnessLoss(nn.Module):
    """Mean squared forward difference of the displacement (diffusion regulariser).

    Without spacing: ``mean_i,j (∂_j d_i)²`` in voxel units. With spacing ``h`` (mm): the
    physical displacement is ``h_i d_i`` and its derivative along axis ``j`` is
    ``h_i ∂_j d_i / h_j``, so anisotropic grids are penalised as the physical field would be.

    Shapes: ``forward(displacement (B, ndim, *S), spacing=None | ndim numbers | (B, ndim))``
    → 0-d. Axes of size 1 contribute nothing.
    """

    def forward(self, displacement: Tensor, spacing: SpacingLike = None) -> Tensor:
        d = check_displacement_layout(displacement)
        b, ndim = d.shape[:2]
        h = _spacing(spacing, b, ndim, d)
        total = d.new_zeros(())
        for j in range(ndim):
            n = d.shape[2 + j]
            if n < 2:
                continue
            g = d.narrow(2 + j, 1, n - 1) - d.narrow(2 + j, 0, n - 1)  # (B, ndim, ...)
            if h is not None:
                g = g * (h / h[:, j : j + 1]).view(b, ndim, *([1] * ndim))
            total = total + g.pow(2).mean()
        return total / ndim


class JacobianFoldLoss(nn.Module):
    """``mean(relu(margin − det(I + ∇d)))``: zero unless the Jacobian determinant falls under
    ``margin`` (default 0: only folds are penalised; a small positive margin keeps away from
    them). Central differences in voxel units (:func:`nadmm_torch.metrics.jacobian_determinant`).

    Shapes: ``forward(displacement (B, ndim, *S))`` → 0-d.
    """

    def __init__(self, margin: float = 0.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, displacement: Tensor) -> Tensor:
        d = check_displacement_layout(displacement)
        return F.relu(self.margin - jacobian_determinant(d)).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
