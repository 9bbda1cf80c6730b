"""The affine stage: coordinates, known-answer recovery, batching, gradients, validation."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import nadmm_torch as nt
from nadmm_torch.data import load_sample
from nadmm_torch.io import Geometry, itk_to_affine, to_sitk, write_affine, write_image
from nadmm_torch.ops.affine import (
    affine_to_displacement,
    inside_mask,
    matrix_to_params,
    mi_loss,
    ncc_loss,
    params_to_matrix,
)
from nadmm_torch.ops.warp import identity_grid, sample, warp


def _homogeneous(A: torch.Tensor) -> torch.Tensor:
    n = A.shape[1]
    full = torch.eye(n + 1, dtype=A.dtype).repeat(A.shape[0], 1, 1)
    full[:, :n] = A
    return full


def _known_affine(ndim: int, shape, degrees=4.0, scale=(1.05, 0.96, 1.02), shear=0.03,
                  shift=(2.5, -3.0, 1.5)) -> torch.Tensor:
    """``(1, n, n + 1)`` float64: a rotation (in the last two axes) + scale + shear + shift
    (voxels) about the grid centre."""
    a = math.radians(degrees)
    rot = torch.eye(ndim, dtype=torch.float64)
    rot[-2:, -2:] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    lin = rot @ torch.diag(torch.tensor(scale[:ndim], dtype=torch.float64))
    lin[0, 1] += shear
    c = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64)
    t = torch.tensor(shift[:ndim], dtype=torch.float64)
    return torch.cat([lin, (c + t - lin @ c)[:, None]], 1)[None]


def _moving_for(fixed: torch.Tensor, A_true: torch.Tensor) -> torch.Tensor:
    """``moving(y) = fixed(A⁻¹ y)``, so that ``moving(A x) = fixed(x)``: ``A`` is the answer."""
    inv = torch.linalg.inv(_homogeneous(A_true))[:, :-1]
    shape = fixed.shape[2:]
    return warp(fixed.double(), affine_to_displacement(inv, shape)).to(fixed.dtype)


def _error(A: torch.Tensor, A_true: torch.Tensor, shape, margin=3) -> float:
    """Mean displacement error (voxels) over the fixed voxels that ``A_true`` keeps inside."""
    d = affine_to_displacement(A.double(), shape) - affine_to_displacement(A_true, shape)
    roi = inside_mask(A_true, shape, margin=margin)[:, 0].bool()
    return float(d.norm(dim=1)[roi].mean())


def _slice() -> tuple[torch.Tensor, tuple[float, float]]:
    s = load_sample()
    return s.fixed[:, :, s.fixed.shape[2] // 2], s.spacing[1:]


def _blobs(shape, n=12, seed=0) -> torch.Tensor:
    """A smooth synthetic volume: a sum of anisotropic Gaussian blobs, ``(1, 1, *shape)``."""
    g = torch.Generator().manual_seed(seed)
    grid = identity_grid(shape, torch.float64, torch.device("cpu"))
    out = torch.zeros(shape, dtype=torch.float64)
    size = torch.tensor(shape, dtype=torch.float64).view(-1, *([1] * len(shape)))
    for _ in range(n):
        centre = (0.2 + 0.6 * torch.rand(len(shape), generator=g, dtype=torch.float64))
        width = (0.06 + 0.1 * torch.rand(len(shape), generator=g, dtype=torch.float64))
        z = (grid / size - centre.view_as(size)) / width.view_as(size)
        out += (0.5 + torch.rand(1, generator=g).item()) * torch.exp(-0.5 * (z * z).sum(0))
    return out[None, None].float()


# -- coordinates -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 6)])
def test_affine_to_displacement_is_the_formula(shape):
    n = len(shape)
    A = torch.randn(2, n, n + 1, dtype=torch.float64)
    d = nt.affine_to_displacement(A, shape)
    x = identity_grid(shape, torch.float64, torch.device("cpu"))
    for b in range(2):
        expect = torch.einsum("ij,j...->i...", A[b, :, :n], x) + A[b, :, n].view(n, *[1] * n) - x
        torch.testing.assert_close(d[b], expect)
    eye = torch.cat([torch.eye(n), torch.zeros(n, 1)], 1)[None].double()
    assert nt.affine_to_displacement(eye, shape).abs().max() == 0
    A = torch.randn(1, n, n + 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: affine_to_displacement(a, shape), (A,))


def test_affine_displacement_warps_like_the_matrix():
    """Pull-back: warping with the displacement samples the moving image at ``A x``."""
    img = torch.rand(1, 1, 9, 10, dtype=torch.float64)
    A = torch.tensor([[[0.9, 0.1, 1.0], [-0.05, 1.1, 0.5]]], dtype=torch.float64)
    warped = nt.warp(img, nt.affine_to_displacement(A, (9, 10)))
    x = identity_grid((9, 10), torch.float64, torch.device("cpu")).flatten(1)
    y = A[:, :, :2] @ x + A[:, :, 2:]
    torch.testing.assert_close(warped.flatten(2), sample(img, y))


def test_params_round_trip_and_centre():
    shape, spacing = (12, 20, 16), (3.0, 1.0, 1.5)
    theta = 0.05 * torch.randn(2, 12, dtype=torch.float64)
    A = params_to_matrix(theta, shape, spacing)
    torch.testing.assert_close(matrix_to_params(A, shape, spacing), theta)
    # θ = 0 is the identity; a pure linear part keeps the grid centre fixed.
    zero = params_to_matrix(torch.zeros(1, 12, dtype=torch.float64), shape, spacing)
    torch.testing.assert_close(zero, torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)[None].double())
    theta[:, 9:] = 0
    A = params_to_matrix(theta, shape, spacing)
    c = torch.tensor([5.5, 9.5, 7.5], dtype=torch.float64)
    torch.testing.assert_close(A[:, :, :3] @ c + A[:, :, 3], c.expand(2, 3))
    # The linear part is physical: H⁻¹ (I + δ) H with H = diag(spacing).
    h = torch.tensor(spacing, dtype=torch.float64)
    lin = torch.eye(3, dtype=torch.float64) + theta[:, :9].view(2, 3, 3)
    torch.testing.assert_close(A[:, :, :3], lin * h / h[:, None])


def test_similarities_know_their_optimum():
    f = torch.rand(2, 1, 500, dtype=torch.float64)
    assert ncc_loss(f, 3 * f + 1).abs().max() < 1e-12
    assert (ncc_loss(f, torch.rand_like(f)) > 0.5).all()
    mi_self, mi_noise = mi_loss(f, f), mi_loss(f, torch.rand_like(f))
    assert (mi_self < mi_noise - 1.0).all()
    # MI of a one-to-one remapping is as high as of the image itself (to binning effects).
    assert (mi_loss(f, 1 - f) - mi_self).abs().max() < 0.1


# -- recovery ----------------------------------------------------------------------------------


@pytest.mark.parametrize("similarity", ["ncc", "mi"])
def test_recovers_a_known_affine_on_a_real_slice(similarity):
    fixed, spacing = _slice()
    A_true = _known_affine(2, fixed.shape[2:])
    moving = _moving_for(fixed, A_true)
    before = _error(torch.cat([torch.eye(2), torch.zeros(2, 1)], 1)[None], A_true, (128, 128))
    A = nt.affine(fixed, moving, spacing=spacing, similarity=similarity)
    assert A.shape == (1, 2, 3) and A.dtype == fixed.dtype
    assert before > 3.0
    assert _error(A, A_true, fixed.shape[2:]) < 0.1


def test_recovers_a_known_affine_on_a_volume():
    shape = (24, 28, 32)
    fixed = _blobs(shape)
    A_true = _known_affine(3, shape, degrees=5.0, shift=(1.5, -2.0, 2.5))
    moving = _moving_for(fixed, A_true)
    A = nt.affine(fixed, moving, spacing=(1.2, 1.0, 1.0))
    assert A.shape == (1, 3, 4)
    assert _error(A, A_true, shape) < 0.1


def test_recovers_a_known_affine_on_a_real_volume():
    """The bundled cardiac volume (7 slices of 10 mm, 1.5 mm in-plane): in-plane rotation and
    scale, a through-plane shear (up to ±2 slices) and shift; the thick axis is not pyramided."""
    s = load_sample()
    shape = tuple(s.fixed.shape[2:])
    A_true = _known_affine(3, shape, degrees=5.0, scale=(1.0, 1.05, 0.96), shift=(0.3, -3.0, 2.5))
    moving = _moving_for(s.fixed, A_true)
    A = nt.affine(s.fixed, moving, spacing=s.spacing)
    assert _error(A, A_true, shape, margin=1) < 0.1


def test_identity_pair_gives_the_identity():
    fixed, spacing = _slice()
    A = nt.affine(fixed, fixed.clone(), spacing=spacing, iterations=(20, 10, 5))
    d = nt.affine_to_displacement(A, fixed.shape[2:])
    assert d.abs().max() < 0.05


def test_batched_equals_one_by_one():
    fixed, spacing = _slice()
    fixed = fixed[:, :, ::2, ::2]
    movings = [_moving_for(fixed, _known_affine(2, (64, 64), degrees=deg, shift=sh))
               for deg, sh in ((3.0, (1.0, -2.0)), (-5.0, (-1.5, 0.5)))]
    kw = dict(spacing=spacing)
    batched = nt.affine(fixed.expand(2, -1, -1, -1), torch.cat(movings), **kw)
    one = torch.cat([nt.affine(fixed, m, **kw) for m in movings])
    torch.testing.assert_close(batched, one, rtol=0, atol=1e-4)


def test_register_with_affine_includes_it():
    fixed, spacing = _slice()
    fixed = fixed[:, :, ::2, ::2]
    A_true = _known_affine(2, (64, 64), degrees=6.0, shift=(3.0, -4.0))
    moving = _moving_for(fixed, A_true)
    d_true = affine_to_displacement(A_true, (64, 64)).float()
    roi = inside_mask(A_true, (64, 64), margin=3)[:, 0].bool()
    # With no deformable step (no warps) the result is the affine's displacement itself.
    d_affine = nt.register(fixed, moving, spacing=spacing, affine=True, warps=0)
    assert (d_affine - d_true).norm(dim=1)[roi].mean() < 0.1
    # One displacement: the deformable solver started from the affine.
    d = nt.register(fixed, moving, spacing=spacing, affine=True)
    A = nt.affine(fixed, moving, spacing=spacing)
    start = nt.affine_to_displacement(A, (64, 64))
    torch.testing.assert_close(d, nt.register(fixed, moving, spacing=spacing,
                                              initial_displacement=start))
    d_plain = nt.register(fixed, moving, spacing=spacing)
    err = (d - d_true).norm(dim=1)[roi].mean()
    # Measured with the default intensity scaling: 0.43 voxel from the affine start, 0.71 from
    # zero (the deformable steps after an exact affine drift somewhat on this cropped slice).
    assert err < 0.7 * (d_plain - d_true).norm(dim=1)[roi].mean()
    # Settings reach the affine stage.
    d_mi = nt.register(fixed, moving, spacing=spacing, affine={"similarity": "mi"}, warps=0)
    A_mi = nt.affine(fixed, moving, spacing=spacing, similarity="mi")
    torch.testing.assert_close(d_mi, nt.affine_to_displacement(A_mi, (64, 64)))


def test_gradient_through_the_optimum_matches_finite_differences():
    """Implicit-function gradient of the result vs re-running the optimisation (float64)."""
    fixed = _blobs((20, 22), n=6, seed=1).double()
    A_true = _known_affine(2, (20, 22), degrees=3.0, shift=(0.7, -0.4))
    moving = _moving_for(fixed, A_true)
    direction = _blobs((20, 22), n=4, seed=2).double()
    kw = dict(levels=1, iterations=100)
    moving_g = moving.clone().requires_grad_(True)
    A = nt.affine(fixed, moving_g, **kw)
    weights = torch.randn(A.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad((A * weights).sum(), moving_g)
    analytic = float((grad * direction).sum())
    eps = 1e-2
    plus = nt.affine(fixed, moving + eps * direction, **kw)
    minus = nt.affine(fixed, moving - eps * direction, **kw)
    numeric = float(((plus - minus) * weights).sum()) / (2 * eps)
    assert abs(numeric) > 1e-3
    assert abs(analytic - numeric) < 0.05 * abs(numeric)
    # Without grad, the same values and no graph.
    torch.testing.assert_close(A.detach(), nt.affine(fixed, moving, **kw))
    assert not nt.affine(fixed, moving, **kw).requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("similarity", ["ncc", "mi"])
def test_cuda_matches_cpu(similarity):
    fixed, spacing = _slice()
    A_true = _known_affine(2, fixed.shape[2:])
    moving = _moving_for(fixed, A_true)
    A_cpu = nt.affine(fixed, moving, spacing=spacing, similarity=similarity)
    A_gpu = nt.affine(fixed.cuda(), moving.cuda(), spacing=spacing, similarity=similarity)
    assert A_gpu.device.type == "cuda"
    assert _error(A_gpu.cpu(), A_true, fixed.shape[2:]) < 0.1
    d = nt.affine_to_displacement(A_gpu.cpu().double(), fixed.shape[2:])
    d_cpu = nt.affine_to_displacement(A_cpu.double(), fixed.shape[2:])
    assert (d - d_cpu).norm(dim=1).mean() < 0.05


# -- ITK transform files ----------------------------------------------------------------------


def _geometry(shape, spacing, degrees, origin):
    n = len(shape)
    a = math.radians(degrees)
    direction = np.eye(n)
    direction[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    return Geometry(
        size=tuple(reversed(shape)), spacing=tuple(reversed(spacing)),
        origin=tuple(origin[:n]), direction=tuple(direction.ravel().tolist()),
    )


@pytest.mark.parametrize("shape", [(20, 24), (12, 14, 16)])
def test_itk_transform_file_resamples_like_our_warp(tmp_path, shape):
    """``sitk.Resample`` with the written transform = our warp with the affine displacement."""
    n = len(shape)
    fixed_geo = _geometry(shape, (1.5, 1.0, 0.8)[:n], 20.0, (3.0, -7.0, 11.0))
    moving_shape = tuple(m + 2 for m in shape)
    moving_geo = _geometry(moving_shape, (1.2, 0.9, 1.1)[:n], -10.0, (-2.0, 4.0, 1.0))
    moving = _blobs(moving_shape, seed=4).double()
    g = torch.Generator().manual_seed(5)
    A = torch.cat([torch.eye(n), torch.zeros(n, 1)], 1)[None].double()
    A = A + 0.05 * torch.randn(A.shape, generator=g, dtype=torch.float64)
    A[:, :, n] += 1.0
    path = write_affine(A, fixed_geo, tmp_path / "affine.tfm", moving=moving_geo)
    transform = sitk.ReadTransform(str(path))
    out = sitk.Resample(to_sitk(moving, moving_geo), fixed_geo.reference_image(), transform,
                        sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    theirs = torch.from_numpy(sitk.GetArrayFromImage(out))
    # Our warp of the moving grid: sample the moving image at A x (its own voxel indices).
    x = identity_grid(shape, torch.float64, torch.device("cpu")).flatten(1)
    y = A[:, :, :n] @ x + A[:, :, n:]
    ours = sample(moving, y).view(shape)
    upper = torch.tensor(moving_shape, dtype=torch.float64)[None, :, None] - 1
    inside = ((y > 0.01) & (y < upper - 0.01)).all(1).view(shape)
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(theirs[inside], ours[inside], rtol=0, atol=1e-6)
    # And back: the file read into voxel coordinates is A.
    torch.testing.assert_close(itk_to_affine(path, fixed_geo, moving_geo), A)
    # Same grid: the displacement of nadmm_torch.warp.
    if n == 2:
        same = write_affine(A, fixed_geo, tmp_path / "same.tfm")
        img = _blobs(shape, seed=6).double()
        out = sitk.Resample(to_sitk(img, fixed_geo), fixed_geo.reference_image(),
                            sitk.ReadTransform(str(same)), sitk.sitkLinear, 0.0,
                            sitk.sitkFloat64)
        warped = nt.warp(img, nt.affine_to_displacement(A, shape))[0, 0]
        inside = inside_mask(A, shape, margin=0.01)[0, 0].bool()
        torch.testing.assert_close(torch.from_numpy(sitk.GetArrayFromImage(out))[inside],
                                   warped[inside], rtol=0, atol=1e-6)


def test_write_affine_refuses_a_wrong_matrix(tmp_path):
    geo = _geometry((10, 12), (1.0, 1.0), 0.0, (0.0, 0.0))
    with pytest.raises(ValueError, match="A: expected"):
        write_affine(torch.zeros(1, 3, 4), geo, tmp_path / "a.tfm")
    with pytest.raises(FileNotFoundError, match="folder"):
        write_affine(torch.zeros(1, 2, 3), geo, tmp_path / "missing" / "a.tfm")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("one_slice", [False, True])
def test_cli_affine_writes_a_transform_that_sitk_applies(tmp_path, one_slice):
    """``nadmm-register --affine``: affine.tfm resamples the moving image as our output does."""
    from nadmm_torch import cli

    fixed, spacing = _slice()
    fixed = fixed[:, :, 16:112, 8:120].contiguous()  # 96 x 112, non-square
    shape = tuple(fixed.shape[2:])
    A_true = _known_affine(2, shape, degrees=5.0, shift=(2.0, -3.0))
    moving = _moving_for(fixed, A_true)
    if one_slice:  # a 2D image stored as a one-slice volume is registered in 2D
        geo = _geometry((1, *shape), (8.0, *spacing), 30.0, (5.0, -3.0, 2.0))
        fixed, moving = fixed[:, :, None], moving[:, :, None]
    else:
        geo = _geometry(shape, spacing, 30.0, (5.0, -3.0))
    write_image(fixed, geo, tmp_path / "fixed.nii.gz")
    write_image(moving, geo, tmp_path / "moving.nii.gz")
    out = tmp_path / "out"
    argv = [str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o", str(out),
            "--affine", "-q", "--set", "warps=0"]  # no deformable step: the affine alone
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "affine.tfm" in summary["outputs"] and summary["settings"]["affine"] == "ncc"
    transform = sitk.ReadTransform(str(out / "affine.tfm"))
    moving_img = sitk.ReadImage(str(tmp_path / "moving.nii.gz"), sitk.sitkFloat64)
    fixed_img = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"))
    theirs = sitk.GetArrayFromImage(
        sitk.Resample(moving_img, fixed_img, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    ).squeeze()
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz"))).squeeze()
    inside = inside_mask(A_true, shape, margin=2)[0, 0].numpy().astype(bool)
    np.testing.assert_allclose(theirs[inside], ours[inside], rtol=0, atol=1e-4)
    # The transform is the known one (to the registration's accuracy), in voxel terms.
    A = itk_to_affine(transform, geo)
    if one_slice:
        torch.testing.assert_close(A[0, 0], torch.tensor([1.0, 0, 0, 0], dtype=A.dtype))
        A = A[:, 1:, 1:]
    assert _error(A, A_true, shape) < 0.1


def test_register_with_affine_is_differentiable():
    fixed = _blobs((24, 24), n=6, seed=7)
    moving = _moving_for(fixed, _known_affine(2, (24, 24), degrees=4.0, shift=(1.0, -1.0)))
    moving = moving.clone().requires_grad_(True)
    d = nt.register(fixed, moving, affine=True, iterations=2, warps=1)
    assert d.requires_grad
    (grad,) = torch.autograd.grad(d.pow(2).sum(), moving)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# -- validation --------------------------------------------------------------------------------


def test_bad_input_is_refused():
    f = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="similarity"):
        nt.affine(f, f, similarity="mse")
    with pytest.raises(ValueError, match="iterations"):
        nt.affine(f, f, iterations=(10, 10))
    with pytest.raises(ValueError, match="max_step"):
        nt.affine(f, f, max_step=-1.0)
    with pytest.raises(ValueError, match="levels"):
        nt.affine(f, f, levels=0)
    with pytest.raises(ValueError, match="init"):
        nt.affine(f, f, init="moments")
    with pytest.raises(ValueError, match="spacing"):
        nt.affine(f, f, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(TypeError, match="moving"):
        nt.affine(f, f.numpy())
    with pytest.raises(ValueError, match="moving"):
        nt.affine(f, torch.rand(1, 1, 16, 17))
    with pytest.raises(ValueError, match="A: expected a"):
        nt.affine_to_displacement(torch.zeros(1, 2, 2), (4, 4))
    with pytest.raises(ValueError, match="shape"):
        nt.affine_to_displacement(torch.zeros(1, 2, 3), (4, -4))
    with pytest.raises(TypeError, match="affine"):
        nt.register(f, f, affine="yes")
    with pytest.raises(ValueError, match="initial_displacement"):
        nt.register(f, f, affine=True, initial_displacement=torch.zeros(1, 2, 16, 16))
