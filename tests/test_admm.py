import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from nadmm_torch.ops.admm import data_energy, nesterov_admm, v_step_l1, v_step_l2

from .dense import regulariser


def _pointwise_objective(v, g, c, w, lam, theta, p):
    r = g @ v + c
    return lam / p * abs(r) ** p + 0.5 * theta * np.sum((v - w) ** 2)


@pytest.mark.parametrize("p,step", [(2, v_step_l2), (1, v_step_l1)])
@pytest.mark.parametrize("ndim", [2, 3])
def test_v_step_matches_brute_force(p, step, ndim):
    rng = np.random.default_rng(p * 10 + ndim)
    n = 40
    g = rng.normal(size=(1, ndim, n))
    g[0, :, 0] = 0.0  # a flat voxel: the step must leave w there
    c = rng.normal(size=(1, 1, n))
    w = rng.normal(size=(1, ndim, n))
    lam, theta = 0.8, 0.5
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    s = (t(g) ** 2).sum(1, keepdim=True)
    v = step(t(w), t(g), t(c), s, lam, theta).numpy()
    for j in range(n):
        args = (g[0, :, j], c[0, 0, j], w[0, :, j], lam, theta, p)
        ref = minimize(
            _pointwise_objective, w[0, :, j], args=args, method="Powell",
            options={"xtol": 1e-12, "ftol": 1e-14, "maxiter": 20000},
        )
        ours = _pointwise_objective(v[0, :, j], *args)
        assert ours <= ref.fun + 1e-7 * max(1.0, abs(ref.fun))  # ε-guard of the p = 1 case
        # θ-strong convexity: ‖v_ref − v*‖² ≤ 2 (f(v_ref) − f*) / θ
        bound = np.sqrt(2.0 * max(ref.fun - ours, 0.0) / theta) + 1e-3
        assert np.linalg.norm(v[0, :, j] - ref.x) <= bound


def _small_problem(shape=(6, 7), seed=0):
    """A linearised registration problem with smooth, image-like g and c."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 1, *shape, generator=gen, dtype=torch.float64)
    img = torch.nn.functional.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=False)
    g = torch.stack(torch.gradient(img[0, 0]), 0).unsqueeze(0)
    c = 0.3 * torch.randn(1, 1, *shape, generator=gen, dtype=torch.float64)
    return g, c


def _energy(u_flat, g, c, lam, p, mats, delta=0.0, with_grad=False):
    """The model's energy (and its gradient), with |r| smoothed to sqrt(r² + δ²) for p = 1."""
    ndim = g.shape[1]
    u = u_flat.reshape(ndim, -1)
    gg = g[0].reshape(ndim, -1)
    r = (gg * u).sum(0) + c.reshape(-1)
    if p == 2:
        data, dr = 0.5 * lam * np.sum(r**2), lam * r
    else:
        root = np.sqrt(r**2 + delta**2)
        data, dr = lam * np.sum(root), lam * r / np.maximum(root, 1e-300)
    reg = 0.5 * sum(u[i] @ mats[i] @ u[i] for i in range(ndim))
    if not with_grad:
        return data + reg
    grad = np.stack([dr * gg[i] + mats[i] @ u[i] for i in range(ndim)]).reshape(-1)
    return data + reg, grad


@pytest.mark.parametrize("boundary", ["neumann", "periodic"])
@pytest.mark.parametrize("p,order", [(2, 1), (2, 2), (1, 1), (1, 2)])
def test_admm_reaches_the_convex_minimiser(p, order, boundary):
    shape, spacing, lam, theta = (6, 7), (1.0, 1.5), 4.0, 0.5
    g, c = _small_problem(shape)
    mats = regulariser(shape, spacing, order, boundary)
    gn, cn = g.numpy(), c.numpy()
    n = int(np.prod(shape))
    if p == 2:  # normal equations, solved densely
        gg = gn[0].reshape(2, n)
        a = np.zeros((2 * n, 2 * n))
        for i in range(2):
            for j in range(2):
                a[i * n:(i + 1) * n, j * n:(j + 1) * n] = lam * np.diag(gg[i] * gg[j])
            a[i * n:(i + 1) * n, i * n:(i + 1) * n] += mats[i]
        rhs = -lam * (gg * cn.reshape(1, n)).reshape(-1)
        ref = np.linalg.solve(a, rhs)
    else:  # L-BFGS on a finely smoothed |.|, then polished
        ref = np.zeros(2 * n)
        for delta in (1e-2, 1e-4, 1e-6):
            ref = minimize(_energy, ref, args=(gn, cn, lam, p, mats, delta, True), jac=True,
                           method="L-BFGS-B",
                           options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12}).x
    data_term = "l2" if p == 2 else "l1"
    u, _ = nesterov_admm(g, c, lam=lam, theta=theta, iterations=3000, order=order,
                         spacing=spacing, data_term=data_term, boundary=boundary, restart=True)
    e_ours = _energy(u.numpy().reshape(-1), gn, cn, lam, p, mats)
    e_ref = _energy(ref, gn, cn, lam, p, mats)
    assert e_ours <= e_ref + 1e-6 * abs(e_ref) + 1e-9
    if p == 2:
        np.testing.assert_allclose(u.numpy().reshape(-1), ref, atol=1e-6)
    # the package's own energy agrees with this file's
    reg = _energy(u.numpy().reshape(-1), gn, cn, 0.0, p, mats)
    assert np.isclose(float(data_energy(u, g, c, lam, data_term)[0]) + reg, e_ours)


def _iterations_to(rel_error, p, theta, **kwargs):
    """First iteration whose u is within ``rel_error`` of the minimiser."""
    g, c = _small_problem((32, 32), seed=3)
    common = dict(lam=20.0, order=2, data_term=p)
    ref, _ = nesterov_admm(g, c, theta=theta, iterations=4000, restart=True, **common)
    hits = []

    def record(k, u):
        if not hits and float((u - ref).norm() / ref.norm()) < rel_error:
            hits.append(k)

    nesterov_admm(g, c, theta=theta, iterations=1000, callback=record, **common, **kwargs)
    return hits[0] if hits else 10**9


@pytest.mark.parametrize("p,theta", [("l2", 0.05), ("l2", 0.2), ("l1", 0.2)])
def test_nesterov_needs_clearly_fewer_iterations(p, theta):
    plain = _iterations_to(1e-3, p, theta, accelerated=False)
    fast = _iterations_to(1e-3, p, theta, accelerated=True, restart=True)
    print(f"{p} θ={theta}: plain ADMM {plain} iterations, Nesterov (restart) {fast}")
    assert fast <= 0.7 * plain


def test_nesterov_without_restart_is_what_the_paper_runs():
    """Unrestarted momentum matches plain ADMM at the first iteration and differs after."""
    g, c = _small_problem((16, 16), seed=1)
    kw = dict(lam=5.0, theta=0.5, order=2)
    u1, _ = nesterov_admm(g, c, iterations=1, accelerated=True, **kw)
    p1, _ = nesterov_admm(g, c, iterations=1, accelerated=False, **kw)
    torch.testing.assert_close(u1, p1)
    u3, _ = nesterov_admm(g, c, iterations=3, accelerated=True, **kw)
    p3, _ = nesterov_admm(g, c, iterations=3, accelerated=False, **kw)
    assert (u3 - p3).abs().max() > 1e-6


@pytest.mark.parametrize("data_term", ["l2", "l1"])
@pytest.mark.parametrize("accelerated,restart", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("shape,batch", [((6, 16, 12), 1), ((20, 24), 3), ((1, 8, 16), 2)])
def test_in_place_inference_loop_equals_the_autograd_loop(data_term, accelerated, restart, shape,
                                                          batch):
    """The allocation-free loop (no gradients, fixed λ/θ) gives the numbers of the reference
    loop (taken with ``record=True``), restart decisions included."""
    gen = torch.Generator().manual_seed(sum(shape) + batch)
    g = torch.randn(batch, len(shape), *shape, generator=gen)
    c = torch.randn(batch, 1, *shape, generator=gen)
    kw = dict(lam=0.5, theta=0.05, iterations=15, spacing=(2.0,) * len(shape), order=2,
              data_term=data_term, accelerated=accelerated, restart=restart)
    fast, info_fast = nesterov_admm(g, c, **kw)
    ref, info_ref = nesterov_admm(g, c, record=True, **kw)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert torch.equal(info_fast.restarts, info_ref.restarts)
    assert torch.equal(info_fast.iterations, info_ref.iterations)
    if restart and accelerated:
        assert int(info_ref.restarts.sum()) > 0  # the comparison covered restarts


@pytest.mark.parametrize("data_term", ["l2", "l1"])
def test_in_place_loop_device_bookkeeping_equals_host_bookkeeping(data_term):
    """The tensor-only momentum / restart path (used on GPUs, no host sync) gives the numbers
    of the host path (CPU), so the GPU's path is covered on a CPU-only CI."""
    from nadmm_torch.ops.admm import V_STEP_PARTS, _admm_in_place
    from nadmm_torch.ops.fourier import laplacian_symbol, regulariser_weights, shifted_inverse

    gen = torch.Generator().manual_seed(3)
    shape = (5, 12, 10)
    g = torch.randn(2, 3, *shape, generator=gen)
    c = torch.randn(2, 1, *shape, generator=gen)
    s = (g * g).sum(1, keepdim=True)
    coef = V_STEP_PARTS[data_term][0](s, 0.5, 0.05)
    sym = laplacian_symbol(shape, (1.0, 1.0, 1.0), 2, "neumann", g.dtype, g.device)
    mult = shifted_inverse(0.05, sym, regulariser_weights((1.0, 1.0, 1.0), g.dtype, g.device))
    args = (g, c, coef, mult, 0.05, data_term, 20, True, True, 0.999)
    u_host, r_host = _admm_in_place(*args, host=True)
    u_dev, r_dev = _admm_in_place(*args, host=False)
    torch.testing.assert_close(u_dev, u_host, rtol=0, atol=1e-5 * float(u_host.abs().max()))
    assert torch.equal(r_dev, r_host) and int(r_host.sum()) > 0


@pytest.mark.parametrize("data_term", ["l2", "l1"])
def test_in_place_loop_with_pocketfft_equals_the_autograd_loop(data_term):
    """A field with an axis >= POCKETFFT_MIN_AXIS takes scipy's DCT in the inference loop:
    same numbers as the matrix transforms of the autograd loop, to float rounding."""
    from nadmm_torch.ops.fourier import POCKETFFT_MIN_AXIS, dct_into, forward_transform

    shape = (3, 10, POCKETFFT_MIN_AXIS + 4)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, *shape, generator=gen)
    buffers = (torch.empty_like(x), torch.empty_like(x))
    spec = dct_into(x, buffers)
    torch.testing.assert_close(spec, forward_transform(x, "neumann"), rtol=0, atol=1e-5)
    back = dct_into(spec.clone(), buffers, inverse=True)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5)
    g = torch.randn(2, 3, *shape, generator=gen)
    c = torch.randn(2, 1, *shape, generator=gen)
    kw = dict(lam=0.5, theta=0.05, iterations=10, spacing=(2.0, 1.0, 1.0), order=2,
              data_term=data_term, restart=True)
    fast, _ = nesterov_admm(g, c, **kw)
    ref, _ = nesterov_admm(g, c, record=True, **kw)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
