"""Applying saved transforms: nt.apply, io.read_displacement and nadmm-apply.

The file-level tests run nadmm-register on small files cut from the bundled sample, then
nadmm-apply on the same inputs, and compare with what nadmm-register wrote and with
SimpleITK's ``Resample``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import nadmm_torch as nt
from nadmm_torch import apply_cli, cli
from nadmm_torch.io import (
    Geometry,
    displacement_to_itk,
    read_displacement,
    resample_to,
    write_affine,
    write_image,
)
from nadmm_torch.ops.warp import identity_grid

FAST = ["--set", "iterations=2", "--set", "warps=2"]


# -- data ------------------------------------------------------------------------------------


def _pair():
    """(fixed, moving, fixed_labels, moving_labels, spacing): the bundled sample, 64 x 64
    in-plane around the heart."""
    from nadmm_torch.data.sample import load_sample

    s = load_sample()
    crop = (..., slice(32, 96), slice(32, 96))
    return (s.fixed[crop].contiguous(), s.moving[crop].contiguous(),
            s.fixed_labels[crop].contiguous(), s.moving_labels[crop].contiguous(),
            tuple(float(v) for v in s.spacing))


def _geometry(shape, spacing) -> Geometry:
    """Rotated 90 degrees in-plane, slice axis flipped, non-zero origin."""
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    return Geometry(size=tuple(reversed(shape)), spacing=tuple(reversed(spacing)),
                    origin=(12.5, -40.0, 7.0), direction=tuple(direction.ravel()))


def _write(folder: Path, moving_grid: str = "same", one_slice: bool = False) -> dict[str, Path]:
    """fixed, moving, fixed_labels, moving_labels files. ``moving_grid="cropped"``: the moving
    files on another grid (4 voxels cropped each side in x, same physical points)."""
    f, m, fl, ml, spacing = _pair()
    if one_slice:
        k = int(torch.argmax((fl[0, 0] > 0).sum((1, 2))))
        f, m, fl, ml = (t[:, :, k:k + 1].contiguous() for t in (f, m, fl, ml))
    geo = _geometry(f.shape[2:], spacing)
    mgeo = geo
    if moving_grid == "cropped":
        origin = np.asarray(geo.origin) + geo.index_to_physical @ np.array([4.0, 0.0, 0.0])
        mgeo = Geometry(size=(geo.size[0] - 8, *geo.size[1:]), spacing=geo.spacing,
                        origin=tuple(origin), direction=geo.direction)
        m, ml = m[..., 4:-4].contiguous(), ml[..., 4:-4].contiguous()
    paths = {k: folder / f"{k}.nii.gz" for k in ("fixed", "moving", "fixed_labels",
                                                   "moving_labels")}
    for key, t, g in (("fixed", f, geo), ("fixed_labels", fl, geo), ("moving", m, mgeo),
                      ("moving_labels", ml, mgeo)):
        write_image(t, g, paths[key])
    return paths


def _register(paths, out: Path, capsys, *extra) -> dict:
    rc = cli.main([str(paths["fixed"]), str(paths["moving"]), "-o", str(out), *FAST,
                   "--moving-labels", str(paths["moving_labels"]), *map(str, extra)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads((out / "summary.json").read_text())


def _apply(capsys, *argv) -> tuple[int, str, str]:
    rc = apply_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _rand(*shape: int) -> torch.Tensor:
    """Uniform noise from a local generator (the global RNG state is left to other tests)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0))


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _in_itk_buffer(total: torch.Tensor) -> np.ndarray:
    """Voxels whose sampling point ``x + d(x)`` lies within half a voxel of the grid, where
    ITK's linear interpolator (not its extrapolator) answers. ``total``: (1, n, *S)."""
    shape = total.shape[2:]
    y = identity_grid(shape, torch.float64, "cpu") + total[0].double()
    n = torch.tensor(shape, dtype=torch.float64).view(-1, *([1] * len(shape)))
    return ((y >= -0.5) & (y <= n - 0.5)).all(0).numpy()


def _sitk_resample(moving: Path, fixed: Path, transform, labels: bool = False) -> np.ndarray:
    """SimpleITK's ``Resample`` with the nearest-neighbour extrapolator: linear for images,
    ``sitkLabelLinear`` for labels."""
    image = sitk.ReadImage(str(moving))
    interp, pixel = ((sitk.sitkLabelLinear, image.GetPixelID()) if labels
                     else (sitk.sitkLinear, sitk.sitkFloat64))
    out = sitk.Resample(image, sitk.ReadImage(str(fixed)), transform, interp, 0.0, pixel, True)
    return sitk.GetArrayFromImage(out)


def _field_transform(path: Path) -> sitk.DisplacementFieldTransform:
    return sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))


# -- nadmm-apply on nadmm-register's own outputs ----------------------------------------------


@pytest.mark.parametrize("moving_grid", ["same", "cropped"])
def test_apply_reproduces_the_cli_outputs(tmp_path, capsys, moving_grid):
    paths = _write(tmp_path, moving_grid)
    out = tmp_path / "out"
    summary = _register(paths, out, capsys)
    assert summary["moving_resampled_to_fixed_grid"] == (moving_grid == "cropped")
    disp = out / "displacement.nii.gz"
    rc, stdout, err = _apply(capsys, "--transform", disp, "--reference", paths["fixed"],
                             paths["moving"], "-o", tmp_path / "w.nii.gz")
    assert rc == 0, err
    assert ("resampled" in stdout) == (moving_grid == "cropped")
    rc, _, err = _apply(capsys, "-t", disp, "-r", paths["fixed"], paths["moving_labels"],
                        "-o", tmp_path / "wl.nii.gz", "--labels")
    assert rc == 0, err
    ours, theirs = _array(tmp_path / "w.nii.gz"), _array(out / "warped.nii.gz")
    assert np.abs(theirs - _array(paths["fixed"])).max() > 0.1  # the registration did move
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    lab_ours, lab_cli = _array(tmp_path / "wl.nii.gz"), _array(out / "warped_labels.nii.gz")
    assert lab_ours.dtype == lab_cli.dtype
    np.testing.assert_array_equal(lab_ours, lab_cli)
    # The output carries the reference's grid.
    assert Geometry.from_sitk(sitk.ReadImage(str(tmp_path / "w.nii.gz"))).matches(
        Geometry.from_sitk(sitk.ReadImage(str(paths["fixed"]))))


def test_apply_equals_simpleitk_resample(tmp_path, capsys):
    """nadmm-register's warped outputs = ``sitk.Resample`` with the displacement field and the
    nearest-neighbour extrapolator: images to float precision wherever the sampling point is
    within half a voxel of the grid (ITK interpolates there; beyond, its extrapolator takes the
    nearest voxel while warp clamps the point to the border and interpolates along it),
    labels (``sitkLabelLinear``) voxel for voxel."""
    paths = _write(tmp_path)
    out = tmp_path / "out"
    _register(paths, out, capsys)
    transform = _field_transform(out / "displacement.nii.gz")
    theirs = _sitk_resample(paths["moving"], paths["fixed"], transform)
    ours = _array(out / "warped.nii.gz")
    d, _ = read_displacement(out / "displacement.nii.gz")
    inside = _in_itk_buffer(d)
    assert inside.mean() > 0.85
    np.testing.assert_allclose(ours[inside], theirs[inside], rtol=0, atol=1e-5)
    labels = _sitk_resample(paths["moving_labels"], paths["fixed"], transform, labels=True)
    lab_ours = _array(out / "warped_labels.nii.gz")
    assert (lab_ours != _array(paths["moving_labels"])).mean() > 0.01  # labels did move
    np.testing.assert_array_equal(lab_ours, labels)


def test_apply_one_slice_volume_reads_the_nifti_field(tmp_path, capsys):
    """A one-slice field in NIfTI reads as 2D in ITK; with the reference it is read as 3D."""
    paths = _write(tmp_path, one_slice=True)
    out = tmp_path / "out"
    _register(paths, out, capsys)
    for name in ("displacement.nii.gz", "displacement.mha"):
        rc, _, err = _apply(capsys, "-t", out / name, "-r", paths["fixed"],
                            paths["moving_labels"], "-o", tmp_path / "wl.nii.gz", "--labels")
        assert rc == 0, err
        np.testing.assert_array_equal(_array(tmp_path / "wl.nii.gz"),
                                      _array(out / "warped_labels.nii.gz"))
    with pytest.raises(ValueError, match="one-slice"):
        read_displacement(out / "displacement.nii.gz")
    d, geo = read_displacement(out / "displacement.nii.gz", reference=paths["fixed"])
    assert d.shape == (1, 3, 1, 64, 64) and geo.ndim == 3
    assert float(d[:, 0].abs().max()) == 0.0 and float(d.abs().max()) > 0.5


def test_affine_alone_and_the_refused_double_affine(tmp_path, capsys):
    """With ``--affine``, nadmm-register's displacement already holds the affine: the
    displacement alone reproduces its outputs, the affine alone gives the affine stage, and
    the two of one run together are refused."""
    paths = _write(tmp_path)
    out = tmp_path / "out"
    summary = _register(paths, out, capsys, "--affine", "ncc")
    A = torch.tensor(summary["metrics"]["affine_voxel_matrix"], dtype=torch.float64)[None]
    assert float((A[0, :, :3] - torch.eye(3, dtype=A.dtype)).abs().max()) > 1e-3
    rc, _, err = _apply(capsys, "-t", out / "displacement.nii.gz", "-r", paths["fixed"],
                        paths["moving"], "-o", tmp_path / "w.nii.gz")
    assert rc == 0, err
    np.testing.assert_allclose(_array(tmp_path / "w.nii.gz"), _array(out / "warped.nii.gz"),
                               rtol=0, atol=1e-5)
    rc, _, err = _apply(capsys, "-a", out / "affine.tfm", "-r", paths["fixed"],
                        paths["moving"], "-o", tmp_path / "wa.nii.gz")
    assert rc == 0, err
    moving = torch.from_numpy(_array(paths["moving"]).astype(np.float32))[None, None]
    stage = nt.warp(moving, nt.affine_to_displacement(A, moving.shape[2:]).float())
    np.testing.assert_allclose(_array(tmp_path / "wa.nii.gz"), stage[0, 0].numpy(), atol=1e-5)
    theirs = _sitk_resample(paths["moving"], paths["fixed"],
                            sitk.ReadTransform(str(out / "affine.tfm")))
    inside = _in_itk_buffer(nt.affine_to_displacement(A, moving.shape[2:]))
    np.testing.assert_allclose(_array(tmp_path / "wa.nii.gz")[inside], theirs[inside],
                               atol=1e-5)
    rc, _, err = _apply(capsys, "-t", out / "displacement.nii.gz", "-a", out / "affine.tfm",
                        "-r", paths["fixed"], paths["moving"], "-o", tmp_path / "x.nii.gz")
    assert rc == 2 and "already includes the affine" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.nii.gz").exists()


def _smooth_field(shape, amplitude=2.0) -> torch.Tensor:
    axes = torch.meshgrid(*[torch.linspace(0, 1, n, dtype=torch.float64) for n in shape],
                          indexing="ij")
    z, y, x = axes
    return torch.stack([0.3 * torch.sin(math.pi * y) * torch.sin(math.pi * x),
                        amplitude * torch.sin(math.pi * x) * torch.sin(math.pi * y),
                        -amplitude * torch.sin(2 * math.pi * y) * torch.sin(math.pi * x)])[None]


def _small_affine(ndim: int = 3) -> torch.Tensor:
    """A rotation by 4 degrees in the (y, x) plane, a 3 % scaling and a shift, in voxels."""
    c, s = math.cos(math.radians(4)), math.sin(math.radians(4))
    A = torch.zeros(1, ndim, ndim + 1, dtype=torch.float64)
    A[0, :, :ndim] = torch.eye(ndim, dtype=torch.float64)
    A[0, -2:, -3:-1] = 1.03 * torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    A[0, :, ndim] = torch.tensor([0.2, -1.5, 2.0][-ndim:], dtype=torch.float64)
    return A


def test_displacement_then_affine_equals_simpleitk_composite(tmp_path, capsys):
    """``--transform D --affine A`` samples the moving image at ``A(x + d(x))``, as
    ``sitk.CompositeTransform([A, D])`` (and ``antsApplyTransforms -t D -t A``) do."""
    f, m, _, _, spacing = _pair()
    geo = _geometry(f.shape[2:], spacing)
    write_image(f, geo, tmp_path / "fixed.nii.gz")
    write_image(m, geo, tmp_path / "moving.nii.gz")
    d, A = _smooth_field(geo.shape), _small_affine()
    write_image(displacement_to_itk(d, geo), None, tmp_path / "disp.nii.gz")
    write_affine(A, geo, tmp_path / "affine.tfm")
    rc, _, err = _apply(capsys, "-t", tmp_path / "disp.nii.gz", "-a", tmp_path / "affine.tfm",
                        "-r", tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz",
                        "-o", tmp_path / "w.nii.gz")
    assert rc == 0, err
    composite = sitk.CompositeTransform([sitk.ReadTransform(str(tmp_path / "affine.tfm")),
                                         _field_transform(tmp_path / "disp.nii.gz")])
    theirs = _sitk_resample(tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz", composite)
    ours = _array(tmp_path / "w.nii.gz")
    inside = _in_itk_buffer(nt.transforms.total_displacement(geo.shape, d, A))
    assert inside.mean() > 0.7
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=1e-4)
    # and not the other order (A first, then d)
    other = sitk.CompositeTransform([_field_transform(tmp_path / "disp.nii.gz"),
                                     sitk.ReadTransform(str(tmp_path / "affine.tfm"))])
    wrong = _sitk_resample(tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz", other)
    assert np.abs(wrong[inside] - ours[inside]).max() > 0.05


# -- nt.apply ---------------------------------------------------------------------------------


def _ramp(shape, weights=(0.3, -0.7, 1.1)) -> torch.Tensor:
    """A linear image: (bi/tri)linear interpolation reproduces it exactly inside the grid."""
    x = identity_grid(shape, torch.float64, "cpu")
    w = torch.tensor(weights[-len(shape):], dtype=torch.float64).view(-1, *([1] * len(shape)))
    return (x * w).sum(0)[None, None]


def test_apply_combinations_known_answer():
    shape = (6, 20, 24)
    image = _ramp(shape)
    d, A = _smooth_field(shape, amplitude=1.5), _small_affine()
    x = identity_grid(shape, torch.float64, "cpu")[None]

    def ramp_at(points):  # the ramp evaluated at continuous voxel coordinates (1, 3, *S)
        w = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64).view(1, 3, 1, 1, 1)
        return (points * w).sum(1, keepdim=True)

    def affine_of(points):
        return torch.einsum("ij,bj...->bi...", A[0, :, :3], points) + A[0, :, 3].view(1, 3, 1,
                                                                                       1, 1)

    n = torch.tensor(shape, dtype=torch.float64).view(1, 3, 1, 1, 1)
    for result, points in ((nt.apply(image, d), x + d),
                           (nt.apply(image, affine=A), affine_of(x)),
                           (nt.apply(image, d, affine=A), affine_of(x + d))):
        inside = ((points >= 0) & (points <= n - 1)).all(1, keepdim=True)
        assert inside.float().mean() > 0.6
        torch.testing.assert_close(result[inside], ramp_at(points)[inside], rtol=0, atol=1e-9)
    assert torch.equal(nt.apply(image, d), nt.warp(image, d))


def test_apply_batches_labels_and_broadcast():
    shape = (16, 18)
    g = identity_grid(shape, torch.float32, "cpu")
    labels = ((g[0] - 8) ** 2 + (g[1] - 9) ** 2 < 25).long()[None, None] * 3
    d = 1.5 * torch.stack([torch.sin(g[1] / 5), torch.cos(g[0] / 4)])[None]
    A = _small_affine(2).float()
    batch = labels.expand(3, 1, *shape)
    out = nt.apply(batch, d, affine=A, labels=True)
    one = nt.apply(labels, d, affine=A, labels=True)
    assert out.shape == (3, 1, *shape) and out.dtype == labels.dtype
    assert all(torch.equal(out[i:i + 1], one) for i in range(3))
    assert set(torch.unique(out).tolist()) <= {0, 3} and not torch.equal(one, labels)
    total = nt.transforms.total_displacement(shape, d, A)
    assert torch.equal(one, nt.warp_labels(labels, total))


def test_apply_rejects_bad_input():
    image, d = _rand(1, 1, 8, 8), torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match="neither"):
        nt.apply(image)
    with pytest.raises(TypeError, match="image"):
        nt.apply(image.numpy(), d)
    with pytest.raises(ValueError, match="affine"):
        nt.apply(image, affine=torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="affine"):
        nt.apply(image, affine=torch.full((1, 2, 3), float("nan")))
    with pytest.raises(ValueError, match="displacement"):
        nt.apply(image, torch.zeros(1, 2, 8, 9))
    with pytest.raises(TypeError, match="labels"):
        nt.apply(image, d, labels=True)
    A = _small_affine(2)
    with pytest.raises(ValueError, match="displacement"):
        nt.apply(image, torch.zeros(1, 2, 8, 9), affine=A)
    with pytest.raises(TypeError, match="displacement"):
        nt.apply(image, d.numpy(), affine=A)


# -- io.read_displacement ---------------------------------------------------------------------


def test_read_displacement_onto_another_reference_grid(tmp_path):
    """A field read onto another grid behaves as ITK's DisplacementFieldTransform there."""
    f, m, *_, spacing = _pair()
    geo = _geometry(f.shape[2:], spacing)
    d = _smooth_field(geo.shape)
    write_image(displacement_to_itk(d, geo), None, tmp_path / "disp.nii.gz")
    back, g = read_displacement(tmp_path / "disp.nii.gz")
    assert g.matches(geo) and back.dtype == torch.float32
    torch.testing.assert_close(back.double(), d, rtol=0, atol=1e-5)
    write_image(f, geo, tmp_path / "fixed.nii.gz")
    for ref in (geo, tmp_path / "fixed.nii.gz", sitk.ReadImage(str(tmp_path / "disp.nii.gz"))):
        torch.testing.assert_close(read_displacement(tmp_path / "disp.nii.gz", ref)[0], back)
    # A finer, shifted in-plane grid over the same region.
    ref = Geometry(size=(80, 72, geo.size[2]), spacing=(1.2, 1.3, geo.spacing[2]),
                   origin=tuple(np.asarray(geo.origin) + geo.direction_matrix @ [0.7, -0.4, 0]),
                   direction=geo.direction)
    d_ref, g_ref = read_displacement(tmp_path / "disp.nii.gz", reference=ref)
    assert g_ref.matches(ref) and d_ref.shape == (1, 3, *ref.shape)
    write_image(m, geo, tmp_path / "moving.nii.gz")
    moving_on_ref = resample_to(m, ref, geometry=geo)
    ours = nt.warp(moving_on_ref, d_ref)[0, 0].numpy()
    theirs = sitk.GetArrayFromImage(sitk.Resample(
        sitk.ReadImage(str(tmp_path / "moving.nii.gz")), ref.reference_image(),
        _field_transform(tmp_path / "disp.nii.gz"), sitk.sitkLinear, 0.0, sitk.sitkFloat64))
    # Away from the edges the two differ only by resampling the moving image first.
    core = (slice(1, -1), slice(6, -6), slice(6, -6))
    err = np.abs(ours[core] - theirs[core])
    assert np.median(err) < 0.01 * float(np.abs(theirs).max()) and err.max() < 0.2


def test_read_displacement_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_displacement(tmp_path / "nope.nii.gz")
    write_image(_rand(1, 1, 4, 5, 6), Geometry.default((4, 5, 6)), tmp_path / "s.nii.gz")
    with pytest.raises(ValueError, match="not a displacement field"):
        read_displacement(tmp_path / "s.nii.gz")
    write_image(displacement_to_itk(torch.zeros(1, 3, 4, 5, 6), Geometry.default((4, 5, 6))),
                None, tmp_path / "d.nii.gz")
    with pytest.raises(TypeError, match="reference"):
        read_displacement(tmp_path / "d.nii.gz", reference=3)
    with pytest.raises(ValueError, match="2D"):
        read_displacement(tmp_path / "d.nii.gz", reference=Geometry.default((5, 6)))


# -- nadmm-apply errors -----------------------------------------------------------------------


def test_nadmm_apply_errors_are_one_line(tmp_path, capsys):
    geo = Geometry.default((4, 10, 12), (3.0, 1.0, 1.0))
    img, ref = tmp_path / "img.nii.gz", tmp_path / "ref.nii.gz"
    write_image(_rand(1, 1, 4, 10, 12), geo, img)
    write_image(_rand(1, 1, 4, 10, 12), geo, ref)
    write_image(displacement_to_itk(torch.zeros(1, 3, 4, 10, 12), geo), None,
                tmp_path / "d.nii.gz")
    out = tmp_path / "o.nii.gz"
    cases = [
        (2, "expected --transform, --affine", ["-r", ref, img, "-o", out]),
        (2, "required", ["-t", tmp_path / "d.nii.gz", img, "-o", out]),
        (2, "unrecognized", ["-t", tmp_path / "d.nii.gz", "-r", ref, img, "-o", out, "--x"]),
        (2, "is the input file", ["-t", tmp_path / "d.nii.gz", "-r", ref, img, "-o", img]),
        (1, "missing.nii.gz", ["-t", tmp_path / "missing.nii.gz", "-r", ref, img, "-o", out]),
        (1, "no such folder", ["-t", tmp_path / "d.nii.gz", "-r", ref, img,
                               "-o", tmp_path / "none" / "o.nii.gz"]),
        (1, "img.nii.gz", ["-t", tmp_path / "d.nii.gz", "-r", ref, img, "-o", out, "--labels"]),
        (1, "not a displacement field", ["-t", ref, "-r", ref, img, "-o", out]),
        (1, "affine", ["-a", tmp_path / "d.nii.gz", "-r", ref, img, "-o", out]),
    ]
    for status, text, argv in cases:
        rc, _, err = _apply(capsys, *argv)
        assert rc == status, (argv, err)
        assert err.startswith("nadmm-apply: error: ") and text in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    rc, stdout, err = _apply(capsys, "-t", tmp_path / "d.nii.gz", "-r", ref, img, "-o", out,
                             "-q")
    assert rc == 0 and stdout == "" and err == ""
    np.testing.assert_array_equal(_array(out), _array(img))  # the zero field moves nothing
    assert _apply(capsys, "--help")[0] == 0


def test_inverse_field_brings_the_warped_image_back(tmp_path, capsys):
    """The inverse of nadmm-register's displacement (``nt.invert``), written as an ITK field
    on the fixed grid and applied with the moving image as the reference, maps the warped image
    back onto the moving image (how ``--inverse`` fields are meant to be used)."""
    paths = _write(tmp_path)
    out = tmp_path / "out"
    _register(paths, out, capsys)
    d, geo = read_displacement(out / "displacement.nii.gz")
    write_image(displacement_to_itk(nt.invert(d), geo), None, tmp_path / "inverse.nii.gz")
    rc, _, err = _apply(capsys, "-t", tmp_path / "inverse.nii.gz", "-r", paths["moving"],
                        out / "warped.nii.gz", "-o", tmp_path / "back.nii.gz")
    assert rc == 0, err
    moving, warped = _array(paths["moving"]), _array(out / "warped.nii.gz")
    back = _array(tmp_path / "back.nii.gz")
    core = (slice(1, -1), slice(8, -8), slice(8, -8))
    before = np.abs(warped - moving)[core].mean()
    after = np.abs(back - moving)[core].mean()
    assert after < 0.5 * before, (before, after)  # 0.080 -> 0.027 when written
