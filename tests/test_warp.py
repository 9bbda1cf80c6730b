import pytest
import torch

import nadmm_torch as nt
from nadmm_torch.ops.diff import jacobian_determinant, spatial_gradient
from nadmm_torch.ops.warp import compose, resize_displacement, warp_labels


@pytest.mark.parametrize("shape", [(9, 11), (5, 7, 6)])
def test_zero_displacement_is_the_identity(shape):
    img = torch.rand(2, 3, *shape, dtype=torch.float64)
    zero = torch.zeros(2, len(shape), *shape, dtype=torch.float64)
    torch.testing.assert_close(nt.warp(img, zero), img, rtol=0, atol=1e-12)
    d = torch.randn(2, len(shape), *shape, dtype=torch.float64)
    torch.testing.assert_close(compose(d, zero), d, rtol=0, atol=1e-12)
    torch.testing.assert_close(compose(zero, d), d, rtol=0, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_integer_translation_is_exact(axis):
    img = torch.rand(1, 1, 6, 7, 8, dtype=torch.float64)
    d = torch.zeros(1, 3, 6, 7, 8, dtype=torch.float64)
    d[:, axis] = 2.0
    out = nt.warp(img, d)
    n = img.shape[2 + axis]
    torch.testing.assert_close(out.narrow(2 + axis, 0, n - 2), img.narrow(2 + axis, 2, n - 2))
    labels = torch.randint(0, 4, (1, 1, 6, 7, 8))
    moved = nt.warp(labels, d, mode="nearest")
    assert moved.dtype == labels.dtype
    assert torch.equal(moved.narrow(2 + axis, 0, n - 2), labels.narrow(2 + axis, 2, n - 2))
    assert torch.equal(warp_labels(labels, d).narrow(2 + axis, 0, n - 2),
                       labels.narrow(2 + axis, 2, n - 2))


def test_composition_of_translations_adds():
    d1 = torch.full((1, 2, 8, 8), 0.5, dtype=torch.float64)
    d2 = torch.full((1, 2, 8, 8), 1.25, dtype=torch.float64)
    torch.testing.assert_close(compose(d1, d2), d1 + d2)


def test_gradient_and_jacobian_of_linear_fields():
    z, y, x = torch.meshgrid(*[torch.arange(6.0, dtype=torch.float64)] * 3, indexing="ij")
    img = (2 * z + 3 * y - x)[None, None]
    g = spatial_gradient(img)[0, 0]
    torch.testing.assert_close(g[:, 1:-1, 1:-1, 1:-1],
                               torch.tensor([2.0, 3.0, -1.0], dtype=torch.float64)
                               .view(3, 1, 1, 1).expand(3, 4, 4, 4))
    g_mm = spatial_gradient(img, spacing=(2.0, 1.0, 0.5))[0, 0]
    torch.testing.assert_close(g_mm[0], g[0] / 2.0)
    # d = A x  =>  det(I + A) everywhere (interior and, for linear fields, borders too)
    a = torch.tensor([[0.1, 0.2, 0.0], [0.0, -0.3, 0.1], [0.05, 0.0, 0.2]], dtype=torch.float64)
    coords = torch.stack([z, y, x])
    d = torch.einsum("ij,j...->i...", a, coords)[None]
    det = jacobian_determinant(d)[0, 1:-1, 1:-1, 1:-1]
    torch.testing.assert_close(det, torch.linalg.det(torch.eye(3, dtype=torch.float64) + a)
                               .expand_as(det))


def test_resize_displacement_rescales_voxel_units():
    d = torch.ones(1, 2, 8, 8)
    up = resize_displacement(d, (16, 8))
    torch.testing.assert_close(up[:, 0], torch.full((1, 16, 8), 2.0))
    torch.testing.assert_close(up[:, 1], torch.full((1, 16, 8), 1.0))


def test_warp_rejects_bad_input():
    img = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="displacement"):
        nt.warp(img, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="displacement"):
        nt.warp(img, torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match="mode"):
        nt.warp(img, torch.zeros(1, 2, 8, 8), mode="cubic")
    with pytest.raises(ValueError, match="non-finite"):
        nt.warp(img, torch.full((1, 2, 8, 8), float("nan")))
    with pytest.raises(TypeError, match="nearest"):
        nt.warp(torch.ones(1, 1, 8, 8, dtype=torch.long), torch.zeros(1, 2, 8, 8))
