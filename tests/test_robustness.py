"""Numerical robustness: extreme settings, intensity ranges, dtypes, memory layouts,
finite gradients through the p = 1 thresholding, determinism; no folds anywhere.

Images are small smooth random blobs (24 × 24, and 6 × 20 × 20 for 3D) so that each
registration takes a fraction of a second on one CPU thread.
"""

from __future__ import annotations

import pytest
import torch

import nadmm_torch as nt
from tests.synthetic import blobs

F64, M64 = blobs((24, 24), seed=1), blobs((24, 24), seed=2)
F32, M32 = F64.float(), M64.float()
F3, M3 = blobs((6, 20, 20), seed=3).float(), blobs((6, 20, 20), seed=4).float()
SP3 = (3.0, 1.0, 1.0)


def assert_sane(d: torch.Tensor) -> None:
    """Finite and fold-free (det J > 0 at every voxel)."""
    assert torch.isfinite(d).all()
    assert float(nt.fold_percent(d.detach()).max()) == 0.0


@pytest.mark.parametrize("data_term", ["l2", "l1"])
@pytest.mark.parametrize("name", ["lam", "theta"])
@pytest.mark.parametrize("factor", [100.0, 0.01])
def test_extreme_lambda_and_theta_stay_finite_and_fold_free(data_term, name, factor):
    scaled = nt.preset_config("fast", data_term, 2).scaled(name, factor)
    d = nt.register(F64, M64, data_term=data_term, **{name: scaled})
    assert_sane(d)
    if name == "lam" and factor < 1:
        # A data weight 100× smaller must move less than the preset does.
        base = nt.register(F64, M64, data_term=data_term)
        assert float(d.abs().max()) < 0.5 * float(base.abs().max())


@pytest.mark.parametrize("data_term", ["l2", "l1"])
def test_extreme_settings_in_3d(data_term):
    cfg = nt.preset_config("fast", data_term, 2)
    for lam, theta in [(cfg.scaled("lam", 100), cfg.theta),
                       (cfg.scaled("lam", 0.01), cfg.scaled("theta", 100))]:
        assert_sane(nt.register(F3, M3, spacing=SP3, data_term=data_term, lam=lam, theta=theta))


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
def test_scanner_intensity_range_gives_the_same_displacement(dtype, atol):
    # Joint min-max normalisation maps 0…4000 (with an offset) onto the 0…1 problem; what is
    # left is rounding of that scaling (1 ulp), carried through ~100 ADMM/warp steps: ~1e-14
    # in float64, ~1e-5 in float32 (measured), hence the tolerances.
    f, m = F64.to(dtype), M64.to(dtype)
    ref = nt.register(f, m)
    for scale, offset in [(4000.0, 0.0), (4000.0, -1000.0), (1e-3, 0.0)]:
        d = nt.register(f * scale + offset, m * scale + offset)
        torch.testing.assert_close(d, ref, rtol=0, atol=atol)
        assert_sane(d)


def test_float32_and_float64_agree_in_3d():
    d64 = nt.register(F3.double(), M3.double(), spacing=SP3)
    d32 = nt.register(F3, M3, spacing=SP3)
    assert d64.dtype == torch.float64 and d32.dtype == torch.float32
    # Same algorithm, float32 rounding (~1e-7) amplified by the iterations: a thousandth of a
    # voxel is far below anything that matters for registration.
    torch.testing.assert_close(d32.double(), d64, rtol=0, atol=1e-3)
    assert_sane(d32)


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_upcast_to_float32(low):
    # Documented policy (module.prepare_pair): float16/bfloat16 are computed in float32. So the
    # result is exactly that of the upcast inputs, in float32.
    f, m = F32.to(low), M32.to(low)
    d = nt.register(f, m)
    assert d.dtype == torch.float32
    assert torch.equal(d, nt.register(f.float(), m.float()))
    assert_sane(d)
    d3 = nt.NADMMRegistration()(F3.to(low), M3.to(low), spacing=SP3)
    assert d3.dtype == torch.float32
    assert torch.equal(d3, nt.register(F3.to(low).float(), M3.to(low).float(), spacing=SP3))


def test_half_precision_warp_is_sampled_in_float32():
    x = blobs((128, 128), seed=5).to(torch.float16)
    # Half-precision sampling coordinates were off by up to 0.1 at 128 px; now exact identity.
    assert torch.equal(nt.warp(x, torch.zeros(1, 2, 128, 128)), x)
    d = 0.3 * torch.ones(1, 2, 128, 128)
    ref = nt.warp(x.float(), d).half()
    assert torch.equal(nt.warp(x, d), ref)


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as ``x`` in several non-contiguous memory layouts."""
    nd = x.dim()
    perm = (*range(1, nd), 0)  # batch axis last in memory
    inv = (nd - 1, *range(nd - 1))
    out = {
        "transposed": x.transpose(-1, -2).contiguous().transpose(-1, -2),
        "batch-last": x.permute(*perm).contiguous().permute(*inv),
        "channels-last": x.contiguous(
            memory_format=torch.channels_last if nd == 4 else torch.channels_last_3d
        ),
    }
    # A genuinely strided view: every other column of an interleaved tensor.
    inter = torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)
    out["every-other"] = inter[..., ::2]
    return out


@pytest.mark.parametrize("three_d", [False, True])
def test_memory_layout_does_not_change_the_result(three_d):
    f, m = (F3, M3) if three_d else (F32, M32)
    f, m = torch.cat([f, m]), torch.cat([m, f])  # B = 2, so that batch-last is a real layout
    kw = {"spacing": SP3} if three_d else {}
    ref = nt.register(f, m, **kw)
    for name, (fl, ml) in {
        k: (v, _layouts(m)[k]) for k, v in _layouts(f).items()
    }.items():
        torch.testing.assert_close(fl, f, rtol=0, atol=0)
        if name != "channels-last":  # with C = 1, channels-last is the contiguous layout
            assert not fl.is_contiguous(), name
        d = nt.register(fl, ml, **kw)
        assert torch.equal(d, ref), name


def test_expanded_batch_and_channels_last_warp():
    # A stride-0 batch (expand) registers like a real copy.
    f2, m2 = F32.expand(2, -1, -1, -1), M32.expand(2, -1, -1, -1)
    d = nt.register(f2, m2)
    assert torch.equal(d, nt.register(f2.contiguous(), m2.contiguous()))
    assert torch.equal(d[0], d[1])
    # Channels-last matters for C > 1, which warp takes.
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    xc = x.contiguous(memory_format=torch.channels_last)
    assert not xc.is_contiguous()
    assert torch.equal(nt.warp(xc, d[:1]), nt.warp(x, d[:1]))


def _flat_patch_pair(same: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with exactly flat regions (∇I = 0, so s = |g|² = 0 in the p = 1 v-step)."""
    def one(seed: int) -> torch.Tensor:
        x = blobs((24, 24), seed=seed)
        x[..., :8, :] = 0.0
        x[..., :, 18:] = 1.0
        return x

    f = one(1)
    return f, (f.clone() if same else one(2))


@pytest.mark.parametrize("data_term", ["l1", "l2"])
@pytest.mark.parametrize("case", ["identical", "flat-patches", "blobs"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_are_finite_through_the_thresholding_kinks(data_term, case, dtype):
    # "identical": c = 0, so the p = 1 residual r = g·w + c starts exactly at 0, on the kinks
    # r = ±τ|g|² where |g|² = 0 (flat patches) and between them elsewhere.
    if case == "blobs":
        f, m = F64.clone(), M64.clone()
    else:
        f, m = _flat_patch_pair(same=case == "identical")
    f = f.to(dtype).requires_grad_()
    m = m.to(dtype).requires_grad_()
    model = nt.NADMMRegistration(data_term=data_term, learnable={"lambda", "theta"}).to(dtype)
    d = model(f, m)
    loss = d.pow(2).sum() + (nt.warp(m, d) - f).pow(2).sum()
    loss.backward()
    for name, g in [("fixed", f.grad), ("moving", m.grad), ("lambda", model.log_lam.grad),
                    ("theta", model.log_theta.grad)]:
        assert g is not None and torch.isfinite(g).all(), name
    if case != "identical":  # identical images: d = 0 and a zero gradient is right
        assert float(f.grad.abs().max()) > 0 and float(model.log_lam.grad.abs().max()) > 0
    assert_sane(d)


@pytest.mark.parametrize("data_term", ["l2", "l1"])
def test_gradients_are_finite_with_extreme_lambda(data_term):
    cfg = nt.preset_config("fast", data_term, 2)
    for lam in (cfg.scaled("lam", 100), cfg.scaled("lam", 0.01)):
        f, m = F32.clone().requires_grad_(), M32.clone().requires_grad_()
        model = nt.NADMMRegistration(data_term=data_term, lam=lam, learnable={"lambda", "theta"})
        d = model(f, m)
        (d.pow(2).sum()).backward()
        for g in (f.grad, m.grad, model.log_lam.grad, model.log_theta.grad):
            assert torch.isfinite(g).all()
        assert_sane(d)


@pytest.mark.parametrize("data_term", ["l2", "l1"])
@pytest.mark.parametrize("preset", ["fast", "accurate"])
def test_cpu_runs_are_bitwise_deterministic(data_term, preset):
    runs = [nt.register(F32, M32, data_term=data_term, preset=preset) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    runs3 = [nt.register(F3, M3, spacing=SP3, data_term=data_term, preset=preset)
             for _ in range(2)]
    assert torch.equal(runs3[0], runs3[1])
    assert_sane(runs[0])
    assert_sane(runs3[0])


def test_gradients_are_bitwise_deterministic_on_cpu():
    grads = []
    for _ in range(2):
        f = F32.clone().requires_grad_()
        model = nt.NADMMRegistration(data_term="l1", learnable="all")
        model(f, M32).pow(2).sum().backward()
        grads.append((f.grad.clone(), model.log_lam.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
