import numpy as np
import pytest
import torch

from nadmm_torch.ops.fourier import (
    dct_matrix,
    laplacian_symbol,
    regulariser_weights,
    solve_shifted,
)

from .dense import regulariser


@pytest.mark.parametrize("boundary", ["periodic", "neumann"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("shape,spacing", [((5, 6), (1.0, 2.5)), ((3, 4, 5), (2.0, 1.0, 1.5))])
def test_u_step_matches_dense_solve(boundary, order, shape, spacing):
    torch.manual_seed(0)
    theta = 0.7
    ndim = len(shape)
    rhs = torch.randn(2, ndim, *shape, dtype=torch.float64)
    sym = laplacian_symbol(shape, spacing, order, boundary, torch.float64, torch.device("cpu"))
    weights = regulariser_weights(spacing, torch.float64, "cpu")
    u = solve_shifted(rhs, theta, sym, weights, boundary)
    mats = regulariser(shape, spacing, order, boundary)
    for i in range(ndim):
        a = theta * np.eye(mats[i].shape[0]) + mats[i]
        for bi in range(2):
            ref = np.linalg.solve(a, rhs[bi, i].flatten().numpy())
            np.testing.assert_allclose(u[bi, i].flatten().numpy(), ref, rtol=1e-9, atol=1e-10)


def test_dct_matrix_is_orthonormal():
    c = dct_matrix(7, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(c @ c.T, torch.eye(7, dtype=torch.float64))


def test_theta_gradient_flows_through_solve():
    shape, spacing = (6, 5), (1.0, 1.0)
    rhs = torch.randn(1, 2, *shape, dtype=torch.float64)
    sym = laplacian_symbol(shape, spacing, 2, "neumann", torch.float64, torch.device("cpu"))
    w = regulariser_weights(spacing, torch.float64, "cpu")
    theta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: solve_shifted(rhs, t, sym, w, "neumann"), (theta,))


def test_neumann_does_not_leak_across_the_slice_axis():
    """A force on the first slices moves the last slice far less than under periodic wrap."""
    shape, spacing = (8, 16, 16), (10.0, 1.5, 1.5)
    rhs = torch.zeros(1, 3, *shape, dtype=torch.float64)
    rhs[:, :, 0, 4:12, 4:12] = 1.0
    w = regulariser_weights(spacing, torch.float64, "cpu")
    ratios = {}
    for boundary in ("neumann", "periodic"):
        sym = laplacian_symbol(shape, spacing, 2, boundary, torch.float64, torch.device("cpu"))
        u = solve_shifted(rhs, 0.01, sym, w, boundary)
        # last slice against slice 1: the two neighbours of slice 0 under periodic wrap
        ratios[boundary] = float(u[:, :, -1].abs().max() / u[:, :, 1].abs().max())
    assert ratios["periodic"] > 0.9
    assert ratios["neumann"] < 0.02
