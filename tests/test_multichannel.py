"""Multi-channel images (the l2 data term summed over channels) and MIND-SSC features.

The v-step against a dense per-voxel solve, ADMM against the convex model's minimiser, the
in-place inference loop against the autograd loop, gradcheck, channel-wise normalisation, the
channel policy, MIND-SSC against a loop over its definition, and the multi-modal case it is
for: an inverted-contrast pair that raw intensities cannot register and MIND-SSC can.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import nadmm_torch as nt
from nadmm_torch.config import SolverConfig
from nadmm_torch.data.sample import load_sample
from nadmm_torch.ops.admm import (
    V_STEP_PARTS,
    _admm_in_place,
    _linearisation,
    data_energy,
    nesterov_admm,
    v_step_l2_channels,
)
from nadmm_torch.ops.features import _neighbour_pairs, mind_ssc
from nadmm_torch.ops.fourier import laplacian_symbol, regulariser_weights, shifted_inverse
from nadmm_torch.ops.solver import gradient_scale, normalise_pair, solve
from nadmm_torch.ops.warp import warp_labels

from .dense import regulariser
from .synthetic import blobs, smooth_field

F64 = torch.float64


def _random(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- the v-step -------------------------------------------------------------------------------

@pytest.mark.parametrize("ndim,channels", [(2, 2), (2, 5), (3, 2), (3, 4)])
def test_v_step_matches_a_dense_solve_per_voxel(ndim, channels):
    shape = (4, 5, 3)[:ndim]
    g = _random(2, channels, ndim, *shape, seed=ndim * 10 + channels)
    c = _random(2, channels, *shape, seed=1)
    w = _random(2, ndim, *shape, seed=2)
    first, second = (0,) * ndim, (1,) * ndim
    g[(0, slice(None), slice(None), *first)] = 0.0  # a flat voxel: v = w there
    g[(1, slice(None), slice(None), *second)] = (
        g[(1, slice(0, 1), slice(None), *second)] * _random(channels, 1, seed=3)
    )
    lam, theta = 0.8, 0.3  # (above: every channel's gradient parallel, H of rank 1)
    v = v_step_l2_channels(w, g, c, lam, theta)
    for b, idx in itertools.product(range(2), itertools.product(*map(range, shape))):
        gv, cv, wv = g[(b, slice(None), slice(None), *idx)], c[(b, slice(None), *idx)], w[(
            b, slice(None), *idx)]
        a = lam * gv.T @ gv + theta * torch.eye(ndim, dtype=F64)
        ref = torch.linalg.solve(a, theta * wv - lam * gv.T @ cv)
        torch.testing.assert_close(v[(b, slice(None), *idx)], ref, rtol=1e-12, atol=1e-12)
    flat = (0, slice(None), *([0] * ndim))
    torch.testing.assert_close(v[flat], w[flat], rtol=0, atol=1e-15)


def test_one_channel_in_the_channel_layout_takes_the_scalar_path():
    g, c = _random(1, 1, 2, 6, 7, seed=4), _random(1, 1, 6, 7, seed=5)
    kw = dict(lam=2.0, theta=0.3, iterations=6)
    u_channels, _ = nesterov_admm(g, c, **kw)
    u_scalar, _ = nesterov_admm(g[:, 0], c, **kw)
    assert torch.equal(u_channels, u_scalar)
    assert _linearisation(g, c, "l2")[2] == "l2"


def test_l1_over_channels_is_refused():
    g, c = _random(1, 3, 2, 6, 7), _random(1, 3, 6, 7)
    with pytest.raises(ValueError, match=r"^data_term: 'l1' has no closed-form v-step over "
                                         r"C = 3 channels; multi-channel images need "
                                         r"data_term='l2'"):
        nesterov_admm(g, c, lam=1.0, theta=1.0, iterations=2, data_term="l1")
    with pytest.raises(ValueError, match=r"^g: expected \(B, C, ndim, \*S\)"):
        nesterov_admm(g[:, :2], c, lam=1.0, theta=1.0, iterations=2)


# -- the ADMM solve ---------------------------------------------------------------------------

def _channel_problem(shape=(6, 7), channels=3, seed=0):
    """Smooth, image-like gradients and residuals of ``channels`` channels."""
    imgs = torch.cat([blobs(shape, seed=seed + k) for k in range(channels)], dim=1)
    g = torch.stack(torch.gradient(imgs[0], dim=(1, 2)), 1).unsqueeze(0)  # (1, C, 2, *S)
    return g, 0.3 * _random(1, channels, *shape, seed=seed + 100)


@pytest.mark.parametrize("boundary", ["neumann", "periodic"])
@pytest.mark.parametrize("order", [1, 2])
def test_admm_reaches_the_convex_minimiser_over_channels(order, boundary):
    shape, spacing, lam, theta = (6, 7), (1.0, 1.5), 40.0, 0.5
    g, c = _channel_problem(shape)
    mats = regulariser(shape, spacing, order, boundary)
    n = int(np.prod(shape))
    gg = g[0].reshape(g.shape[1], 2, n).numpy()  # (C, 2, n)
    cc = c[0].reshape(-1, n).numpy()
    a = np.zeros((2 * n, 2 * n))
    for i, j in itertools.product(range(2), repeat=2):  # normal equations, dense
        a[i * n:(i + 1) * n, j * n:(j + 1) * n] = lam * np.diag((gg[:, i] * gg[:, j]).sum(0))
    for i in range(2):
        a[i * n:(i + 1) * n, i * n:(i + 1) * n] += mats[i]
    rhs = -lam * (gg * cc[:, None]).sum(0).reshape(-1)
    ref = np.linalg.solve(a, rhs)
    u, _ = nesterov_admm(g, c, lam=lam, theta=theta, iterations=3000, order=order,
                         spacing=spacing, boundary=boundary, restart=True)
    np.testing.assert_allclose(u.numpy().reshape(-1), ref, atol=1e-6)
    # the package's energy over channels is the dense model's
    uf = torch.from_numpy(ref).reshape(1, 2, *shape)
    reg = 0.5 * sum(ref[i * n:(i + 1) * n] @ mats[i] @ ref[i * n:(i + 1) * n] for i in range(2))
    dense = 0.5 * ref @ a @ ref - rhs @ ref + 0.5 * lam * (cc**2).sum()
    assert np.isclose(float(data_energy(uf, g, c, lam, "l2")[0]) + reg, dense)


@pytest.mark.parametrize("accelerated,restart", [(True, True), (False, False)])
@pytest.mark.parametrize("shape,channels", [((20, 24), 3), ((5, 12, 10), 2)])
def test_in_place_loop_equals_the_autograd_loop_over_channels(shape, channels, accelerated,
                                                              restart):
    g = _random(2, channels, len(shape), *shape, seed=7, dtype=torch.float32)
    c = _random(2, channels, *shape, seed=8, dtype=torch.float32)
    kw = dict(lam=0.5, theta=0.05, iterations=15, spacing=(2.0,) * len(shape), order=2,
              accelerated=accelerated, restart=restart)
    fast, info_fast = nesterov_admm(g, c, **kw)
    ref, info_ref = nesterov_admm(g, c, record=True, **kw)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert torch.equal(info_fast.restarts, info_ref.restarts)


def test_in_place_loop_device_bookkeeping_over_channels():
    shape = (5, 12, 10)
    g = _random(2, 4, 3, *shape, seed=9, dtype=torch.float32)
    c = _random(2, 4, *shape, seed=10, dtype=torch.float32)
    q, h, kind = _linearisation(g, c, "l2")
    coef = V_STEP_PARTS[kind][0]((h, q), 0.5, 0.05)
    sym = laplacian_symbol(shape, (1.0,) * 3, 2, "neumann", g.dtype, g.device)
    mult = shifted_inverse(0.05, sym, regulariser_weights((1.0,) * 3, g.dtype, g.device))
    args = (q, h, coef, mult, 0.05, kind, 20, True, True, 0.999)
    u_host, r_host = _admm_in_place(*args, host=True)
    u_dev, r_dev = _admm_in_place(*args, host=False)
    torch.testing.assert_close(u_dev, u_host, rtol=0, atol=1e-5 * float(u_host.abs().max()))
    assert torch.equal(r_dev, r_host)


def test_gradcheck_admm_over_channels():
    g, c = _channel_problem((5, 6), channels=3, seed=2)
    g.requires_grad_(True)
    c.requires_grad_(True)
    lam = torch.tensor(3.0, dtype=F64, requires_grad=True)
    theta = torch.tensor(0.5, dtype=F64, requires_grad=True)

    def fn(g_, c_, la, th):
        return nesterov_admm(g_, c_, lam=la, theta=th, iterations=4)[0]

    assert torch.autograd.gradcheck(fn, (g, c, lam, theta), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("features", ["none", "mind"])
def test_gradcheck_solve_over_channels(features):
    f = torch.cat([blobs((6, 5), seed=1), blobs((6, 5), seed=3)], 1).requires_grad_(True)
    m = torch.cat([blobs((6, 5), seed=2), blobs((6, 5), seed=4)], 1).requires_grad_(True)
    lam = torch.tensor(2.0, dtype=F64, requires_grad=True)
    cfg = SolverConfig(lam=2.0, theta=0.5, levels=1, iterations=3, warps=2, normalize="none",
                       features=features)

    def fn(f_, m_, la):
        return solve(f_, m_, cfg, lam=[la])[0]

    assert torch.autograd.gradcheck(fn, (f, m, lam), eps=1e-6, atol=1e-5)


# -- channels in the solver -------------------------------------------------------------------

def test_normalisation_and_gradient_scale_are_per_channel():
    f = torch.cat([blobs((9, 11), seed=1) * 300 + 20, blobs((9, 11), seed=2) * 2], 1)
    m = torch.cat([blobs((9, 11), seed=3) * 300 + 20, blobs((9, 11), seed=4) * 2], 1)
    nf, nm = normalise_pair(f, m, "percentile")
    for k in range(2):
        ef, em = normalise_pair(f[:, k:k + 1], m[:, k:k + 1], "percentile")
        assert torch.equal(nf[:, k:k + 1], ef) and torch.equal(nm[:, k:k + 1], em)
    scale = gradient_scale(f, m)
    assert scale.shape == (1, 2, 1, 1)
    for k in range(2):
        one = gradient_scale(f[:, k:k + 1], m[:, k:k + 1])
        torch.testing.assert_close(scale[:, k:k + 1], one * 2**0.5, rtol=1e-15, atol=0)


@pytest.mark.parametrize("with_mask", [False, True])
def test_copies_of_one_channel_register_like_the_channel(with_mask):
    # Per-channel scaling times √C keeps λ's meaning: C identical channels are the same model
    # as one (a different v-step code path, so equal to rounding).
    s = load_sample()
    z = s.moving.shape[2] // 2
    fixed, moving = s.fixed[:, :, z], s.moving[:, :, z]
    mask = None
    if with_mask:
        mask = torch.zeros_like(fixed, dtype=torch.bool)
        mask[..., 20:100, 30:110] = True
    kw = dict(spacing=s.spacing[1:], preset="paper", mask=mask)
    one = nt.register(fixed, moving, **kw)
    three = nt.register(fixed.repeat(1, 3, 1, 1), moving.repeat(1, 3, 1, 1), **kw)
    assert float(one.abs().max()) > 1.0
    torch.testing.assert_close(three, one, rtol=0, atol=2e-3)


def test_a_second_contrast_adds_information():
    # Channel 0 carries only a horizontal pattern, channel 1 only a vertical one: each alone
    # sees motion along one axis; together they recover both components.
    n = 48
    y, x = torch.meshgrid(torch.arange(n, dtype=F64), torch.arange(n, dtype=F64), indexing="ij")
    a = torch.sin(2 * np.pi * x / 16)[None, None].expand(1, 1, n, n)
    b = torch.sin(2 * np.pi * y / 16)[None, None].expand(1, 1, n, n)
    moving = torch.cat([a, b], 1).contiguous()
    d_true = torch.zeros(1, 2, n, n, dtype=F64)
    d_true[:, 0], d_true[:, 1] = 1.5, -1.0  # a translation (voxels)
    fixed = nt.warp(moving, d_true)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    kw = dict(preset="paper")
    both = nt.register(fixed, moving, **kw)[inner]
    only_x = nt.register(fixed[:, :1], moving[:, :1], **kw)[inner]
    assert (both - d_true[inner]).abs().mean() < 0.1
    assert only_x[:, 0].abs().max() < 0.1  # channel 0 alone: no cue along y
    assert (only_x[:, 1] + 1.0).abs().mean() < 0.1


def test_channel_policy_messages():
    f, m = blobs((16, 16), seed=1).float(), blobs((16, 16), seed=2).float()
    with pytest.raises(ValueError, match=r"^moving: 2 channel\(s\), fixed 1"):
        nt.register(f, m.repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match=r"^data_term: 'l1' takes single-channel images"):
        nt.register(f.repeat(1, 2, 1, 1), m.repeat(1, 2, 1, 1), data_term="l1")
    with pytest.raises(ValueError, match=r"^fixed/moving: expected single-channel images"):
        nt.affine(f.repeat(1, 2, 1, 1), m.repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match=r"^affine: the affine stage takes single-channel"):
        nt.register(f.repeat(1, 2, 1, 1), m.repeat(1, 2, 1, 1), affine=True)
    with pytest.raises(ValueError, match=r"^features: 'mind' gives multi-channel images"):
        SolverConfig.from_preset("fast", "l1", features="mind")
    with pytest.raises(ValueError, match=r"^features: expected one of \['none', 'mind'\]"):
        SolverConfig.from_preset("fast", features="MIND")
    d = nt.register(f.repeat(1, 2, 1, 1), m.repeat(1, 2, 1, 1), mask=torch.ones_like(f))
    assert d.shape == (1, 2, 16, 16) and torch.isfinite(d).all()


# -- MIND-SSC ---------------------------------------------------------------------------------

def _mind_by_definition(img: np.ndarray, radius: int, dilation: int) -> np.ndarray:
    """MIND-SSC of one image ``(*S)`` by loops over voxels, pairs and patch offsets:
    ``D = box mean of (I(y + δn) − I(y + δm))²`` (clamped indices: replicated borders, for
    the shifted image and for the box), then ``exp(−(D − min D) / clamp(mean D'))``."""
    shape = img.shape
    pairs = _neighbour_pairs(len(shape))

    def at(p):
        return img[tuple(min(max(i, 0), n - 1) for i, n in zip(p, shape))]

    def clip(p):
        return tuple(min(max(i, 0), n - 1) for i, n in zip(p, shape))

    box = list(itertools.product(range(-radius, radius + 1), repeat=len(shape)))
    d = np.zeros((len(pairs), *shape))
    for x in itertools.product(*map(range, shape)):
        for k, (n, m) in enumerate(pairs):
            vals = []
            for b in box:
                y = clip(tuple(xi + bi for xi, bi in zip(x, b)))
                a = at(tuple(yi + dilation * ni for yi, ni in zip(y, n)))
                c = at(tuple(yi + dilation * mi for yi, mi in zip(y, m)))
                vals.append((a - c) ** 2)
            d[(k, *x)] = np.mean(vals)
    d = d - d.min(0, keepdims=True)
    var = d.mean(0, keepdims=True)
    var = np.clip(var, 1e-3 * var.mean(), 1e3 * var.mean())
    return np.exp(-d / var)


@pytest.mark.parametrize("shape,radius,dilation", [((7, 8), 2, 2), ((9, 6), 1, 3),
                                                   ((5, 6, 5), 1, 2)])
def test_mind_ssc_matches_its_definition(shape, radius, dilation):
    img = blobs(shape, seed=5) + 0.05 * torch.rand(1, 1, *shape, dtype=F64,
                                                    generator=torch.Generator().manual_seed(1))
    out = mind_ssc(torch.cat([img, img**2]), radius=radius, dilation=dilation)
    k = 12 if len(shape) == 3 else 4
    assert out.shape == (2, k, *shape)
    np.testing.assert_allclose(out[0].numpy(), _mind_by_definition(img[0, 0].numpy(), radius,
                                                                   dilation), atol=1e-12)
    np.testing.assert_allclose(out[1].numpy(), _mind_by_definition(img[0, 0].numpy() ** 2,
                                                                   radius, dilation), atol=1e-12)


@pytest.mark.parametrize("ndim,count", [(2, 4), (3, 12)])
def test_mind_ssc_pattern_is_the_neighbour_pairs_on_different_axes(ndim, count):
    faces = [tuple(s * (a == i) for a in range(ndim)) for i in range(ndim) for s in (-1, 1)]
    expected = {frozenset((p, q)) for p, q in itertools.combinations(faces, 2)
                if sum((u - v) ** 2 for u, v in zip(p, q)) == 2}
    got = [frozenset(pair) for pair in _neighbour_pairs(ndim)]
    assert len(got) == count and set(got) == expected


def test_mind_ssc_channels_invariance_and_edge_cases():
    img = blobs((12, 10), seed=3)
    two = mind_ssc(torch.cat([img, 1 - img], 1))  # channels: descriptors of each, in order
    assert two.shape == (1, 8, 12, 10)
    torch.testing.assert_close(two[:, :4], mind_ssc(img))
    # an affine intensity map, inversion included, leaves MIND unchanged
    torch.testing.assert_close(two[:, 4:], two[:, :4], rtol=0, atol=1e-12)
    torch.testing.assert_close(mind_ssc(300 * img + 7), mind_ssc(img), rtol=0, atol=1e-12)
    assert float(two.min()) > 0 and float(two.max()) == 1.0
    flat = torch.zeros(1, 1, 8, 9, dtype=F64, requires_grad=True)  # constant: 1, finite grads
    out = mind_ssc(flat)
    out.sum().backward()
    assert torch.equal(out, torch.ones_like(out)) and torch.isfinite(flat.grad).all()
    with pytest.raises(ValueError, match=r"^dilation: expected an integer >= 1"):
        mind_ssc(img, dilation=0)
    with pytest.raises(TypeError, match=r"^radius: expected an integer"):
        mind_ssc(img, radius=1.5)


def test_gradcheck_mind_ssc():
    img = blobs((6, 7), seed=8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: mind_ssc(x, radius=1, dilation=1), (img,))
    vol = blobs((5, 5, 5), seed=9).requires_grad_(True)  # fast mode: random projections
    assert torch.autograd.gradcheck(lambda x: mind_ssc(x, radius=1, dilation=2), (vol,),
                                    fast_mode=True)


# -- the multi-modal case ---------------------------------------------------------------------

def test_mind_recovers_a_known_deformation_of_an_inverted_contrast_slice():
    """A smooth known motion of a real slice (the bundled ACDC sample), the moving image's
    contrast inverted (``max − I``): l2 on intensities follows the wrong edges (measured EPE
    ~11× the mean motion), l2 on MIND-SSC recovers the motion as well as the mono-modal pair
    (EPE ~0.15 against mean |d| 1.34 voxels)."""
    s = load_sample()
    z = s.moving.shape[2] // 2
    moving, labels = s.moving[:, :, z], s.moving_labels[:, :, z]
    d_true = smooth_field(tuple(moving.shape[2:]), 3.0, seed=1)
    fixed = nt.warp(moving, d_true)
    inverted = moving.max() - moving
    heart = (labels[0, 0] > 0) | (warp_labels(labels, d_true)[0, 0] > 0)

    def epe(m, **kw):
        d = nt.register(fixed, m, spacing=s.spacing[1:], preset="paper", **kw)
        assert float(nt.fold_percent(d)[0]) == 0.0
        return float((d - d_true).norm(dim=1)[0][heart].mean())

    magnitude = float(d_true.norm(dim=1)[0][heart].mean())
    raw, mind, mono = epe(inverted), epe(inverted, features="mind"), epe(moving)
    print(f"EPE: raw inverted {raw:.3f}, MIND inverted {mind:.3f}, mono-modal {mono:.3f}, "
          f"mean |d| {magnitude:.3f}")
    assert raw > magnitude  # worse than not registering at all
    assert mind < 0.2 * magnitude and mind < 0.05 * raw
    assert mind < 2.0 * mono


def test_features_option_reaches_the_solver_from_the_cli(tmp_path, monkeypatch, capsys):
    import nadmm_torch

    from .test_cli import _known_field, _run, _write_pair

    seen = []

    def recording(fixed, moving, **kw):
        seen.append(kw["preset"].features)  # the validated SolverConfig
        return _known_field(fixed, moving, **kw)

    monkeypatch.setattr(nadmm_torch, "register", recording)
    paths = _write_pair(tmp_path)
    for flag, expected in (([], "none"), (["--features", "mind"], "mind")):
        out = tmp_path / f"out{len(seen)}"
        rc, _, err = _run([paths["fixed"], paths["moving"], "-o", out, "-q", *flag], capsys)
        assert rc == 0, err
        assert seen[-1] == expected
    rc, _, err = _run([paths["fixed"], paths["moving"], "-o", tmp_path / "x", "--features",
                       "sift"], capsys)
    assert rc != 0 and "--features" in err


def test_multimodal_benchmark_runs_on_synthetic_subjects(tmp_path, capsys):
    """``benchmarks/multimodal.py`` end to end on two synthetic subjects (2 ordered pairs),
    so the script cannot rot between the runs that fill its README table."""
    pytest.importorskip("ants")
    import json

    from .test_benchmark_smoke import _load
    from .test_brain2d_smoke import _subject

    module = _load("multimodal")
    data = tmp_path / "data"
    for n, shift in ((1, 0.0), (2, 2.0)):
        _subject(data, n, shift)
    out = tmp_path / "m.json"
    argv = ["--data", str(data), "--json", str(out), "--cache", str(tmp_path / "cache"),
            "--presets", "fast", "--lam-mults", "1/4"]
    assert module.main(argv) == 0
    doc = json.loads(out.read_text())
    methods = {(r["remap"], r["method"], r["lam_mult"]) for r in doc["pairs"]}
    assert ("inverted", "fast-mind", 1.0) in methods and ("mono", "fast-none", 0.25) in methods
    assert len(doc["pairs"]) == 2 * (1 + 3 * 2 + 3)  # affine, 3 remaps × 2, λ sweep
    assert "| fast, l2 on MIND-SSC |" in capsys.readouterr().out


def test_state_dict_records_the_features_and_older_records_mean_none():
    import json

    saved = nt.NADMMRegistration("fast").state_dict()
    doc = json.loads(bytes(saved["_extra_state"].tolist()).decode())
    assert doc["settings"]["features"] == "none"
    del doc["settings"]["features"]  # a record written before the option existed
    saved["_extra_state"] = torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8)
    nt.NADMMRegistration("fast").load_state_dict(saved)
    with pytest.raises(ValueError, match=r"features: saved 'none', this module 'mind'"):
        nt.NADMMRegistration("fast", features="mind").load_state_dict(saved)
