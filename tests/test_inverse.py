"""The fixed-point inverse of a displacement (nadmm_torch.invert) and its residuals."""

from __future__ import annotations

import math

import pytest
import torch

import nadmm_torch as nt
from nadmm_torch.ops.inverse import inverse_residuals, invert
from nadmm_torch.ops.warp import compose, identity_grid


def _similarity(shape, angle_deg: float, scale: float, shift=(0.0, 0.0)):
    """``d`` of ``φ(x) = c + s R (x − c) + t`` on a 2D grid and the exact inverse's ``e``."""
    x = identity_grid(shape, torch.float64, "cpu")[None]
    c = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64).view(1, 2, 1, 1)
    a = math.radians(angle_deg)
    R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]],
                     dtype=torch.float64)
    t = torch.tensor(shift, dtype=torch.float64).view(1, 2, 1, 1)
    phi = c + scale * torch.einsum("ij,bj...->bi...", R, x - c) + t
    inv = c + torch.einsum("ij,bj...->bi...", R.T, x - c - t) / scale
    return phi - x, inv - x


def _smooth_3d(shape, amplitude: float) -> torch.Tensor:
    z, y, x = torch.meshgrid(*[torch.linspace(0, 1, n, dtype=torch.float64) for n in shape],
                             indexing="ij")
    return amplitude * torch.stack([
        0.2 * torch.sin(math.pi * y) * torch.sin(math.pi * x),
        torch.sin(math.pi * x) * torch.sin(2 * math.pi * y) * torch.cos(math.pi * z),
        -torch.sin(2 * math.pi * y) * torch.sin(math.pi * x),
    ])[None]


def test_inverse_of_rotation_and_expansion():
    """A 6-degree rotation with 5 % expansion and a shift: the inverse recovers the exact
    inverse map and both compositions are the identity to < 0.01 voxel in the interior
    (where every point involved stays on the grid)."""
    d, exact = _similarity((48, 56), 6.0, 1.05, shift=(0.7, -1.2))
    assert float(d.abs().max()) > 2.0
    e = invert(d)
    interior = (..., slice(8, -8), slice(8, -8))
    right, left = inverse_residuals(d, e)
    assert float(right[interior].max()) < 0.01 and float(left[interior].max()) < 0.01
    assert float((e - exact)[interior].abs().max()) < 0.01
    # not a residual that is small anyway: the uninverted field is far from it
    assert float(inverse_residuals(d, torch.zeros_like(d))[0][interior].mean()) > 1.0


def test_inverse_of_a_smooth_3d_field_converges():
    """``d ∘ d⁻¹`` is the residual the iteration drives to the tolerance; ``d⁻¹ ∘ d`` also
    carries the linear interpolation error of ``e`` between voxels (``e`` is exact only at
    voxel centres), so it is small but not that small."""
    d = _smooth_3d((10, 24, 28), amplitude=2.0)
    e = invert(d, tolerance=1e-4)
    right, left = inverse_residuals(d, e)
    assert float(right.max()) <= 1e-4  # the stopping rule, over the whole grid
    assert float(left.mean()) < 0.03 and float(left.max()) < 0.1 * float(d.norm(dim=1).max())
    # a few iterations leave a larger error: the iteration is doing the work
    few = inverse_residuals(d, invert(d, iterations=2, tolerance=0))[0]
    assert float(few.max()) > 10 * float(right.max())


@pytest.mark.parametrize("shape", [(7, 9), (3, 5, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_of_zero_is_zero_exactly(shape, dtype):
    d = torch.zeros(2, len(shape), *shape, dtype=dtype)
    e = invert(d, tolerance=0, iterations=5)
    assert torch.equal(e, d) and e.dtype == dtype


def test_inverse_of_a_translation_is_the_opposite_translation():
    d = torch.empty(1, 2, 10, 12, dtype=torch.float64)
    d[:, 0], d[:, 1] = 0.37, -1.6
    assert torch.equal(invert(d, step=1.0), -d)  # the plain iteration: exact in one step
    e = invert(d)  # damped: the error halves each step, until the tolerance
    assert float((e + d).abs().max()) <= 1e-3


def test_damping_converges_where_the_plain_iteration_cannot():
    """A local expansion by 2.6 along axis 0 (``∂d_0/∂x_0 = 1.6`` at the centre): the plain
    iteration multiplies the error by ``−∇d`` (−1.6 there) and diverges; the damped one
    (``step = 0.5``) by ``0.5 − 0.5 · 1.6 = −0.3``."""
    shape = (24, 26)
    x = identity_grid(shape, torch.float64, "cpu")
    d = torch.zeros(1, 2, *shape, dtype=torch.float64)
    d[0, 0] = 1.6 * (x[0] - 11.5) * torch.exp(-((x[1] - 12.5) / 6) ** 2)
    interior = (..., slice(6, -6), slice(6, -6))
    damped = inverse_residuals(d, invert(d, iterations=60, tolerance=0))[0]
    plain = inverse_residuals(d, invert(d, iterations=60, tolerance=0, step=1.0))[0]
    assert float(damped[interior].max()) < 1e-3
    assert float(plain[interior].max()) > 0.5


def test_batch_equals_one_by_one():
    """Samples that converge after different numbers of iterations give in a batch exactly
    what they give alone."""
    fields = [_similarity((20, 22), angle, scale)[0].float()
              for angle, scale in ((0.0, 1.0), (3.0, 1.02), (9.0, 0.93))]
    batch = torch.cat(fields)
    e = invert(batch, tolerance=1e-4)
    alone = [invert(f, tolerance=1e-4) for f in fields]
    for i, one in enumerate(alone):
        assert torch.equal(e[i:i + 1], one), i
    assert not torch.equal(alone[1], alone[2])


def test_gradcheck_float64():
    g = identity_grid((4, 5), torch.float64, "cpu")
    # generic values: no sampling point on a voxel centre, where linear interpolation has a
    # kink (one-sided derivatives) and finite differences disagree with autograd
    d = 0.13 + 0.3 * torch.stack([torch.sin(g[1] + 0.5), torch.cos(g[0] + g[1])])[None]
    d.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: invert(t, iterations=4, tolerance=0), (d,))
    g3 = identity_grid((3, 3, 4), torch.float64, "cpu")
    d3 = (0.11 + 0.2 * torch.sin(g3 + 0.3 * g3.flip(0) + 0.4))[None].requires_grad_()
    assert torch.autograd.gradcheck(lambda t: invert(t, iterations=3, tolerance=0), (d3,))


def test_residuals_are_the_compositions():
    d, exact = _similarity((16, 18), 5.0, 1.1)
    e = 0.5 * exact  # a poor inverse, so both residuals are large and different
    right, left = inverse_residuals(d, e)
    torch.testing.assert_close(right, compose(d, e).norm(dim=1))
    torch.testing.assert_close(left, compose(e, d).norm(dim=1))
    assert float((right - left).abs().max()) > 0.01


def test_exported_and_low_precision():
    assert nt.invert is invert
    d = _smooth_3d((4, 8, 8), 1.0).to(torch.bfloat16)
    e = nt.invert(d)
    assert e.dtype == torch.bfloat16
    torch.testing.assert_close(e.float(), invert(d.float()), rtol=0, atol=0.02)


def test_invert_rejects_bad_input():
    d = torch.zeros(1, 2, 4, 4)
    with pytest.raises(TypeError, match="displacement"):
        invert(d.numpy())
    with pytest.raises(ValueError, match="displacement"):
        invert(torch.zeros(1, 3, 4, 4))
    with pytest.raises(TypeError, match="displacement"):
        invert(torch.zeros(1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        invert(torch.full((1, 2, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="iterations"):
        invert(d, iterations=-1)
    with pytest.raises(TypeError, match="iterations"):
        invert(d, iterations=2.0)
    with pytest.raises(ValueError, match="tolerance"):
        invert(d, tolerance=float("nan"))
    with pytest.raises(ValueError, match="step"):
        invert(d, step=0.0)
    with pytest.raises(ValueError, match="step"):
        invert(d, step=1.5)
    with pytest.raises(ValueError, match="inverse"):
        inverse_residuals(d, torch.zeros(1, 2, 4, 5))
