"""nadmm_torch.io: geometry, atomic I/O, resampling, ITK displacement fields, TorchIO bridge."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nadmm_torch.io import (
    Geometry,
    displacement_to_itk,
    from_torchio,
    itk_to_displacement,
    read_image,
    read_labels,
    resample_to,
    to_sitk,
    to_torchio,
    write_image,
)
from nadmm_torch.ops.warp import warp

from .synthetic import sine_field, sine_image


def _rotation_flip_3d() -> np.ndarray:
    t = 0.4
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])
    m = rot @ np.diag([1.0, -1.0, 1.0])  # a flip: det -1
    return m[[0, 2, 1]]  # and an axis permutation


def geometry_3d(shape=(9, 30, 26)) -> Geometry:
    """Non-identity direction (rotation, flip, permutation), non-zero origin, anisotropic."""
    return Geometry(
        size=tuple(reversed(shape)),
        spacing=(1.3, 0.9, 4.0),
        origin=(10.0, -20.0, 33.0),
        direction=tuple(_rotation_flip_3d().ravel()),
    )


def geometry_2d(shape=(34, 28)) -> Geometry:
    t = 2.2
    d = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) @ np.diag([1.0, -1.0])
    return Geometry(size=tuple(reversed(shape)), spacing=(0.8, 1.7), origin=(-5.0, 7.5),
                    direction=tuple(d.ravel()))


def _inside(shape, d: torch.Tensor, margin: float = 1.0) -> np.ndarray:
    """Voxels whose sample point x + d stays inside the grid (where ITK and torch agree)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    pos = grid + d[0].numpy()
    ok = np.ones(shape, bool)
    for i, n in enumerate(shape):
        ok &= (pos[i] >= margin) & (pos[i] <= n - 1 - margin)
    return ok


# -- geometry and files ------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"])
def test_write_read_round_trip_keeps_values_and_geometry(tmp_path, ext):
    geo = geometry_3d()
    img = sine_image(geo.shape)
    path = write_image(img, geo, tmp_path / f"img{ext}")
    back, geo2 = read_image(path)
    assert torch.equal(back, img)
    assert geo2.matches(geo, tol=1e-5)
    assert geo2.shape == (9, 30, 26) and geo2.array_spacing == pytest.approx((4.0, 0.9, 1.3))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temporary files left"


def test_labels_written_as_small_integers(tmp_path):
    geo = geometry_2d()
    lab = torch.zeros(1, 1, *geo.shape, dtype=torch.int64)
    lab[..., 5:20, 3:9] = 3
    write_image(lab, geo, tmp_path / "lab.nii.gz")
    img = sitk.ReadImage(str(tmp_path / "lab.nii.gz"))
    assert img.GetPixelID() == sitk.sitkUInt8
    back, geo2 = read_labels(tmp_path / "lab.nii.gz")
    assert back.dtype == torch.int64 and torch.equal(back, lab) and geo2.matches(geo)


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.nii.gz")
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match="cannot read"):
        read_image(bad)
    vec = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "vec.nii.gz"))
    with pytest.raises(ValueError, match="components"):
        read_image(tmp_path / "vec.nii.gz")
    write_image(torch.full((1, 1, 4, 5), 0.5), Geometry.default((4, 5)), tmp_path / "f.nii.gz")
    with pytest.raises(ValueError, match="non-integer"):
        read_labels(tmp_path / "f.nii.gz")


def test_write_is_atomic_on_failure(tmp_path):
    geo = Geometry.default((4, 5, 6))
    with pytest.raises(OSError):
        write_image(torch.zeros(1, 1, 4, 5, 6), geo, tmp_path / "out.notaformat")
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        write_image(torch.zeros(1, 1, 4, 5, 6), geo, tmp_path / "nope" / "out.nii.gz")
    with pytest.raises(ValueError, match="does not match"):
        write_image(torch.zeros(1, 1, 4, 5, 7), geo, tmp_path / "out.nii.gz")
    assert os.listdir(tmp_path) == []


def test_resample_to_other_grid_through_physical_space():
    fixed = geometry_3d()
    img = sine_image(fixed.shape)
    lab = (img > 0.5).long() * 2
    # The moving grid: cropped by 3 voxels along ITK x and 2 along z, origin moved to match.
    shift = np.array([3.0, 0.0, 2.0])
    origin = np.asarray(fixed.origin) + fixed.index_to_physical @ shift
    moving = Geometry(size=(fixed.size[0] - 3, fixed.size[1], fixed.size[2] - 2),
                      spacing=fixed.spacing, origin=tuple(origin), direction=fixed.direction)
    m_img = img[..., 2:, :, 3:].contiguous()
    m_lab = lab[..., 2:, :, 3:].contiguous()
    out = resample_to(m_img, fixed, geometry=moving)
    out_lab = resample_to(m_lab, fixed, geometry=moving, label=True)
    assert out.shape == img.shape and out_lab.dtype == torch.int64
    assert torch.allclose(out[..., 2:, :, 3:], m_img, atol=1e-5)
    assert torch.equal(out_lab[..., 2:, :, 3:], m_lab)
    assert float(out[..., :2, :, :].abs().max()) == 0.0  # outside the moving extent
    with pytest.raises(ValueError, match="2D"):
        resample_to(torch.zeros(1, 1, 5, 6), fixed, geometry=Geometry.default((5, 6)))


# -- displacement fields -----------------------------------------------------------------------


def test_constant_shift_is_a_physical_vector():
    geo = geometry_3d()
    d = torch.zeros(1, 3, *geo.shape)
    d[:, 2] = 1.0  # one voxel along array axis 2 = ITK index axis x
    d[:, 0] = -2.0  # two voxels back along array axis 0 = ITK z
    field = displacement_to_itk(d, geo)
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    assert Geometry.from_sitk(field).matches(geo)
    v = np.asarray(field.GetPixel(0, 0, 0))
    m = geo.index_to_physical
    assert np.allclose(v, 1.0 * m[:, 0] - 2.0 * m[:, 2])


@pytest.mark.parametrize("ndim", [3, 2])
def test_displacement_to_itk_reproduces_warp(ndim, tmp_path):
    """sitk.Resample with DisplacementFieldTransform(field) == our warp (non-trivial field)."""
    geo = geometry_3d() if ndim == 3 else geometry_2d()
    img = sine_image(geo.shape)
    d = sine_field(geo.shape)
    assert float(d.abs().max()) > 1.5
    ours = warp(img, d)[0, 0].numpy()
    assert np.abs(ours - img[0, 0].numpy()).max() > 0.1  # the field does move things

    field = displacement_to_itk(d, geo)
    write_image(field, None, tmp_path / "disp.nii.gz")  # through a file, as a user would
    field = sitk.ReadImage(str(tmp_path / "disp.nii.gz"))
    transform = sitk.DisplacementFieldTransform(field)
    moving = to_sitk(img.double(), geo)
    theirs = sitk.GetArrayFromImage(
        sitk.Resample(moving, geo.reference_image(), transform, sitk.sitkLinear, 0.0,
                      sitk.sitkFloat64)
    )
    inside = _inside(geo.shape, d)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(theirs[inside], ours[inside], atol=1e-4)


def test_itk_to_displacement_inverts(tmp_path):
    for geo in (geometry_3d(), geometry_2d()):
        d = sine_field(geo.shape)
        field = displacement_to_itk(d, geo)
        assert torch.allclose(itk_to_displacement(field), d, atol=1e-5)
        write_image(field, None, tmp_path / "d.nii.gz")
        assert torch.allclose(itk_to_displacement(tmp_path / "d.nii.gz", geo), d, atol=1e-5)
    with pytest.raises(ValueError):
        displacement_to_itk(torch.zeros(1, 3, 4, 4, 4), geometry_3d())


# -- TorchIO -----------------------------------------------------------------------------------


def test_torchio_matches_torchio_reading_our_file(tmp_path):
    tio = pytest.importorskip("torchio")
    geo = geometry_3d()
    img = sine_image(geo.shape)
    write_image(img, geo, tmp_path / "img.nii.gz")
    ref = tio.ScalarImage(tmp_path / "img.nii.gz")
    ours = to_torchio(img, geo)
    assert ours.shape == (1, 26, 30, 9)  # (C, W, H, D)
    assert np.allclose(ours.affine, ref.affine, atol=1e-5)
    assert torch.allclose(ours.data, ref.data)
    assert ours.spacing == pytest.approx(ref.spacing)

    back, geo2 = from_torchio(ref)
    assert torch.equal(back, img) and geo2.matches(geo, tol=1e-5)
    assert geo2.array_spacing == pytest.approx((4.0, 0.9, 1.3))

    lab = (img > 0.5).long()
    labmap = to_torchio(lab, geo.ras_affine(), label=True)
    assert isinstance(labmap, tio.LabelMap)
    subject = tio.Subject(image=ours, labels=labmap)
    out = from_torchio(subject)
    assert torch.equal(out["labels"][0], lab) and out["labels"][0].dtype == torch.int64
    assert out["image"][1].matches(geo, tol=1e-5)


def test_torchio_2d(tmp_path):
    tio = pytest.importorskip("torchio")
    geo = geometry_2d()
    img = sine_image(geo.shape)
    write_image(img, geo, tmp_path / "img.nii.gz")
    ref = tio.ScalarImage(tmp_path / "img.nii.gz")
    ours = to_torchio(img, geo)
    assert ours.shape == ref.shape == (1, 28, 34, 1)
    assert np.allclose(ours.affine, ref.affine) and torch.allclose(ours.data, ref.data)
    back, geo2 = from_torchio(ours)
    assert torch.equal(back, img) and geo2.matches(geo, tol=1e-6)


def test_register_accepts_torchio_images_and_subjects_the_module_tensors_only():
    tio = pytest.importorskip("torchio")
    import nadmm_torch as nt
    from nadmm_torch.data import load_sample

    s = load_sample()
    geo = Geometry(size=tuple(reversed(s.fixed.shape[2:])), spacing=tuple(reversed(s.spacing)),
                   origin=(5.0, -3.0, 20.0), direction=tuple(np.eye(3).ravel()))
    fixed, moving = to_torchio(s.fixed, geo), to_torchio(s.moving, geo)
    expected = nt.register(s.fixed, s.moving, spacing=s.spacing, iterations=2, warps=2)
    kw = dict(iterations=2, warps=2)
    from_images = nt.register(fixed, moving, **kw)  # spacing taken from the images
    subject = tio.Subject(fixed=fixed, moving=moving)
    from_subject = nt.register(subject, **kw)
    torch.testing.assert_close(from_images, expected)
    torch.testing.assert_close(from_subject, expected)
    with pytest.raises(TypeError, match=r"^fixed: expected a torch.Tensor, got Subject; TorchIO "
                                        r".*nadmm_torch.register.*unpack_torchio_pair"):
        nt.NADMMRegistration(**kw)(subject)
    with pytest.raises(TypeError, match=r"^moving: expected a torch.Tensor, got ScalarImage"):
        nt.NADMMRegistration(**kw)(s.fixed, moving)
    warped = to_torchio(nt.warp(s.moving, from_images), geo)
    np.testing.assert_allclose(warped.affine, fixed.affine)
    with pytest.raises(ValueError, match="tio.Subject has no image"):
        nt.register(tio.Subject(a=fixed, b=moving))
