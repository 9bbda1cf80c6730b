from dataclasses import replace

import pytest
import torch

import nadmm_torch as nt
from nadmm_torch.config import SolverConfig
from nadmm_torch.data.sample import load_sample
from nadmm_torch.ops.solver import (
    pyramid_factors,
    repair_folds,
    safeguarded_compose,
    solve,
)
from nadmm_torch.ops.warp import warp_labels

from .synthetic import blobs, smooth_field


def test_identical_images_give_zero_displacement():
    img = blobs((24, 20), dtype=torch.float32)
    d = nt.register(img, img.clone())
    assert d.shape == (1, 2, 24, 20)
    assert d.abs().max() < 1e-5


@pytest.mark.parametrize(
    "data_term,preset,max_epe", [("l2", "paper", 0.25), ("l1", "paper", 0.25), ("l2", "fast", 0.35)]
)
def test_recovers_a_known_deformation_of_an_acdc_slice(data_term, preset, max_epe):
    """EPE bound relative to the mean motion; ``fast`` solves at half resolution (measured
    EPE/|d|: paper 0.12 (l2), 0.04 (l1); fast 0.30 (l2))."""
    s = load_sample()
    z = s.moving.shape[2] // 2  # a mid-ventricular slice, registered in 2D
    moving, labels = s.moving[:, :, z], s.moving_labels[:, :, z]
    spacing = s.spacing[1:]
    d_true = smooth_field(tuple(moving.shape[2:]), 3.0, seed=1)
    fixed = nt.warp(moving, d_true)
    d = nt.register(fixed, moving, spacing=spacing, data_term=data_term, preset=preset)
    target = warp_labels(labels, d_true)
    heart = (labels[0, 0] > 0) | (target[0, 0] > 0)
    epe = (d - d_true).norm(dim=1)[0][heart].mean()
    magnitude = d_true.norm(dim=1)[0][heart].mean()
    print(f"{data_term}: EPE {epe:.3f} voxels against mean |d| {magnitude:.3f}")
    assert epe < max_epe * magnitude
    before = nt.dice(labels, target).mean()
    after = nt.dice(warp_labels(labels, d), target).mean()
    assert after > (0.98 if preset == "paper" else 0.95) > before  # unregistered ~0.91
    assert float(nt.fold_percent(d)[0]) == 0.0


def test_frozen_axes_keep_their_component_zero():
    s = load_sample()
    d = nt.register(s.fixed, s.moving, spacing=s.spacing, frozen_axes="thick")
    assert d[:, 0].abs().max() == 0  # the 10 mm slice axis
    assert d[:, 1:].abs().max() > 0.5


def test_gradcheck_through_two_warps():
    cfg = SolverConfig(lam=2.0, theta=0.5, levels=1, iterations=3, warps=2, normalize=False)
    fixed = blobs((7, 6), seed=1)
    moving = blobs((7, 6), seed=2)
    lam = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    fixed.requires_grad_(True)
    moving.requires_grad_(True)

    def fn(f, m, la, th):
        d, _ = solve(f, m, cfg, lam=[la], theta=[th])
        return d

    assert torch.autograd.gradcheck(fn, (fixed, moving, lam, theta), eps=1e-6, atol=1e-5)


def test_gradients_reach_every_learnable_and_the_initial_displacement():
    model = nt.NADMMRegistration(learnable="all", schedule="iteration", iterations=(3, 2),
                                 warps=(2, 2), levels=2)
    fixed = blobs((16, 16), seed=3, dtype=torch.float32)
    moving = blobs((16, 16), seed=4, dtype=torch.float32)
    init = torch.zeros(1, 2, 16, 16, requires_grad=True)
    d = model(fixed, moving, initial_displacement=init)
    (d**2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert init.grad is not None and init.grad.abs().sum() > 0


def test_batch_elements_are_independent():
    pairs = [(blobs((20, 18), seed=2 * i), blobs((20, 18), seed=2 * i + 1)) for i in range(2)]
    fixed = torch.cat([p[0] for p in pairs])
    moving = torch.cat([p[1] for p in pairs])
    for preset in ("fast", "accurate"):
        together = nt.register(fixed, moving, preset=preset)
        for i, (f, m) in enumerate(pairs):
            alone = nt.register(f, m, preset=preset)
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_float32_and_float64_agree_and_half_is_upcast(preset):
    f64, m64 = blobs((20, 20), seed=5), blobs((20, 20), seed=6)
    d64 = nt.register(f64, m64, preset=preset, normalize="minmax")
    d32 = nt.register(f64.float(), m64.float(), preset=preset, normalize="minmax")
    assert d64.dtype == torch.float64 and d32.dtype == torch.float32
    # float32 rounding relative to the field's size (|d| reaches ~12 voxels on this 20×20 pair)
    scale = max(1.0, float(d64.abs().max()))
    torch.testing.assert_close(d32.double(), d64, rtol=0, atol=3e-4 * scale)
    # The default percentile map clips 7 of the 800 pixels to plateaus, which makes this
    # extreme pair (|d| ≈ 11 voxels on 20 × 20) more sensitive to rounding: measured 0.03 voxel
    # (0.007 without the clipping, 1.5e-4 with min–max). Still far below what matters.
    d64 = nt.register(f64, m64, preset=preset)
    d32 = nt.register(f64.float(), m64.float(), preset=preset)
    torch.testing.assert_close(d32.double(), d64, rtol=0, atol=5e-3 * scale)
    dbf = nt.register(f64.bfloat16(), m64.bfloat16())
    assert dbf.dtype == torch.float32 and torch.isfinite(dbf).all()


def test_diagnostics_report_levels_and_iterations():
    f, m = blobs((32, 32), seed=7), blobs((32, 32), seed=8)
    d, diag = nt.register(f, m, preset="paper", return_diagnostics=True)
    assert diag.shapes == [(8, 8), (16, 16), (32, 32)]
    assert diag.warps == [10, 10, 5]
    assert [int(w[0][0]) for w in diag.admm_iterations] == [10, 5, 5]
    d, diag = nt.register(f, m, return_diagnostics=True)  # fast: no warps on the finest level
    assert d.shape == (1, 2, 32, 32)
    assert diag.shapes == [(8, 8), (16, 16), (16, 16)]
    assert diag.warps == [7, 5, 0]
    assert [len(w) for w in diag.admm_iterations] == [7, 5, 0]
    d, diag = nt.register(f, m, preset="accurate", return_diagnostics=True)
    assert all(int(it[0]) <= 60 for level in diag.admm_iterations for it in level)
    assert len(diag.residuals[-1][0]) == int(diag.admm_iterations[-1][0][0])


def test_safeguard_scales_down_a_folding_step():
    d = torch.zeros(1, 2, 16, 16, dtype=torch.float64)
    u = torch.zeros_like(d)
    u[:, 1, :, 8:] = -3.0  # a step that tears: det(I + ∇u) < 0 at the jump
    folded = nt.fold_percent(u)
    assert folded > 0
    d_new, s = safeguarded_compose(d, u)
    assert float(s[0]) < 1.0
    assert float(nt.fold_percent(d_new)[0]) == 0.0


def test_pyramid_keeps_thick_slices():
    assert pyramid_factors((10, 128, 128), (10.0, 1.5, 1.5), 3) == [(1, 4, 4), (1, 2, 2), (1, 1, 1)]
    assert pyramid_factors((96, 128, 128), (1.2, 1.2, 1.2), 3) == [(4, 4, 4), (2, 2, 2), (1, 1, 1)]
    assert pyramid_factors((8, 6), (1.0, 1.0), 3) == [(2, 1), (2, 1), (1, 1)]


@pytest.mark.parametrize(
    "fixed,moving,kwargs,error,match",
    [
        (torch.rand(8, 8), torch.rand(8, 8), {}, ValueError, "fixed: expected a"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9), {}, ValueError, "moving: spatial shape"),
        (torch.rand(1, 1, 8, 8), torch.rand(2, 1, 8, 8), {}, ValueError, "batch size"),
        (torch.rand(1, 2, 8, 8), torch.rand(1, 3, 8, 8), {}, ValueError, "same number of ch"),
        (torch.full((1, 1, 8, 8), float("nan")), torch.rand(1, 1, 8, 8), {}, ValueError,
         "fixed: contains non-finite"),
        (torch.ones(1, 1, 8, 8, dtype=torch.long), torch.rand(1, 1, 8, 8), {}, TypeError,
         "fixed: expected a floating"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8).double(), {}, TypeError, "dtype"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), {"spacing": (1.0,)}, ValueError,
         "spacing: expected 2"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), {"spacing": (1.0, -1.0)}, ValueError,
         "spacing: expected positive"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), {"preset": "turbo"}, ValueError, "preset"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), {"lamda": 1.0}, ValueError,
         "unknown option"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), {"data_term": "l3"}, ValueError,
         "data_term"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), {"lam": -1.0}, ValueError, "lam"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8),
         {"initial_displacement": torch.zeros(1, 2, 4, 4)}, ValueError, "initial_displacement"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(fixed, moving, kwargs, error, match):
    with pytest.raises(error, match=match):
        nt.register(fixed, moving, **kwargs)


def test_repair_folds_removes_a_fold_and_leaves_the_rest_alone():
    d = smooth_field((32, 32), 1.0, seed=3, dtype=torch.float64)
    d[:, 0, 16, 16] += 2.5  # a spike: det(I + ∇d) < 0 next to it
    d[:, 0, 17, 16] -= 2.5
    assert float(nt.fold_percent(d)[0]) > 0
    fixed = repair_folds(d)
    assert float(nt.fold_percent(fixed)[0]) == 0.0
    far = torch.ones(32, 32, dtype=torch.bool)
    far[8:26, 8:26] = False
    torch.testing.assert_close(fixed[:, :, far], d[:, :, far], rtol=0, atol=0)


def test_upsampling_between_levels_never_leaves_folds_on_acdc():
    # Settings that push the safeguard (large λ): coarse fields close to folding, whose linear
    # upsampling alone would fold on this pair (patient037 of the bundled sample).
    s = load_sample()
    d = nt.register(s.fixed, s.moving, spacing=s.spacing, lam=10.0, theta=0.01)
    assert float(nt.fold_percent(d)[0]) == 0.0


def test_a_level_without_warps_is_skipped_and_its_coarser_field_upsampled():
    """``warps=(.., 0)`` on the finest level = solving on the half-resolution pair, then
    upsampling: the same numbers as doing that by hand."""
    from nadmm_torch.ops.warp import resize, resize_displacement

    fixed, moving = blobs((32, 32), seed=1), blobs((32, 32), seed=2)
    cfg = SolverConfig(lam=5.0, theta=0.1, iterations=(4, 3, 3), warps=(2, 2, 0), normalize=False)
    d, diag = solve(fixed, moving, cfg, spacing=(1.0, 1.0), diagnostics=True)
    assert d.shape == (1, 2, 32, 32)
    assert diag.warps == [2, 2, 0]

    half = (16, 16)
    cfg2 = replace(cfg, levels=2, iterations=(4, 3), warps=(2, 2))
    d_half, _ = solve(resize(fixed, half, mode="area"), resize(moving, half, mode="area"), cfg2,
                      spacing=(2.0, 2.0))
    expected = repair_folds(resize_displacement(d_half, (32, 32)))
    torch.testing.assert_close(d, expected, atol=1e-6, rtol=1e-6)
    assert d.abs().max() > 0.1  # it did register


def test_all_levels_without_warps_return_the_initial_displacement():
    fixed, moving = blobs((16, 16), seed=1), blobs((16, 16), seed=2)
    cfg = SolverConfig(warps=(0, 0, 0))
    assert torch.equal(solve(fixed, moving, cfg)[0], torch.zeros(1, 2, 16, 16, dtype=fixed.dtype))
    init = 0.1 * torch.ones(1, 2, 16, 16, dtype=fixed.dtype)
    assert torch.equal(solve(fixed, moving, cfg, initial_displacement=init)[0], init)
