"""θ relative to the pair's characteristic frequency (``theta_scaling="spectral"``)."""

import json
import math

import numpy as np
import pytest
import torch

import nadmm_torch as nt
from nadmm_torch.config import ACDC_SPECTRAL_K2, TUNED, SolverConfig, read_settings
from nadmm_torch.ops.admm import nesterov_admm
from nadmm_torch.ops.solver import normalise_pair, pyramid_factors, spectral_scale
from nadmm_torch.ops.warp import resize
from tests.synthetic import blobs, gaussian_blobs


def _brute_k2(image: np.ndarray, spacing) -> float:
    """k² by explicit loops: central differences with replicated borders, applied twice."""
    ndim = image.ndim

    def diff(a, axis, h):
        out = np.empty_like(a)
        n = a.shape[axis]
        for i in range(n):
            hi, lo = min(i + 1, n - 1), max(i - 1, 0)
            out.swapaxes(0, axis)[i] = (a.swapaxes(0, axis)[hi] - a.swapaxes(0, axis)[lo]) / 2 / h
        return out

    grads = [diff(image, a, spacing[a]) for a in range(ndim)]
    lap = sum(diff(grads[a], a, spacing[a]) for a in range(ndim))
    return float((lap**2).mean() / sum((g**2).mean() for g in grads))


@pytest.mark.parametrize("shape,spacing", [((12, 15), (1.0, 1.5)), ((5, 9, 8), (4.0, 1.0, 1.5))])
def test_spectral_scale_equals_the_loop_definition(shape, spacing):
    f, m = blobs(shape, seed=1), blobs(shape, seed=2)
    expected = 0.5 * (_brute_k2(f[0, 0].numpy(), spacing) + _brute_k2(m[0, 0].numpy(), spacing))
    got = spectral_scale(f, m, spacing)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_spectral_scale_is_contrast_invariant_and_has_units_of_inverse_length_squared():
    f, m = blobs((24, 20), seed=3), blobs((24, 20), seed=4)
    k = spectral_scale(f, m, (1.0, 1.0))
    assert spectral_scale(3 * f + 7, 0.5 * m - 2, (1.0, 1.0)) == pytest.approx(k.item(), rel=1e-10)
    assert spectral_scale(f, m, (2.0, 2.0)).item() == pytest.approx(k.item() / 4, rel=1e-10)
    # finer structure, higher frequency
    coarse = gaussian_blobs([(16, 16)], n=32, r=8.0).double()
    fine = gaussian_blobs([(16, 16)], n=32, r=2.0).double()
    assert spectral_scale(fine, fine, (1.0, 1.0)) > 4 * spectral_scale(coarse, coarse, (1.0, 1.0))


def test_spectral_scale_stays_positive_and_finite_on_ramps_and_constants():
    ramp = torch.linspace(0, 1, 16, dtype=torch.float64).expand(16, 16)[None, None]
    flat = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    for pair in ((ramp, ramp), (flat, flat)):
        k = spectral_scale(*pair, (1.0, 1.0))
        assert torch.isfinite(k).all() and (k > 0).all()


def test_per_element_theta_in_admm_equals_one_solve_per_element():
    torch.manual_seed(0)
    g = torch.randn(3, 2, 10, 12, dtype=torch.float64)
    c = torch.randn(3, 1, 10, 12, dtype=torch.float64)
    theta = torch.tensor([0.05, 0.5, 5.0], dtype=torch.float64).view(3, 1, 1, 1)
    for data_term in ("l2", "l1"):
        kw = dict(lam=0.7, iterations=6, data_term=data_term, restart=True)
        together, _ = nesterov_admm(g, c, theta=theta, **kw)  # the in-place loop
        lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        functional, _ = nesterov_admm(g, c, theta=theta, **{**kw, "lam": lam})  # autograd loop
        for i in range(3):
            alone, _ = nesterov_admm(g[i:i + 1], c[i:i + 1], theta=float(theta[i]), **kw)
            assert torch.allclose(together[i:i + 1], alone, atol=1e-12)
            assert torch.allclose(functional[i:i + 1].detach(), alone, atol=1e-12)


def test_the_solver_multiplies_theta_by_the_pairs_k2_to_the_order():
    f, m = blobs((24, 28), seed=5, dtype=torch.float32), blobs((24, 28), seed=6,
                                                               dtype=torch.float32)
    cfg = SolverConfig.from_preset("paper", warps=(2, 1, 1))
    spectral = nt.register(f, m, preset=cfg)
    fn, mn = normalise_pair(f, m, "percentile")
    theta = []
    for level, factors in enumerate(pyramid_factors(f.shape[2:], (1.0, 1.0), 3)):
        size = tuple(n // q for n, q in zip(f.shape[2:], factors))
        h = tuple(n / s for n, s in zip(f.shape[2:], size))
        k2 = spectral_scale(resize(fn, size, mode="area"), resize(mn, size, mode="area"), h)
        theta.append(cfg.theta[level] * float(k2) ** cfg.order)
    by_hand = nt.register(f, m, preset="paper", warps=(2, 1, 1), theta=tuple(theta),
                          theta_scaling="none")
    assert torch.allclose(spectral, by_hand, atol=1e-4)
    assert not torch.allclose(spectral, nt.register(f, m, preset="paper", warps=(2, 1, 1),
                                                    theta_scaling="none"), atol=1e-3)


def test_batched_pairs_get_their_own_theta():
    f = torch.cat([blobs((20, 20), seed=7, dtype=torch.float32),
                   gaussian_blobs([(10, 10)], n=20, r=6.0)])
    m = torch.cat([blobs((20, 20), seed=8, dtype=torch.float32),
                   gaussian_blobs([(11, 9)], n=20, r=6.0)])
    k2 = spectral_scale(f, m, (1.0, 1.0))
    assert k2.max() > 2 * k2.min()  # θ differs a lot between the two (order 2: > 4×)
    for kw in (dict(preset="paper"), dict(preset="fast", data_term="l1")):
        together = nt.register(f, m, **kw)
        for i in range(2):
            alone = nt.register(f[i:i + 1], m[i:i + 1], **kw)
            assert (together[i:i + 1] - alone).abs().max() < 1e-5


def test_presets_theta_is_relative_to_the_acdc_reference():
    for order in (1, 2, 3):
        cfg = SolverConfig.from_preset("paper", "l2", order)
        absolute = TUNED[("paper", "l2", order)][1]
        absolute = absolute if isinstance(absolute, tuple) else (absolute,) * 3
        assert cfg.theta_scaling == "spectral"
        for value, abs_value, ref in zip(cfg.theta, absolute, ACDC_SPECTRAL_K2):
            assert value == pytest.approx(abs_value / ref**order, rel=1e-12)
    given = SolverConfig.from_preset("paper", theta=0.3)
    assert given.theta == 0.3  # a user's θ is taken as given (relative under "spectral")
    with pytest.raises(ValueError, match=r"^theta_scaling: expected one of"):
        SolverConfig.from_preset("fast", theta_scaling="gradient")


def test_settings_files_keep_the_units_of_their_theta(tmp_path):
    old = tmp_path / "old.json"  # written before theta_scaling existed: absolute θ
    old.write_text(json.dumps(dict(format="nadmm-torch-settings", version=1, preset="fast",
                                   data_term="l2", order=2, overrides=dict(theta=[0.1, 0.2, 0.3]))))
    assert read_settings(old)["theta_scaling"] == "none"
    assert SolverConfig.from_preset(old).theta_scaling == "none"
    f, m = blobs((16, 16), seed=9, dtype=torch.float32), blobs((16, 16), seed=10,
                                                               dtype=torch.float32)
    result = nt.tune([nt.TunePair(f, m)], preset="fast", epochs=1, val_pairs=0,
                     learnable="theta", progress=False, iterations=2, warps=(1, 1, 0))
    new = result.save(tmp_path / "new.json")
    assert read_settings(new)["theta_scaling"] == "spectral"
    assert math.isfinite(float(nt.register(f, m, preset=str(new)).abs().max()))


def test_per_iteration_theta_schedules_are_applied_per_element():
    f = torch.cat([blobs((20, 20), seed=11, dtype=torch.float32),
                   gaussian_blobs([(10, 10)], n=20, r=6.0)])
    m = torch.cat([blobs((20, 20), seed=12, dtype=torch.float32),
                   gaussian_blobs([(11, 9)], n=20, r=6.0)])
    model = nt.NADMMRegistration("paper", learnable="theta", schedule="iteration",
                                 warps=(1, 1, 1))
    together = model(f, m)
    together.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        for i in range(2):
            alone = model(f[i:i + 1], m[i:i + 1])
            assert (together[i:i + 1].detach() - alone).abs().max() < 1e-5


def test_the_data_mask_weights_the_characteristic_frequency():
    f, m = blobs((24, 24), seed=13), blobs((24, 24), seed=14)
    k = spectral_scale(f, m, (1.0, 1.0))
    ones = torch.ones(1, 1, 24, 24, dtype=f.dtype)
    assert spectral_scale(f, m, (1.0, 1.0), weight=ones).item() == pytest.approx(k.item(),
                                                                                  rel=1e-12)
    mask = torch.zeros_like(ones)
    mask[..., 4:20, 4:20] = 1.0
    noisy = f.clone()
    noisy[..., :, :2] = torch.rand(24, 2, generator=torch.Generator().manual_seed(0),
                                   dtype=f.dtype)  # fine content outside the mask
    inside = spectral_scale(f, m, (1.0, 1.0), weight=mask)
    assert spectral_scale(noisy, m, (1.0, 1.0), weight=mask).item() == pytest.approx(
        inside.item(), rel=1e-12)
    assert spectral_scale(noisy, m, (1.0, 1.0)).item() != pytest.approx(k.item(), rel=1e-3)


def test_channels_each_weigh_alike_in_the_characteristic_frequency():
    f, m = blobs((20, 22), seed=15), blobs((20, 22), seed=16)
    w = torch.zeros(1, 1, 20, 22, dtype=f.dtype)
    w[..., 3:17, 2:20] = 0.5
    one = spectral_scale(f, m, (1.0, 1.0), weight=w)
    three = spectral_scale(f.repeat(2, 3, 1, 1), m.repeat(2, 3, 1, 1), (1.0, 1.0), weight=w)
    assert three.shape == (2,)
    torch.testing.assert_close(three, one.expand(2), rtol=1e-12, atol=0)


def test_state_dicts_saved_before_theta_scaling_mean_absolute_theta():
    saved = nt.NADMMRegistration("fast", learnable="theta").state_dict()
    doc = json.loads(bytes(saved["_extra_state"].tolist()).decode())
    assert doc["settings"]["theta_scaling"] == "spectral"
    del doc["settings"]["theta_scaling"]  # a record written before the option existed
    saved["_extra_state"] = torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"theta_scaling: saved 'none', this module 'spectral'"):
        nt.NADMMRegistration("fast", learnable="theta").load_state_dict(saved)
    nt.NADMMRegistration("fast", learnable="theta", theta_scaling="none").load_state_dict(saved)
