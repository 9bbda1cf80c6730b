"""Figures for registration results (matplotlib, Agg; no pyplot state is touched).

Every function takes tensors or arrays in this package's conventions — images ``(B, C, *S)``
or ``(*S)``, displacements ``(B, ndim, *S)`` or ``(ndim, *S)`` in voxel units, array order —
and shows 2D images as they are and 3D volumes one slice along the first (slice) axis, with the
in-plane displacement components. The building blocks draw onto a given ``Axes``;
:func:`plot_registration` assembles one PNG panel, with a legend of the label contours (one
colour per label value, the same in every panel; solid for the fixed labels, dashed for the
moving / warped ones) and, for a volume, which slice is shown and why.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm, hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = [
    "choose_slice",
    "take_slice",
    "checkerboard",
    "overlay_rgb",
    "displacement_rgb",
    "plot_image",
    "plot_checkerboard",
    "plot_overlay",
    "plot_grid",
    "plot_jacobian",
    "plot_displacement",
    "plot_contours",
    "label_colour",
    "plot_registration",
    "save_figure",
]

_LABEL_COLOURS = ("#ff4040", "#40ff40", "#4090ff", "#ffd040", "#ff40ff", "#40ffff")


def _array(x, ndim: int | None = None) -> np.ndarray:
    """Tensor/array → float or int numpy array with leading singleton (batch/channel) dims dropped.

    With ``ndim`` (spatial dims), drops leading size-1 axes down to ``ndim`` (scalar) or
    ``ndim + 1`` dims (vector field).
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if ndim is None:
        while a.ndim > 2 and a.shape[0] == 1:
            a = a[0]
        return a
    while a.ndim > ndim and a.shape[0] == 1 and not (a.ndim == ndim + 1 and a.shape[0] == ndim):
        a = a[0]
    return a


def _spatial_ndim(displacement) -> int:
    d = _array(displacement)
    # (ndim, *S) after squeezing: ndim == number of spatial axes.
    if d.ndim >= 3 and d.shape[0] == d.ndim - 1:
        return d.ndim - 1
    raise ValueError(f"displacement: expected (1, ndim, *S) or (ndim, *S), got shape {d.shape}")


def label_colour(value: int) -> str:
    """The contour colour of label ``value``: fixed by the value (1 red, 2 green, 3 blue, …,
    cycling after six), so a label has one colour in every map, slice and figure."""
    return _LABEL_COLOURS[(int(value) - 1) % len(_LABEL_COLOURS)]


def choose_slice(volume, labels=None) -> int:
    """Slice index (along axis 0 of a 3D volume) to show.

    The slice with the most foreground (``labels > 0``) where labels are given, else the
    middle slice. ``volume``/``labels``: ``(..., D, H, W)``.
    """
    v = _array(volume if labels is None else labels)
    if v.ndim < 3:
        return 0
    v = v.reshape(-1, *v.shape[-3:])[0]
    if labels is not None:
        counts = (v > 0).reshape(v.shape[0], -1).sum(1)
        if counts.max() > 0:
            return int(np.argmax(counts))
    return v.shape[0] // 2


def take_slice(x, index: int | None, ndim: int) -> np.ndarray:
    """2D slice of a scalar image (``ndim`` spatial dims): 2D returns as is; 3D slice ``index``."""
    a = _array(x, ndim)
    if a.ndim != ndim:
        raise ValueError(f"expected a scalar {ndim}D image, got shape {a.shape}")
    return a if ndim == 2 else a[index]


def _field_slice(displacement, index: int | None) -> np.ndarray:
    """In-plane components ``(2, H, W)`` (row, column) of a displacement's slice."""
    ndim = _spatial_ndim(displacement)
    d = _array(displacement, ndim)
    if ndim == 2:
        return d
    return d[1:, index]


def _window(*images: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([np.asarray(i, dtype=np.float64).ravel() for i in images])
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _scaled(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return np.clip((np.asarray(image, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def checkerboard(a, b, tiles: int = 8) -> np.ndarray:
    """Alternate square tiles of two 2D images (``tiles`` across the larger side)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"checkerboard: shapes differ {a.shape} vs {b.shape}")
    h, w = a.shape
    size = max(1, int(np.ceil(max(h, w) / tiles)))
    rows = (np.arange(h) // size)[:, None]
    cols = (np.arange(w) // size)[None, :]
    return np.where((rows + cols) % 2 == 0, a, b)


def overlay_rgb(a, b) -> np.ndarray:
    """Magenta/green composite of two 2D images scaled to [0, 1]: grey where they agree."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.stack([a, b, a], axis=-1).clip(0, 1)


def displacement_rgb(field2d, max_magnitude: float | None = None) -> np.ndarray:
    """HSV coding of a 2D vector field ``(2, H, W)`` (row, column components), as RGB.

    Hue = direction (angle in the image plane), saturation = magnitude / ``max_magnitude``
    (default: the field's maximum), value = 1: white where there is no motion.
    """
    f = np.asarray(field2d, dtype=np.float64)
    dy, dx = f[0], f[1]
    mag = np.hypot(dx, dy)
    top = float(mag.max()) if max_magnitude is None else float(max_magnitude)
    hue = (np.arctan2(-dy, dx) / (2 * np.pi)) % 1.0  # image rows grow downwards
    sat = np.clip(mag / top, 0, 1) if top > 0 else np.zeros_like(mag)
    return hsv_to_rgb(np.stack([hue, sat, np.ones_like(mag)], axis=-1))


# -- drawing on axes --------------------------------------------------------------------------


def _clean(ax, title: str | None = None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def plot_image(ax, image2d, window=None, aspect: float = 1.0, title: str | None = None):
    window = window or _window(image2d)
    h = ax.imshow(_scaled(image2d, window), cmap="gray", vmin=0, vmax=1, aspect=aspect,
                  interpolation="nearest")
    _clean(ax, title)
    return h


def plot_checkerboard(ax, a2d, b2d, window=None, tiles: int = 8, aspect: float = 1.0,
                      title: str | None = None):
    window = window or _window(a2d, b2d)
    board = checkerboard(_scaled(a2d, window), _scaled(b2d, window), tiles)
    h = ax.imshow(board, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
    _clean(ax, title)
    return h


def plot_overlay(ax, a2d, b2d, window=None, aspect: float = 1.0, title: str | None = None):
    window = window or _window(a2d, b2d)
    h = ax.imshow(overlay_rgb(_scaled(a2d, window), _scaled(b2d, window)), aspect=aspect,
                  interpolation="nearest")
    _clean(ax, title)
    return h


def plot_contours(ax, labels2d, linestyle: str = "solid", linewidth: float = 0.9) -> None:
    """Contour of every non-zero label of a 2D label map, in its :func:`label_colour`."""
    lab = np.asarray(labels2d)
    for value in np.unique(lab):
        if value != 0:
            ax.contour((lab == value).astype(float), levels=[0.5], colors=[label_colour(value)],
                       linewidths=linewidth, linestyles=linestyle)


def plot_grid(ax, field2d, step: int | None = None, aspect: float = 1.0,
              title: str | None = None, color: str = "black") -> None:
    """Deformed grid: where each fixed-grid line samples the moving image (``x + d(x)``)."""
    f = np.asarray(field2d, dtype=np.float64)
    h, w = f.shape[1:]
    step = step or max(1, min(h, w) // 24)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    y, x = rows + f[0], cols + f[1]
    for i in list(range(0, h, step)) + [h - 1]:
        ax.plot(x[i, :], y[i, :], color=color, linewidth=0.5)
    for j in list(range(0, w, step)) + [w - 1]:
        ax.plot(x[:, j], y[:, j], color=color, linewidth=0.5)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect(aspect)
    _clean(ax, title)


def plot_jacobian(ax, detj2d, aspect: float = 1.0, title: str | None = None):
    """det J map: blue < 1 (compression), red > 1 (expansion); black contour where ≤ 0."""
    j = np.asarray(detj2d, dtype=np.float64)
    lo = min(float(j.min()), 0.0)
    hi = max(float(j.max()), 2.0)
    norm = TwoSlopeNorm(vmin=lo - 1e-6, vcenter=1.0, vmax=hi)
    h = ax.imshow(j, cmap="RdBu_r", norm=norm, aspect=aspect, interpolation="nearest")
    if (j <= 0).any():
        ax.contour((j <= 0).astype(float), levels=[0.5], colors="black", linewidths=0.8)
    _clean(ax, title)
    return h


def plot_displacement(ax, field2d, aspect: float = 1.0, title: str | None = None,
                      spacing: Sequence[float] | None = None):
    """HSV-coded in-plane displacement (see :func:`displacement_rgb`), with its maximum."""
    f = np.asarray(field2d, dtype=np.float64)
    h = ax.imshow(displacement_rgb(f), aspect=aspect, interpolation="nearest")
    mag = np.hypot(f[0], f[1]).max()
    text = f"max {mag:.2f} vox"
    if spacing is not None:
        mm = np.hypot(f[0] * spacing[0], f[1] * spacing[1]).max()
        text += f" / {mm:.2f} mm"
    ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=7, color="black",
            bbox=dict(facecolor="white", alpha=0.7, linewidth=0))
    _draw_wheel(ax)
    _clean(ax, title)
    return h


def _draw_wheel(ax) -> None:
    """Small colour wheel (direction key) in the top-right corner."""
    inset = ax.inset_axes([0.74, 0.74, 0.24, 0.24])
    n = 41
    yy, xx = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    rgb = displacement_rgb(np.stack([yy, xx]), max_magnitude=1.0)
    alpha = (np.hypot(xx, yy) <= 1).astype(float)
    inset.imshow(np.concatenate([rgb, alpha[..., None]], axis=-1), interpolation="bilinear")
    inset.set_axis_off()


# -- the panel --------------------------------------------------------------------------------


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` as PNG atomically (temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=dpi)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _jacobian(displacement, ndim: int) -> np.ndarray:
    """``det(I + ∇d)`` ``(*S)`` of a displacement given as a tensor or an array."""
    import torch

    from .metrics import jacobian_determinant

    d = torch.as_tensor(_array(displacement, ndim), dtype=torch.float64)[None]
    return jacobian_determinant(d)[0].numpy()


def _plot_images(axes, images, labels, window, aspect: float) -> None:
    """Fixed, moving and warped slices; the fixed labels' contours (solid) on all three, the
    moving and warped labels' (dashed) on their images."""
    for ax, image, title in zip(axes, images, ("fixed", "moving", "warped moving"), strict=True):
        plot_image(ax, image, window, aspect, title)
    fixed_labels, *others = labels
    if fixed_labels is not None:
        for ax in axes:
            plot_contours(ax, fixed_labels)
    for ax, lab in zip(axes[1:], others, strict=True):
        if lab is not None:
            plot_contours(ax, lab, "dashed")


def _contour_legend(fig: Figure, labels, label_names: Mapping[int, str] | None) -> None:
    """The figure's legend of the contours: one entry per label shown (its colour and name),
    then the line styles (solid: fixed labels; dashed: moving / warped labels). ``labels``:
    the shown slices of the fixed, moving and warped label maps (``None`` where not given)."""
    if label_names is not None and not isinstance(label_names, Mapping):
        raise TypeError(
            f"label_names: expected a mapping of label value to name, got "
            f"{type(label_names).__name__}"
        )
    if all(lab is None for lab in labels):
        return
    names = dict(label_names or {})
    values = sorted({int(v) for lab in labels if lab is not None for v in np.unique(lab)} - {0})
    handles = [Line2D([], [], color=label_colour(v), linewidth=2, label=names.get(v, f"label {v}"))
               for v in values]
    if labels[0] is not None:
        handles.append(Line2D([], [], color="0.25", label="fixed labels (solid)"))
    if any(lab is not None for lab in labels[1:]):
        handles.append(Line2D([], [], color="0.25", linestyle="dashed",
                              label="moving / warped labels (dashed)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8,
               frameon=False, title="contours", title_fontsize=8)


def _pick_slice(ndim: int, depth: int, fixed, fixed_labels, slice_index) -> tuple[int, str]:
    """The slice of a volume to show and why (stated in the figure): ``slice_index`` if given
    (checked: an integer in ``0 … depth − 1``; refused for 2D images), else
    :func:`choose_slice`."""
    if ndim == 2:
        if slice_index is not None:
            raise ValueError(f"slice_index: the images are 2D (no slice to choose), got "
                             f"{slice_index!r}")
        return 0, ""
    if slice_index is not None:
        if isinstance(slice_index, bool) or not isinstance(slice_index, (int, np.integer)):
            raise TypeError(f"slice_index: expected an integer, got {slice_index!r}")
        if not 0 <= slice_index < depth:
            raise ValueError(f"slice_index: expected a slice index in 0..{depth - 1} (the volume "
                             f"has {depth} slices along its first axis), got {slice_index}")
        return int(slice_index), "as requested"
    index = choose_slice(fixed, fixed_labels)
    if fixed_labels is not None and (_array(fixed_labels) > 0).any():
        return index, "the one with the most fixed-label voxels"
    return index, "the middle one"


def plot_registration(
    fixed,
    moving,
    warped,
    displacement,
    fixed_labels=None,
    warped_labels=None,
    moving_labels=None,
    *,
    spacing: Sequence[float] | None = None,
    slice_index: int | None = None,
    label_names: Mapping[int, str] | None = None,
    path: str | os.PathLike | None = "registration.png",
    title: str | None = None,
    dpi: int = 100,
):
    """One panel summarising a registration (one slice of a 3D volume).

    Top row: fixed, moving, warped (with label contours: fixed solid, moving/warped dashed, one
    colour per label value, see :func:`label_colour`), checkerboards fixed|moving and
    fixed|warped. Bottom row: magenta/green overlays before and after, the deformed grid, the
    det J map and the HSV-coded in-plane displacement. A legend below names the contours; the
    title of a volume's figure says which slice is shown and why.

    Args:
        fixed, moving, warped: images ``(1, 1, *S)`` or ``(*S)``; ``moving`` on the fixed grid.
        displacement: ``(1, ndim, *S)`` voxel units.
        fixed_labels, warped_labels, moving_labels: optional label maps for contours.
        spacing: array-order spacing (sets the pixel aspect ratio and mm in the legend).
        slice_index: slice (0-based, along axis 0) of a 3D volume, in ``0 … D − 1``; default:
            the slice with the most fixed-label voxels, else the middle one. Not for 2D images.
        label_names: names of label values for the legend (e.g. ``{1: "RV"}``; default
            ``"label 1"``, …).
        path: PNG to write (atomically); ``None`` returns the ``Figure`` instead.
    """
    ndim = _spatial_ndim(displacement)
    depth = _array(displacement, ndim).shape[1]
    slice_index, why = _pick_slice(ndim, depth, fixed, fixed_labels, slice_index)
    f2 = take_slice(fixed, slice_index, ndim)
    m2 = take_slice(moving, slice_index, ndim)
    w2 = take_slice(warped, slice_index, ndim)
    d2 = _field_slice(displacement, slice_index)
    detj = _jacobian(displacement, ndim)
    j2 = detj if ndim == 2 else detj[slice_index]
    inplane = tuple(spacing[-2:]) if spacing is not None else (1.0, 1.0)
    aspect = float(inplane[0] / inplane[1])
    window = _window(f2, m2, w2)

    fig = Figure(figsize=(15, 6.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 5)
    labels = [None if lab is None else take_slice(lab, slice_index, ndim)
              for lab in (fixed_labels, moving_labels, warped_labels)]
    _plot_images(axes[0, :3], (f2, m2, w2), labels, window, aspect)
    _contour_legend(fig, labels, label_names)
    plot_checkerboard(axes[0, 3], f2, m2, window, aspect=aspect, title="fixed | moving")
    plot_checkerboard(axes[0, 4], f2, w2, window, aspect=aspect, title="fixed | warped")
    plot_overlay(axes[1, 0], f2, m2, window, aspect, "before (fixed magenta, moving green)")
    plot_overlay(axes[1, 1], f2, w2, window, aspect, "after (fixed magenta, warped green)")
    plot_grid(axes[1, 2], d2, aspect=aspect, title="deformed grid")
    handle = plot_jacobian(
        axes[1, 3], j2, aspect,
        f"det J (min {detj.min():.2f}, ≤0: {100 * (detj <= 0).mean():.2f} %)",
    )
    fig.colorbar(handle, ax=axes[1, 3], shrink=0.8)
    plot_displacement(axes[1, 4], d2, aspect, "displacement (hue: direction)",
                      spacing=inplane if spacing is not None else None)
    heading = title or "registration"
    if ndim == 3:
        heading += f" — slice {slice_index} of {depth} (0-based, first axis): {why}"
    fig.suptitle(heading, fontsize=11)
    if path is None:
        return fig
    return save_figure(fig, path, dpi=dpi)
