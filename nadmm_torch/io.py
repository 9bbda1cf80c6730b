"""Reading and writing medical images, image geometry, and ITK displacement fields.

Two conventions meet here:

* **This package** works on tensors ``(B, C, *S)`` in *array order* — ``S = (D, H, W)`` in 3D,
  the axis order of ``SimpleITK.GetArrayFromImage`` (z, y, x) — and on displacements
  ``(B, ndim, *S)`` in **voxel units**, component ``i`` along array axis ``i``, used as a
  pull-back: ``warped(x) = moving(x + d(x))``.
* **ITK / SimpleITK** indexes images in the reverse order (x, y, z), places voxel ``idx`` at the
  physical point ``origin + direction @ (spacing * idx)`` in LPS millimetres, and stores
  displacement fields as vector images of physical (LPS, mm) vectors:
  ``T(p) = p + v(p)``; ``sitk.Resample(moving, fixed, T)`` then gives ``moving(T(p))``.

:func:`displacement_to_itk` / :func:`itk_to_displacement` convert exactly between the two, so
that the field written by ``nadmm-register`` can be applied as-is by
``sitk.DisplacementFieldTransform`` or ``antsApplyTransforms``. TorchIO (``(C, W, H, D)``
tensors, RAS affine) is bridged by :func:`to_torchio` / :func:`from_torchio`.

All writes are atomic and verified (:mod:`nadmm_torch.atomic`): files are written under a
temporary folder next to the destination, checked (complete gzip stream, every byte a NIfTI
header announces, the image reads back with its size), and only then moved into place with
``os.replace``; nothing half-written is left behind on failure, and a writer that fails
without raising (SimpleITK on a full disk) is caught.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from torch import Tensor

from .atomic import Staging, atomic_write
from .checks import one_line as _one_line

__all__ = [
    "Geometry",
    "read_image",
    "read_labels",
    "write_image",
    "resample_to",
    "displacement_to_itk",
    "itk_to_displacement",
    "read_displacement",
    "affine_to_itk",
    "itk_to_affine",
    "write_affine",
    "to_sitk",
    "to_torchio",
    "from_torchio",
    "unpack_torchio_pair",
    "sitk_error_reason",
]

_FLIP_RAS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Where an image grid lies in physical space (ITK convention, LPS millimetres).

    Attributes are in **ITK index order** (x, y[, z]), as SimpleITK reports them:
    ``size``, ``spacing``, ``origin`` and ``direction`` (row-major ``ndim × ndim``; column ``j``
    is the physical direction of index axis ``j``). The array-order views used with tensors
    are :attr:`shape` and :attr:`array_spacing`.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.size)
        if n not in (2, 3):
            raise ValueError(f"Geometry: expected a 2D or 3D grid, got {n}D")
        if len(self.spacing) != n or len(self.origin) != n or len(self.direction) != n * n:
            raise ValueError("Geometry: size, spacing, origin and direction disagree in dimension")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"Geometry: spacing must be positive, got {self.spacing}")

    # -- views -------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape in array order ``(D, H, W)`` / ``(H, W)``."""
        return tuple(reversed(self.size))

    @property
    def array_spacing(self) -> tuple[float, ...]:
        """Spacing in array order (``(s_z, s_y, s_x)``), as the solver takes it."""
        return tuple(reversed(self.spacing))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    @property
    def index_to_physical(self) -> np.ndarray:
        """``direction @ diag(spacing)``: maps an ITK-order index step to an LPS mm vector."""
        return self.direction_matrix * np.asarray(self.spacing, dtype=np.float64)[None, :]

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @classmethod
    def default(cls, shape: Sequence[int], spacing: Sequence[float] | None = None) -> Geometry:
        """Identity direction, zero origin; ``shape`` and ``spacing`` in **array order**."""
        n = len(shape)
        spacing = (1.0,) * n if spacing is None else tuple(float(s) for s in spacing)
        return cls(
            size=tuple(int(s) for s in reversed(tuple(shape))),
            spacing=tuple(reversed(spacing)),
            origin=(0.0,) * n,
            direction=tuple(np.eye(n).ravel().tolist()),
        )

    @classmethod
    def from_ras_affine(cls, affine: Any, shape: Sequence[int]) -> Geometry:
        """From a 4×4 RAS affine (NiBabel / TorchIO) and the spatial shape in **array order**.

        A 2D ``shape`` uses the upper-left 2×2 block (TorchIO's convention for 2D images).
        """
        a = np.asarray(affine, dtype=np.float64)
        if a.shape != (4, 4):
            raise ValueError(f"expected a 4x4 affine, got shape {a.shape}")
        n = len(shape)
        lin = _FLIP_RAS @ a[:3, :3]
        origin = _FLIP_RAS @ a[:3, 3]
        lin, origin = lin[:n, :n], origin[:n]
        spacing = np.linalg.norm(lin, axis=0)
        if np.any(spacing <= 0):
            raise ValueError("affine has a zero-length axis")
        direction = lin / spacing[None, :]
        return cls(
            size=tuple(int(s) for s in reversed(tuple(shape))),
            spacing=tuple(spacing.tolist()),
            origin=tuple(origin.tolist()),
            direction=tuple(direction.ravel().tolist()),
        )

    # -- conversions -------------------------------------------------------------------------
    def apply(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry's spacing, origin and direction on ``image`` (in place); returns it."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {image.GetSize()} does not match geometry {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference_image(self) -> sitk.Image:
        """An empty image on this grid (for ``sitk.Resample``)."""
        ref = sitk.Image([int(s) for s in self.size], sitk.sitkUInt8)
        return self.apply(ref)

    def ras_affine(self) -> np.ndarray:
        """4×4 RAS affine as NiBabel and TorchIO use it (2D grids are embedded with z = 0)."""
        n = self.ndim
        lin = np.eye(3)
        lin[:n, :n] = self.index_to_physical
        origin = np.zeros(3)
        origin[:n] = self.origin
        a = np.eye(4)
        a[:3, :3] = _FLIP_RAS @ lin
        a[:3, 3] = _FLIP_RAS @ origin
        return a

    def matches(self, other: Geometry, tol: float = 1e-4) -> bool:
        """Same grid: equal size, and spacing/origin/direction equal within ``tol``."""
        if self.size != other.size:
            return False
        return (
            np.allclose(self.spacing, other.spacing, rtol=0, atol=tol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=tol * max(self.spacing))
            and np.allclose(self.direction, other.direction, rtol=0, atol=tol)
        )

    def describe(self) -> str:
        """Short human-readable description, e.g. ``128x128x10 @ 1.5x1.5x10 mm``."""
        size = "x".join(str(s) for s in self.size)
        spacing = "x".join(f"{s:g}" for s in self.spacing)
        return f"{size} voxels @ {spacing} mm"

    def to_dict(self) -> dict[str, Any]:
        return {
            "size_itk": list(self.size),
            "spacing_itk_mm": list(self.spacing),
            "origin_lps_mm": list(self.origin),
            "direction": list(self.direction),
            "shape_array": list(self.shape),
            "spacing_array_mm": list(self.array_spacing),
        }


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def sitk_error_reason(exc: BaseException) -> str:
    """One-line reason from a (multi-line) SimpleITK exception message."""
    text = str(exc)
    for line in text.splitlines():
        if "ERROR:" in line:
            return line.split("ERROR:", 1)[1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _check_nifti_data(p: Path) -> None:
    """A NIfTI input must hold every voxel its header announces, and finite values in the
    file's own data type. SimpleITK checks neither: a truncated ``.nii.gz`` reads as an image
    padded with zeros, and a NaN voxel reads as 0. The raw data is read with NiBabel."""
    import nibabel as nib

    try:
        img = nib.load(p)
    except Exception as exc:  # noqa: BLE001 - NiBabel raises many kinds on a bad header
        raise ValueError(f"cannot read image '{p}': {_one_line(exc)}") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        return
    try:
        raw = np.asanyarray(img.dataobj.get_unscaled())
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise ValueError(
            f"cannot read image '{p}': the file is truncated or corrupt ({_one_line(exc)})"
        ) from None
    if raw.dtype.kind in "fc":
        bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        if bad:
            raise ValueError(
                f"'{p}' contains non-finite values (NaN or Inf) in {bad} of {raw.size} voxels"
            )


def _read_sitk(path: str | os.PathLike) -> sitk.Image:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: '{p}'")
    if p.is_dir():
        raise ValueError(f"'{p}' is a directory, not an image file")
    if p.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_data(p)
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise ValueError(f"cannot read image '{p}': {sitk_error_reason(exc)}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"'{p}' has {image.GetNumberOfComponentsPerPixel()} components per voxel;"
            " expected a scalar image"
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:  # 3D volume stored with a singleton 4th axis
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size, [0, 0, 0, 0])
        dim = 3
    if dim not in (2, 3):
        raise ValueError(f"'{p}' is a {dim}D image; expected 2D or 3D")
    return image


def read_image(path: str | os.PathLike) -> tuple[Tensor, Geometry]:
    """Read any image SimpleITK reads (NIfTI, MHA/MHD, NRRD, …).

    Returns:
        ``(image, geometry)``: a float32 tensor ``(1, 1, *S)`` in array order, and its
        :class:`Geometry`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable / corrupt / truncated file (NIfTI: checked against the size its
            header announces), vector image, not 2D/3D, non-finite values (NIfTI: checked in
            the file's own data type, where SimpleITK would read a NaN as 0).
    """
    image = _read_sitk(path)
    geometry = Geometry.from_sitk(image)
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"'{path}' contains non-finite values (NaN or Inf)")
    return torch.from_numpy(np.ascontiguousarray(array))[None, None], geometry


def read_labels(path: str | os.PathLike) -> tuple[Tensor, Geometry]:
    """Read a label map: int64 tensor ``(1, 1, *S)`` of non-negative integers, and its geometry."""
    image = _read_sitk(path)
    geometry = Geometry.from_sitk(image)
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError(f"'{path}' is not a label map: it has non-integer values")
    if array.size and array.min() < 0:
        raise ValueError(f"'{path}' is not a label map: it has negative values")
    labels = torch.from_numpy(np.ascontiguousarray(array.astype(np.int64)))
    return labels[None, None], geometry


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _numpy_for_writing(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dt in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                return array.astype(dt)
        return array.astype(np.int64)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return array


def to_sitk(image: Tensor | np.ndarray, geometry: Geometry) -> sitk.Image:
    """A tensor on ``geometry``'s grid as a SimpleITK image.

    ``image`` is ``(*S)``, ``(1, *S)``, ``(1, 1, *S)`` (scalar) or ``(1, C, *S)`` / ``(C, *S)``
    with ``C > 1`` (vector image, components in the order given). Integer tensors are written
    with the smallest of uint8 / int16 / int32 that holds them.
    """
    if isinstance(image, Tensor):
        array = image.detach().cpu().numpy()
    else:
        array = np.asarray(image)
    n = geometry.ndim
    while array.ndim > n + 1 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == n + 1 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == n:
        vector = False
        spatial = array.shape
    elif array.ndim == n + 1:
        vector = True
        spatial = array.shape[1:]
        array = np.moveaxis(array, 0, -1)
    else:
        raise ValueError(f"cannot write an array of shape {image.shape} on a {n}D grid")
    if tuple(spatial) != geometry.shape:
        raise ValueError(
            f"image shape {tuple(spatial)} does not match the geometry's shape {geometry.shape}"
        )
    array = np.ascontiguousarray(_numpy_for_writing(array))
    out = sitk.GetImageFromArray(array, isVector=vector)
    return geometry.apply(out)


def _squeezed(size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(int(n) for n in size)
    while len(size) > 1 and size[-1] == 1:
        size = size[:-1]
    return size


def _check_written(out: sitk.Image) -> Any:
    """A check for :class:`~nadmm_torch.atomic.Staging`: the file read back has ``out``'s size
    and components (NIfTI: header only, its payload size is checked by ``verify_file``; other
    formats: a full read, which fails on truncated data)."""

    def check(p: Path) -> None:
        try:
            if p.name.lower().endswith((".nii", ".nii.gz")):
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(p))
                reader.ReadImageInformation()
                size, comps = reader.GetSize(), reader.GetNumberOfComponents()
            else:
                back = sitk.ReadImage(str(p))
                size, comps = back.GetSize(), back.GetNumberOfComponentsPerPixel()
        except RuntimeError as exc:
            reason = sitk_error_reason(exc)
            raise OSError(f"the written file does not read back: {reason}") from None
        # Trailing singleton axes may be dropped (ITK reads a one-slice vector NIfTI as 2D).
        got, want = _squeezed(size), _squeezed(out.GetSize())
        if got != want or comps != out.GetNumberOfComponentsPerPixel():
            raise OSError(
                f"the written file reads back as size {tuple(size)} with {comps} component(s),"
                f" not {tuple(out.GetSize())} with {out.GetNumberOfComponentsPerPixel()}"
            )

    return check


def write_image(
    image: Tensor | np.ndarray | sitk.Image,
    geometry: Geometry | None,
    path: str | os.PathLike,
    *,
    compress: bool = True,
) -> Path:
    """Write ``image`` on ``geometry``'s grid to ``path`` (format from the extension), atomically.

    ``image`` may be a tensor / array (see :func:`to_sitk`) or a ``sitk.Image`` (then
    ``geometry`` may be ``None``; if given, it is applied). The file is written under a
    temporary folder in the destination folder, verified (see :mod:`nadmm_torch.atomic`; the
    image must also read back with its size and components) and moved into place with
    ``os.replace``: the destination is either untouched or complete.

    Raises:
        OSError: the write failed or the written file is incomplete (a full disk, a file-size
            limit), naming ``path``; nothing is left behind.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: '{folder}'")
    if isinstance(image, sitk.Image):
        out = image if geometry is None else geometry.apply(sitk.Image(image))
    else:
        if geometry is None:
            raise ValueError("write_image: a geometry is needed to write a tensor")
        out = to_sitk(image, geometry)
    try:
        staging = Staging(folder)
    except OSError as exc:
        raise PermissionError(f"cannot write to '{folder}': {exc.strerror}") from None

    def write(p: Path) -> None:
        try:
            sitk.WriteImage(out, str(p), compress)
        except RuntimeError as exc:
            raise OSError(f"cannot write '{path}': {sitk_error_reason(exc)}") from None

    with staging:  # a header format's data file (.raw, .img) is verified by commit
        staging.add(path.name, write, _check_written(out))
        staging.commit(folder)
    return path


# --------------------------------------------------------------------------------------------
# Resampling between grids
# --------------------------------------------------------------------------------------------


def resample_to(
    image: sitk.Image | Tensor,
    fixed_geometry: Geometry,
    *,
    geometry: Geometry | None = None,
    label: bool = False,
    default: float = 0.0,
) -> Tensor:
    """Resample an image onto ``fixed_geometry``'s grid through physical space (SimpleITK).

    Args:
        image: a ``sitk.Image``, or a tensor ``(1, 1, *S)`` together with its ``geometry``.
        fixed_geometry: the target grid.
        geometry: the grid of a tensor ``image``.
        label: nearest-neighbour interpolation and an int64 result (else linear, float32).
        default: value outside the moving image's extent.

    Returns:
        ``(1, 1, *fixed_geometry.shape)`` tensor.
    """
    if isinstance(image, sitk.Image):
        src = image
    else:
        if geometry is None:
            raise ValueError("resample_to: a tensor image needs its geometry")
        src = to_sitk(image.double() if not label else image, geometry)
    if src.GetDimension() != fixed_geometry.ndim:
        raise ValueError(
            f"cannot resample a {src.GetDimension()}D image onto a {fixed_geometry.ndim}D grid"
        )
    if label:
        out = sitk.Resample(
            src, fixed_geometry.reference_image(), sitk.Transform(), sitk.sitkNearestNeighbor,
            default, src.GetPixelID(),
        )
        array = sitk.GetArrayFromImage(out).astype(np.int64)
    else:
        out = sitk.Resample(
            sitk.Cast(src, sitk.sitkFloat64), fixed_geometry.reference_image(), sitk.Transform(),
            sitk.sitkLinear, default, sitk.sitkFloat64,
        )
        array = sitk.GetArrayFromImage(out).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))[None, None]


# --------------------------------------------------------------------------------------------
# Displacement fields
# --------------------------------------------------------------------------------------------


def _strip_batch(displacement: Tensor | np.ndarray, ndim: int) -> np.ndarray:
    d = displacement.detach().cpu().double().numpy() if isinstance(displacement, Tensor) else (
        np.asarray(displacement, dtype=np.float64)
    )
    if d.ndim == ndim + 2:
        if d.shape[0] != 1:
            raise ValueError(f"expected a single displacement (batch 1), got batch {d.shape[0]}")
        d = d[0]
    if d.ndim != ndim + 1 or d.shape[0] != ndim:
        raise ValueError(
            f"expected a displacement (1, {ndim}, *S) for a {ndim}D grid, got {tuple(d.shape)}"
        )
    return d


def displacement_to_itk(displacement: Tensor | np.ndarray, geometry: Geometry) -> sitk.Image:
    """Voxel-unit pull-back displacement → ITK displacement field (LPS mm vectors).

    Args:
        displacement: ``(1, ndim, *S)`` (or ``(ndim, *S)``) in voxel units, component ``i``
            along array axis ``i`` (this package's convention).
        geometry: the grid the displacement lives on (the fixed image's).

    Returns:
        ``sitkVectorFloat64`` image on ``geometry``'s grid whose voxel ``p`` holds the physical
        vector ``direction @ (spacing * d_itk(p))`` (``d_itk`` = components reversed to x, y, z
        order). ``sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field))``
        reproduces ``warp(moving, displacement)`` (up to interpolation at the borders).
    """
    n = geometry.ndim
    d = _strip_batch(displacement, n)
    if tuple(d.shape[1:]) != geometry.shape:
        raise ValueError(
            f"displacement grid {tuple(d.shape[1:])} does not match geometry {geometry.shape}"
        )
    d_itk = d[::-1]  # component j now along ITK index axis j
    vectors = np.einsum("kj,j...->...k", geometry.index_to_physical, d_itk)
    field = sitk.GetImageFromArray(np.ascontiguousarray(vectors, dtype=np.float64), isVector=True)
    return geometry.apply(field)


def _read_field(p: Path) -> sitk.Image:
    """A displacement-field file as a SimpleITK image; a truncated or NaN-holding NIfTI, a
    missing or unreadable file raise, naming ``p``."""
    if not p.is_file():
        raise FileNotFoundError(f"no such file: '{p}'")
    if p.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_data(p)
    try:
        return sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise ValueError(f"cannot read '{p}': {sitk_error_reason(exc)}") from None


def itk_to_displacement(
    field: sitk.Image | str | os.PathLike, geometry: Geometry | None = None
) -> Tensor:
    """ITK displacement field (image or file) → voxel-unit displacement ``(1, ndim, *S)`` float32.

    The field's own grid is used; if ``geometry`` is given it must match it.
    """
    if not isinstance(field, sitk.Image):
        field = _read_field(Path(field))
    own = Geometry.from_sitk(field)
    if geometry is not None and not own.matches(geometry):
        raise ValueError("the displacement field's grid does not match the given geometry")
    n = own.ndim
    if field.GetNumberOfComponentsPerPixel() != n:
        raise ValueError(
            f"a {n}D displacement field needs {n} components per voxel,"
            f" got {field.GetNumberOfComponentsPerPixel()}"
        )
    vectors = sitk.GetArrayFromImage(field).astype(np.float64)  # (*S, n) LPS mm
    d_itk = np.einsum("jk,...k->j...", np.linalg.inv(own.index_to_physical), vectors)
    d = np.ascontiguousarray(d_itk[::-1], dtype=np.float32)
    return torch.from_numpy(d)[None]


def _reference_geometry(reference: Geometry | sitk.Image | str | os.PathLike) -> Geometry:
    if isinstance(reference, Geometry):
        return reference
    if isinstance(reference, sitk.Image):
        return Geometry.from_sitk(reference)
    if isinstance(reference, str | os.PathLike):
        return Geometry.from_sitk(_read_sitk(reference))
    raise TypeError(
        "reference: expected a Geometry, a SimpleITK image or an image path, got "
        f"{type(reference).__name__}"
    )


def _one_slice_field(field: sitk.Image, path: Path, reference: Geometry | None) -> sitk.Image:
    """A one-slice 3D vector NIfTI, which ITK reads as a 2D image with 3 components, back on
    the 3D one-slice ``reference`` grid (its in-plane grid must be the field's)."""
    ref = reference
    if ref is None or ref.ndim != 3 or ref.size[2] != 1:
        raise ValueError(
            f"'{path}' reads as a 2D field with 3 components (ITK reads a one-slice 3D vector "
            "NIfTI as 2D): pass the fixed image as the reference, or use the displacement.mha "
            "written beside it"
        )
    plane = Geometry(size=ref.size[:2], spacing=ref.spacing[:2], origin=ref.origin[:2],
                     direction=tuple(ref.direction_matrix[:2, :2].ravel()))
    if not Geometry.from_sitk(field).matches(plane):
        raise ValueError(f"'{path}': the one-slice field's grid does not match the reference's")
    vectors = sitk.GetArrayFromImage(field).astype(np.float64)[None]  # (1, Y, X, 3)
    return ref.apply(sitk.GetImageFromArray(vectors, isVector=True))


def read_displacement(
    path: str | os.PathLike, reference: Geometry | sitk.Image | str | os.PathLike | None = None
) -> tuple[Tensor, Geometry]:
    """Read an ITK displacement field file as this package's displacement.

    The file is a vector image of physical vectors (LPS mm) in ITK's convention
    ``T(p) = p + v(p)``: ``displacement.nii.gz`` / ``.mha`` of ``nadmm-register`` (on the fixed
    grid), an ANTs warp field, or any field ``sitk.DisplacementFieldTransform`` takes.

    Args:
        path: the field file (NIfTI, MetaImage, NRRD, …).
        reference: the grid to express the field on — a :class:`Geometry`, a ``sitk.Image``
            or the path of an image (normally the fixed image). Default: the field's own grid.
            If it differs from the field's grid, the field is resampled onto it as ITK
            evaluates a ``DisplacementFieldTransform`` (linear interpolation of the vectors,
            zero displacement outside the field's extent).

    Returns:
        ``(displacement, geometry)``: float32 ``(1, ndim, *S)`` in voxel units of the
        reference grid, component ``i`` along array axis ``i``, a pull-back
        (``warp(moving, displacement)`` samples the moving image, on the same grid, at
        ``x + d(x)``, as ``sitk.Resample(moving, reference, DisplacementFieldTransform(field))``
        does); and that grid's :class:`Geometry`.

    A one-slice 3D field stored as NIfTI reads as 2D with 3 components in ITK; with a
    one-slice 3D ``reference`` on the same in-plane grid it is read back as 3D.

    Raises:
        FileNotFoundError: ``path`` (or a ``reference`` path) does not exist.
        ValueError: unreadable or corrupt file, not a displacement field (components per voxel
            differ from the dimension), a dimension other than the reference's.
        TypeError: ``reference`` of another type.
    """
    p = Path(path)
    field = _read_field(p)
    ref = None if reference is None else _reference_geometry(reference)
    if field.GetDimension() == 2 and field.GetNumberOfComponentsPerPixel() == 3:
        field = _one_slice_field(field, p, ref)
    n = field.GetDimension()
    if field.GetNumberOfComponentsPerPixel() != n:
        raise ValueError(
            f"'{p}' is not a displacement field: a {n}D field needs {n} components per voxel,"
            f" got {field.GetNumberOfComponentsPerPixel()}"
        )
    if ref is not None and ref.ndim != n:
        raise ValueError(f"'{p}' is a {n}D field but the reference grid is {ref.ndim}D")
    if ref is not None and not Geometry.from_sitk(field).matches(ref):
        field = sitk.Resample(
            sitk.Cast(field, sitk.sitkVectorFloat64), ref.reference_image(), sitk.Transform(),
            sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64,
        )
    geometry = Geometry.from_sitk(field)
    return itk_to_displacement(field), geometry


# --------------------------------------------------------------------------------------------
# Affine transforms
# --------------------------------------------------------------------------------------------


def _affine_array(A: Tensor | np.ndarray, ndim: int) -> np.ndarray:
    a = A.detach().cpu().double().numpy() if isinstance(A, Tensor) else np.asarray(A, float)
    if a.ndim == 3:
        if a.shape[0] != 1:
            raise ValueError(f"A: expected a single affine (batch 1), got batch {a.shape[0]}")
        a = a[0]
    if a.shape != (ndim, ndim + 1):
        raise ValueError(
            f"A: expected a (1, {ndim}, {ndim + 1}) affine for a {ndim}D grid, got "
            f"{tuple(np.shape(A))}"
        )
    if not np.isfinite(a).all():
        raise ValueError("A: contains non-finite values")
    return a


def affine_to_itk(
    A: Tensor | np.ndarray, fixed: Geometry, moving: Geometry | None = None
) -> sitk.AffineTransform:
    """Voxel affine of :func:`nadmm_torch.affine` → ``sitk.AffineTransform`` in physical space.

    ``A`` ``(1, n, n + 1)`` maps fixed array indices to moving array indices (pull-back). The
    ITK transform maps fixed physical points (LPS mm) to moving physical points, ITK's
    convention for registration results: ``sitk.Resample(moving, fixed, transform)``
    reproduces ``warp(moving, affine_to_displacement(A, S))``. ``moving``: the moving image's
    grid (default: the fixed grid, i.e. a moving image already resampled onto it).
    """
    moving = fixed if moving is None else moving
    n = fixed.ndim
    if moving.ndim != n:
        raise ValueError(f"moving: a {moving.ndim}D geometry for a {n}D fixed geometry")
    a = _affine_array(A, n)
    flip = np.eye(n)[::-1]  # array order <-> ITK index order
    gf, gm = fixed.index_to_physical, moving.index_to_physical
    matrix = gm @ flip @ a[:, :n] @ flip @ np.linalg.inv(gf)
    offset = np.asarray(moving.origin) + gm @ flip @ a[:, n] - matrix @ np.asarray(fixed.origin)
    transform = sitk.AffineTransform(n)
    transform.SetMatrix(matrix.ravel().tolist())
    transform.SetTranslation(offset.tolist())
    return transform


def itk_to_affine(
    transform: sitk.Transform | str | os.PathLike,
    fixed: Geometry,
    moving: Geometry | None = None,
) -> Tensor:
    """ITK affine (transform or file, e.g. ``affine.tfm`` or an ANTs ``.mat``) → voxel ``A``
    ``(1, n, n + 1)`` float64, the inverse of :func:`affine_to_itk`."""
    if not isinstance(transform, sitk.Transform):
        p = Path(transform)
        if not p.is_file():
            raise FileNotFoundError(f"no such file: '{p}'")
        try:
            transform = sitk.ReadTransform(str(p))
        except RuntimeError as exc:
            raise ValueError(f"cannot read '{p}': {sitk_error_reason(exc)}") from None
    moving = fixed if moving is None else moving
    n = fixed.ndim
    if transform.GetDimension() != n:
        raise ValueError(f"a {transform.GetDimension()}D transform for a {n}D geometry")
    try:
        aff = sitk.AffineTransform(transform)
    except RuntimeError:
        raise ValueError(f"not an affine transform: {transform.GetName()}") from None
    m = np.asarray(aff.GetMatrix(), dtype=np.float64).reshape(n, n)
    centre = np.asarray(aff.GetCenter(), dtype=np.float64)
    offset = np.asarray(aff.GetTranslation(), dtype=np.float64) + centre - m @ centre
    flip = np.eye(n)[::-1]
    gf, gm = fixed.index_to_physical, moving.index_to_physical
    to_index = flip @ np.linalg.inv(gm)
    lin = to_index @ m @ gf @ flip
    trans = to_index @ (m @ np.asarray(fixed.origin) + offset - np.asarray(moving.origin))
    return torch.from_numpy(np.concatenate([lin, trans[:, None]], axis=1))[None]


def write_affine(
    A: Tensor | np.ndarray,
    fixed: Geometry,
    path: str | os.PathLike,
    moving: Geometry | None = None,
) -> Path:
    """Write ``A`` as an ITK transform file (``.tfm``/``.txt``, ``.mat``) that SimpleITK
    (``sitk.ReadTransform``) and ANTs read; see :func:`affine_to_itk`. Atomic, like
    :func:`write_image`."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: '{folder}'")
    transform = affine_to_itk(A, fixed, moving)

    def write(p: Path) -> None:
        try:
            sitk.WriteTransform(transform, str(p))
        except RuntimeError as exc:
            raise OSError(f"cannot write '{path}': {sitk_error_reason(exc)}") from None

    return atomic_write(path, write, lambda p: sitk.ReadTransform(str(p)))


# --------------------------------------------------------------------------------------------
# TorchIO
# --------------------------------------------------------------------------------------------


def to_torchio(image: Tensor, geometry_or_affine: Geometry | Any, label: bool = False):
    """A tensor of this package as a ``tio.ScalarImage`` (or ``tio.LabelMap`` if ``label``).

    Args:
        image: ``(1, C, *S)`` in array order (``S = (D, H, W)`` or ``(H, W)``); with a
            :class:`Geometry`, also ``(C, *S)`` or ``(*S)``.
        geometry_or_affine: a :class:`Geometry` (e.g. the fixed image's), or a 4×4 RAS affine.
        label: build a ``LabelMap``.

    TorchIO stores ``(C, W, H, D)`` (ITK index order) with a RAS affine; 2D images become
    ``(C, W, H, 1)``.
    """
    import torchio as tio

    t = torch.as_tensor(image).detach().cpu()
    if isinstance(geometry_or_affine, Geometry):
        n = geometry_or_affine.ndim
        affine = geometry_or_affine.ras_affine()
        while t.dim() < n + 1:
            t = t.unsqueeze(0)
        if t.dim() == n + 2:
            if t.shape[0] != 1:
                raise ValueError("to_torchio: batch size must be 1")
            t = t[0]
        if tuple(t.shape[1:]) != geometry_or_affine.shape:
            raise ValueError(
                f"to_torchio: image shape {tuple(t.shape[1:])} does not match the geometry's"
                f" {geometry_or_affine.shape}"
            )
    else:
        affine = np.asarray(geometry_or_affine, dtype=np.float64)
        if t.dim() not in (4, 5) or t.shape[0] != 1:
            raise ValueError(
                f"to_torchio: with an affine, expected (1, C, *S), got {tuple(t.shape)}"
            )
        t = t[0]
        n = t.dim() - 1
    data = t.permute(0, *range(n, 0, -1))  # (C, X, Y[, Z])
    if n == 2:
        data = data.unsqueeze(-1)
    if label:
        return tio.LabelMap(tensor=data.long(), affine=affine)
    return tio.ScalarImage(tensor=data.float(), affine=affine)


def from_torchio(obj, squeeze_2d: bool = True):
    """TorchIO image(s) → tensors of this package.

    Args:
        obj: a ``tio.Image`` (``ScalarImage`` / ``LabelMap``) or a ``tio.Subject``.
        squeeze_2d: treat ``(C, W, H, 1)`` images as 2D (TorchIO's own convention).

    Returns:
        For an image: ``(tensor, geometry)`` with ``tensor`` ``(1, C, *S)`` in array order
        (float32 for intensity images, int64 for label maps) and a :class:`Geometry` (whose
        :attr:`Geometry.array_spacing` is the spacing to pass to the solver). For a subject:
        a dict ``name -> (tensor, geometry)``.
    """
    import torchio as tio

    if isinstance(obj, tio.Subject):
        return {
            name: from_torchio(img, squeeze_2d=squeeze_2d)
            for name, img in obj.get_images_dict(intensity_only=False).items()
        }
    if not isinstance(obj, tio.Image):
        raise TypeError(f"from_torchio: expected a torchio Image or Subject, got {type(obj)}")
    data = obj.data  # (C, X, Y, Z)
    if squeeze_2d and data.shape[-1] == 1:
        data = data[..., 0]
    n = data.dim() - 1
    t = data.permute(0, *range(n, 0, -1)).unsqueeze(0).contiguous()  # (1, C, *S) array order
    geometry = Geometry.from_ras_affine(obj.affine, t.shape[2:])
    if obj.type == tio.LABEL:
        t = t.long()
    else:
        t = t.float()
    return t, geometry


def _is_torchio(obj: Any) -> bool:
    mod = type(obj).__module__
    return mod == "torchio" or mod.startswith("torchio.")


def unpack_torchio_pair(
    fixed: Any, moving: Any, spacing: Any = None, fixed_key: str = "fixed",
    moving_key: str = "moving",
) -> tuple[Any, Any, Any, Geometry | None]:
    """Tensors, spacing and the fixed image's geometry from TorchIO inputs.

    ``fixed``/``moving`` may be tensors (returned unchanged), ``tio.Image`` objects, or
    ``fixed`` a ``tio.Subject`` holding images named ``fixed_key``/``moving_key`` (then
    ``moving`` is ``None``). The spacing comes from the fixed image unless given; TorchIO's
    ``(C, X, Y, Z)`` becomes this package's ``(1, C, Z, Y, X)`` array order, so the
    displacement's component ``i`` is along array axis ``i`` (use :func:`to_torchio` with the
    returned geometry to go back).
    """
    if not (_is_torchio(fixed) or _is_torchio(moving)):
        return fixed, moving, spacing, None
    import torchio as tio

    if isinstance(fixed, tio.Subject):
        if moving is not None:
            raise ValueError("moving: must be None when fixed is a tio.Subject")
        missing = [k for k in (fixed_key, moving_key) if k not in fixed]
        if missing:
            raise ValueError(
                f"fixed: the tio.Subject has no image(s) {missing}; it has {list(fixed.keys())}"
            )
        fixed, moving = fixed[fixed_key], fixed[moving_key]
    geometry = None
    out = []
    for name, obj in (("fixed", fixed), ("moving", moving)):
        if isinstance(obj, tio.Image):
            t, geo = from_torchio(obj)
            out.append(t.float() if not t.is_floating_point() else t)
            if name == "fixed":
                geometry = geo
        elif _is_torchio(obj):
            raise TypeError(f"{name}: expected a tio.Image or a tensor, got {type(obj).__name__}")
        else:
            out.append(obj)
    if spacing is None and geometry is not None:
        spacing = geometry.array_spacing
    return out[0], out[1], spacing, geometry
