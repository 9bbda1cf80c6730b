"""Reliability: inputs a hostile or unlucky user gives, and what comes back.

Each test here failed on the code before its fix: identical images that moved, label maps with
large ids, folding initial displacements, constant images, NumPy spacings, float32 overflow,
preset schedules that did not follow ``levels``, truthy strings for booleans, meta tensors,
non-finite learnable parameters and state dicts loaded into a differently configured module.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nadmm_torch as nt
from nadmm_torch.data.sample import load_sample
from nadmm_torch.ops.warp import warp as raw_warp


def sample_slice(size: int = 32) -> torch.Tensor:
    """A (1, 1, size, size) crop of the bundled sample's mid slice (real image content)."""
    s = load_sample()
    z = s.fixed.shape[2] // 2
    y0 = (s.fixed.shape[3] - size) // 2
    x0 = (s.fixed.shape[4] - size) // 2
    return s.fixed[:, :, z, y0:y0 + size, x0:x0 + size].contiguous()


# -- zero displacement warps exactly; identical images do not move --------------------------

@pytest.mark.parametrize("shape", [(37, 53), (128, 128), (5, 17, 33), (7, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_displacement_warps_exactly(shape, dtype):
    img = torch.randn(2, 3, *shape, dtype=dtype)
    zero = torch.zeros(2, len(shape), *shape, dtype=dtype)
    assert torch.equal(raw_warp(img, zero), img)
    assert torch.equal(nt.warp(img, zero), img)
    # partly zero: exact where d = 0, interpolated elsewhere
    d = zero.clone()
    d[..., : shape[-1] // 2] = 0.5
    out = raw_warp(img, d)
    half = shape[-1] // 2
    assert torch.equal(out[..., half:], img[..., half:])
    assert not torch.equal(out[..., :half], img[..., :half])


def test_zero_displacement_warp_keeps_grid_sample_gradients():
    # The exact value must not cost the gradient: d/dd and d/dI equal grid_sample's at d = 0.
    img = torch.rand(1, 2, 9, 11, dtype=torch.float64, requires_grad=True)
    d = torch.zeros(1, 2, 9, 11, dtype=torch.float64, requires_grad=True)
    w = torch.rand(1, 2, 9, 11, dtype=torch.float64)
    (raw_warp(img, d) * w).sum().backward()
    g_img, g_d = img.grad.clone(), d.grad.clone()
    img.grad = d.grad = None
    from nadmm_torch.ops.warp import _normalised_grid

    ref = F.grid_sample(img, _normalised_grid(d), mode="bilinear", padding_mode="border",
                        align_corners=True)
    (ref * w).sum().backward()
    torch.testing.assert_close(g_img, img.grad)
    torch.testing.assert_close(g_d, d.grad)
    assert float(g_d.abs().max()) > 0  # the image gradient reaches the displacement


@pytest.mark.parametrize("preset", ["fast", "paper", "accurate"])
def test_identical_images_do_not_move(preset):
    f = sample_slice(48)
    for data_term in ("l1", "l2"):
        for order in (1, 2, 3):
            d = nt.register(f, f.clone(), spacing=(4.0, 4.0), preset=preset,
                            data_term=data_term, order=order)
            assert float(d.abs().max()) <= 0.05, (data_term, order)


# -- label maps with large ids -----------------------------------------------------------------

def _warp_labels_brute_force(labels: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """One-hot over the present labels at once (small K only), argmax, mapped back."""
    values = torch.unique(labels)
    onehot = torch.stack([(labels[:, 0] == v) for v in values], dim=1).to(d.dtype)
    return values[raw_warp(onehot, d).argmax(dim=1, keepdim=True)]


@pytest.mark.parametrize("shape", [(24, 20), (6, 12, 10)])
def test_warp_labels_with_large_ids_costs_only_the_present_labels(shape):
    from nadmm_torch.ops.warp import warp_labels as raw_warp_labels

    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 2, 17, 60000, 2**40, -5])  # FreeSurfer-style ids, and absurd ones
    # 40 labels in all: more than one chunk of the running maximum
    ids = torch.cat([ids, torch.arange(100, 134)])
    labels = ids[torch.randint(0, len(ids), (2, 1, *shape), generator=gen)]
    d = 1.5 * torch.randn(2, len(shape), *shape, generator=gen)
    # over 0..max this would be a 2**40-channel one-hot (> 10^14 bytes): it must not be tried
    out = raw_warp_labels(labels, d)
    assert out.dtype == labels.dtype and out.shape == labels.shape
    assert torch.equal(out, _warp_labels_brute_force(labels, d))
    assert torch.equal(nt.warp_labels(labels, d), out)
    assert set(out.unique().tolist()) <= set(ids.tolist())


def test_warp_labels_public_function_validates_and_keeps_old_callers():
    from nadmm_torch.ops.warp import warp_labels as raw_warp_labels

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (1, 1, 8, 8), generator=g)
    # quarter-voxel steps: exact in float16 too, so the half-precision call sees the same field
    d = torch.randint(-8, 9, (1, 2, 8, 8), generator=g) / 4.0
    # the form the CLI, the demo and the Lightning module call: num_classes = max + 1
    assert torch.equal(raw_warp_labels(labels, d, num_classes=6), nt.warp_labels(labels, d))
    assert torch.equal(nt.warp_labels(labels, torch.zeros(1, 2, 8, 8)), labels)  # exact identity
    # a half-precision field is sampled in float32 (comparing with ``d`` itself would depend on
    # whether rounding ``d`` to half moves a voxel across a label boundary)
    assert torch.equal(nt.warp_labels(labels.to(torch.uint8), d.half()),
                       nt.warp_labels(labels, d.half().float()).to(torch.uint8))
    with pytest.raises(ValueError, match=r"^labels: expected values in \[0, 3\)"):
        raw_warp_labels(labels, d, num_classes=3)
    with pytest.raises(TypeError, match=r"^labels: expected an integer label map"):
        nt.warp_labels(labels.float(), d)
    with pytest.raises(ValueError, match=r"^labels: expected a \(B, 1, H, W\)"):
        nt.warp_labels(labels[0], d)
    with pytest.raises(ValueError, match=r"^displacement: shape"):
        nt.warp_labels(labels, torch.zeros(1, 2, 8, 9))
    with pytest.raises(TypeError, match=r"^labels: expected a torch.Tensor"):
        nt.warp_labels(labels.numpy(), d)


# -- the presets' schedules follow ``levels`` ----------------------------------------------------

@pytest.mark.parametrize("preset", ["fast", "paper", "accurate"])
@pytest.mark.parametrize("levels", [1, 2, 4, 10])
def test_preset_schedules_follow_levels(preset, levels):
    from nadmm_torch.config import PRESETS, preset_config

    cfg = preset_config(preset, "l2", 2, levels=levels)
    base = PRESETS[preset]
    assert len(cfg.iterations) == len(cfg.warps) == len(cfg.per_level("lam")) == levels
    k = min(levels, 3)  # aligned at the finest level; added coarser levels repeat the coarsest
    assert cfg.iterations[-k:] == base["iterations"][-k:]
    assert cfg.iterations[:levels - k] == (base["iterations"][0],) * (levels - k)
    assert any(cfg.warps), "some level must warp"
    if levels > 1:
        assert cfg.warps[-k:] == base["warps"][-k:]
    elif preset == "fast":  # its finest level has no warps: the single level takes the middle's
        assert cfg.warps == (5,)


def test_levels_override_registers_and_explicit_lengths_are_checked():
    f = sample_slice(48)
    m = raw_warp(f, torch.full((1, 2, 48, 48), 1.0))
    for levels in (1, 10):
        d = nt.register(f, m, levels=levels)
        assert torch.isfinite(d).all() and float(d.abs().mean()) > 0.3, levels
    d = nt.register(f, m, levels=2, iterations=3, warps=(4, 2))  # explicit values still win
    assert torch.isfinite(d).all()
    with pytest.raises(ValueError, match=r"^iterations: expected one integer >= 1, or 1 of them "
                                         r"\(one per level, coarse to fine, for levels=1\), got"):
        nt.register(f, m, levels=1, iterations=(5, 5, 5))
    with pytest.raises(ValueError, match=r"^warps: expected one integer >= 0, or 4 of them"):
        nt.NADMMRegistration(levels=4, warps=(5, 5))
    with pytest.raises(ValueError, match=r"^lam: expected one number, or 2 of them"):
        nt.register(f, m, levels=2, lam=(1.0, 2.0, 3.0))


# -- NumPy spacings; values that would overflow float32 ------------------------------------------

def test_numpy_spacings_are_accepted():
    import numpy as np

    f = sample_slice(32)
    m = raw_warp(f, torch.full((1, 2, 32, 32), 0.7))
    ref = nt.register(f, m, spacing=(1.5, 1.5))
    for spacing in (np.array([1.5, 1.5]), np.array([1.5, 1.5], dtype=np.float32),
                    np.float32(1.5), np.float64(1.5), np.array(1.5),
                    [np.float32(1.5), np.float32(1.5)]):
        assert torch.equal(nt.register(f, m, spacing=spacing), ref), repr(spacing)
        assert torch.equal(nt.NADMMRegistration()(f, m, spacing=spacing), ref), repr(spacing)
    # per-level λ as a NumPy array, like a tuple
    lam = (0.3, 1.7, 1.7)
    assert torch.equal(nt.register(f, m, lam=np.array(lam)), nt.register(f, m, lam=lam))
    with pytest.raises(ValueError, match=r"^spacing: expected 2 numbers"):
        nt.register(f, m, spacing=np.array([1.5, 1.5, 1.5]))


@pytest.mark.parametrize("kwargs,match", [
    ({"lam": 1e38}, r"^lam: expected values in \[1e-12, 1e\+12\]"),
    ({"lam": 1e-13}, r"^lam: expected values in \[1e-12, 1e\+12\]"),
    ({"lam": (1.0, 1e13, 1.0)}, r"^lam: .*\].*got 10000000000000\.0"),
    ({"theta": 1e-300}, r"^theta: expected values in \[1e-12, 1e\+12\]"),
    ({"theta": 1e15}, r"^theta: expected values in \[1e-12, 1e\+12\]"),
    ({"spacing": 1e-30}, r"^spacing: expected values in \[1e-06, 1e\+06\] mm"),
    ({"spacing": (1.0, 1e7)}, r"^spacing: expected values in \[1e-06, 1e\+06\] mm"),
])
def test_values_that_overflow_float32_are_refused(kwargs, match):
    f = sample_slice(32)
    with pytest.raises(ValueError, match=match):
        nt.register(f, f.flip(-1), **kwargs)


def test_extreme_values_inside_the_bounds_stay_finite():
    f = sample_slice(32)
    m = raw_warp(f, torch.full((1, 2, 32, 32), 0.7))
    for kwargs in ({"lam": 1e12, "theta": 1e-12, "spacing": 1e-6},
                   {"lam": 1e-12, "theta": 1e12, "spacing": 1e6},
                   {"lam": 1e12, "theta": 1e12, "spacing": (1e-6, 1e6)}):
        for order in (1, 3):
            d = nt.register(f, m, order=order, data_term="l1", **kwargs)
            assert torch.isfinite(d).all() and float(nt.fold_percent(d)[0]) == 0.0


# -- booleans are booleans -------------------------------------------------------------------

@pytest.mark.parametrize("value", ["no", "False", 1, 0, None, 0.0])
def test_truthy_values_are_not_booleans(value):
    f = sample_slice(32)
    m = f.flip(-1)
    with pytest.raises((TypeError, ValueError),
                       match=rf"^checkpoint: expected True, False or 'auto', got {value!r}"):
        nt.NADMMRegistration(checkpoint=value)
    with pytest.raises(TypeError, match=r"^return_diagnostics: expected True or False"):
        nt.register(f, m, return_diagnostics=value)
    with pytest.raises(TypeError, match=r"^return_diagnostics: expected True or False"):
        nt.NADMMRegistration()(f, m, return_diagnostics=value)
    if value is None:  # None for a solver option means "the preset's value"
        return
    for option in ("safeguard", "restart", "accelerated", "anisotropic_pyramid"):
        with pytest.raises(TypeError, match=rf"^{option}: expected True or False"):
            nt.register(f, m, **{option: value})
    with pytest.raises((TypeError, ValueError), match=r"^normalize: expected one of"):
        nt.register(f, m, normalize=value)


def test_numpy_booleans_are_booleans():
    import numpy as np

    f = sample_slice(32)
    m = raw_warp(f, torch.full((1, 2, 32, 32), 0.7))
    model = nt.NADMMRegistration(checkpoint=np.False_, safeguard=np.True_)
    assert model.checkpoint is False and model.config.safeguard is True
    d, diag = model(f, m, return_diagnostics=np.True_)
    assert torch.equal(d, nt.register(f, m, return_diagnostics=True)[0]) and diag is not None


# -- meta tensors ------------------------------------------------------------------------------

def test_meta_tensors_get_a_clear_error():
    f = sample_slice(32)
    meta = f.to("meta")
    msg = r"^{}: meta tensors have no data"
    with pytest.raises(ValueError, match=msg.format("fixed")):
        nt.register(meta, meta)
    with pytest.raises(ValueError, match=msg.format("fixed")):
        nt.NADMMRegistration().to("meta")(meta, meta)
    with pytest.raises(ValueError, match=r"^initial_displacement: on meta, the image on cpu"):
        nt.register(f, f, initial_displacement=torch.zeros(1, 2, 32, 32, device="meta"))
    zero_meta = torch.zeros(1, 2, 32, 32, device="meta")
    with pytest.raises(ValueError, match=msg.format("displacement")):
        nt.warp(meta, zero_meta)
    with pytest.raises(ValueError, match=msg.format("displacement")):
        nt.warp_labels(torch.zeros(1, 1, 32, 32, dtype=torch.long, device="meta"), zero_meta)
    with pytest.raises(ValueError, match=msg.format("displacement")):
        nt.fold_percent(zero_meta)


# -- non-finite learnable parameters -----------------------------------------------------------

@pytest.mark.parametrize("attr,key", [("log_lam", "lambda"), ("log_theta", "theta"),
                                      ("momentum_logit", "momentum"), ("log_step", "step")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e4])
def test_non_finite_parameters_are_named(attr, key, value):
    f = sample_slice(32)
    m = raw_warp(f, torch.full((1, 2, 32, 32), 0.7))
    model = nt.NADMMRegistration(learnable=True)
    if attr == "momentum_logit" and abs(value) == 1e4:
        value = float("nan")  # sigmoid saturates harmlessly: only non-finite logits are bad
    with torch.no_grad():
        getattr(model, attr)[-1, 0] = value
    with pytest.raises(ValueError, match=rf"^{attr} \(learnable parameter '{key}'\): holds "
                                         "non-finite values"):
        model(f, m)


# -- state dicts carry the settings ------------------------------------------------------------

def test_state_dict_of_other_settings_is_refused_before_anything_loads():
    order1 = nt.NADMMRegistration(order=1, learnable=True)
    order3 = nt.NADMMRegistration(order=3, learnable=True)
    before = {k: v.clone() for k, v in order3.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match=r"^state_dict: saved from a NADMMRegistration with "
                                         r"other settings \(order: saved 1, this module 3\)"):
        order3.load_state_dict(order1.state_dict())
    after = order3.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was loaded
    with pytest.raises(ValueError, match=r"data_term: saved 'l2', this module 'l1'.*"
                                         r"schedule: saved 'level', this module 'iteration'"):
        nt.NADMMRegistration(data_term="l1", schedule="iteration").load_state_dict(
            nt.NADMMRegistration().state_dict(), strict=False)
    # inside another module (a prefix), too
    with pytest.raises(ValueError, match=r"order: saved 1, this module 3"):
        torch.nn.Sequential(order3).load_state_dict(torch.nn.Sequential(order1).state_dict())
    broken = dict(order1.state_dict(), _extra_state=torch.zeros(3))
    with pytest.raises(ValueError, match=r"^state_dict: '_extra_state' is not a "
                                         "NADMMRegistration settings record"):
        order1.load_state_dict(broken)


def test_state_dict_round_trip_and_old_state_dicts(tmp_path):
    from nadmm_torch.module import initial_values

    trained = nt.NADMMRegistration(order=1, learnable=True)
    with torch.no_grad():
        trained.log_lam.add_(0.5)
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    state = torch.load(path, weights_only=True)  # plain data: loads with weights_only
    assert all(torch.is_tensor(v) for v in state.values())  # generic state-dict code works
    state = {k: v.clone() for k, v in state.items()}
    fresh = nt.NADMMRegistration(order=1, learnable=True, lam=3.0)  # λ is carried, not compared
    fresh.load_state_dict(state)
    assert torch.equal(fresh.log_lam, trained.log_lam)
    # a state dict saved before the settings were stored still loads, strictly
    old = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    fresh = nt.NADMMRegistration(order=1, learnable=True)
    fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh.log_lam, trained.log_lam)
    # Earlier versions stored what is not learnable as buffers holding the config's values:
    # they are dropped (the config holds them), also by strict loading ...
    classical = nt.NADMMRegistration(order=1)
    assert dict(classical.named_parameters()) == {} and dict(classical.named_buffers()) == {}
    buffers = initial_values(classical.config, "level")
    classical.load_state_dict(dict(buffers), strict=True)
    only_lam = nt.NADMMRegistration(order=1, learnable="lambda")
    only_lam.load_state_dict({**buffers, "log_lam": trained.log_lam.detach()}, strict=True)
    assert torch.equal(only_lam.log_lam, trained.log_lam)
    assert not hasattr(only_lam, "log_theta")
    # ... but learned values are never dropped silently
    with pytest.raises(ValueError, match=r"^state_dict: log_lam holds values other than this "
                                         r"module's settings give, and 'lambda' is not learnable"):
        nt.NADMMRegistration(order=1).load_state_dict(old, strict=False)


# -- constant images: the initial displacement (or zero) for that element, with a warning -------

def _pair_batch():
    f = sample_slice(32)
    m = raw_warp(f, torch.full((1, 2, 32, 32), 0.7))
    # element 0: a real pair; 1: blank fixed crop; 2: both blank; 3: blank moving crop
    fixed = torch.cat([f, torch.zeros_like(f), torch.full_like(f, 3.0), f])
    moving = torch.cat([m, m, torch.full_like(f, 3.0), torch.full_like(f, -2.0)])
    return fixed, moving


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_constant_images_get_the_initial_displacement_with_a_warning(preset):
    fixed, moving = _pair_batch()
    with pytest.warns(UserWarning, match=r"constant image in batch element\(s\) \[1, 2, 3\]"):
        d, diag = nt.register(fixed, moving, preset=preset, return_diagnostics=True)
    assert diag.constant_elements == [1, 2, 3]
    assert torch.equal(d[1:], torch.zeros_like(d[1:]))
    alone = nt.register(fixed[:1], moving[:1], preset=preset)
    torch.testing.assert_close(d[:1], alone, rtol=0, atol=1e-5)
    assert float(alone.abs().mean()) > 0.3
    init = 0.3 * torch.ones(4, 2, 32, 32)
    with pytest.warns(UserWarning, match=r"constant image"):
        d = nt.register(fixed, moving, preset=preset, initial_displacement=init)
    assert torch.equal(d[1:], init[1:])
    with pytest.warns(UserWarning, match=r"constant image in batch element\(s\) \[0\]"):
        module_d = nt.NADMMRegistration(preset)(fixed[1:2], moving[1:2])
    assert torch.equal(module_d, torch.zeros_like(module_d))


def test_constant_images_keep_gradients_finite():
    fixed, moving = _pair_batch()
    fixed.requires_grad_(True)
    moving.requires_grad_(True)
    model = nt.NADMMRegistration(learnable=True)
    init = torch.zeros(4, 2, 32, 32, requires_grad=True)
    with pytest.warns(UserWarning, match=r"constant image"):
        d = model(fixed, moving, initial_displacement=init)
    w = torch.linspace(0, 1, 32)
    (d * w).sum().backward()
    for name, t in [("fixed", fixed), ("moving", moving), ("init", init),
                    *model.named_parameters()]:
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
    assert float(fixed.grad[0].abs().max()) > 0  # the real pair's gradient is there
    # the constant elements return the initial displacement itself: its gradient is the weight
    torch.testing.assert_close(init.grad[1:], w.expand(3, 2, 32, 32))
    assert float(fixed.grad[1:].abs().max()) == 0.0 == float(moving.grad[1:].abs().max())


def test_normalise_pair_of_a_constant_pair_is_finite():
    from nadmm_torch.ops.solver import normalise_pair

    f = torch.full((2, 1, 8, 8), 5.0, requires_grad=True)
    m = torch.full((2, 1, 8, 8), 5.0, requires_grad=True)
    a, b = normalise_pair(f, m)
    assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, torch.zeros_like(b))
    (a.sum() + b.sum()).backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(m.grad).all()


def test_nan_and_empty_inputs_are_still_errors():
    f = sample_slice(32)
    with pytest.raises(ValueError, match=r"^fixed: contains non-finite values"):
        nt.register(torch.full_like(f, float("nan")), f)
    with pytest.raises(ValueError, match=r"^fixed: is empty"):
        nt.register(f[:0], f[:0])


# -- folding initial displacements: repaired (with a warning) or refused ------------------------

def forward_det(d: torch.Tensor) -> torch.Tensor:
    """det(I + ∇d) by forward differences on the cells ``[0, n-2]`` of every axis (2D/3D):
    the Jacobian of the multilinear interpolant at each cell's first corner."""
    ndim = d.shape[1]
    cols = []
    for j in range(ndim):
        g = torch.diff(d, dim=2 + j)  # ∂_j d, one shorter along axis j
        cut = [slice(None), slice(None)] + [
            slice(None) if k == j else slice(0, -1) for k in range(ndim)
        ]
        cols.append(g[tuple(cut)])
    jac = torch.stack(cols, dim=-1).movedim(1, -2)  # (B, *cells, i, j) = ∂_j d_i
    return torch.linalg.det(jac + torch.eye(ndim, dtype=d.dtype))


def assert_fold_free(d: torch.Tensor) -> None:
    assert torch.isfinite(d).all()
    assert float(nt.fold_percent(d).max()) == 0.0
    assert float(nt.jacobian_determinant(d).min()) > 0
    assert float(forward_det(d).min()) > 0


def test_a_mirror_flip_is_refused():
    f = sample_slice(32)
    x = torch.arange(32.0)
    flip = torch.zeros(2, 2, 32, 32)
    flip[1, 1] = 31 - 2 * x  # element 1: x -> 31 - x, det J = -1 everywhere
    with pytest.raises(ValueError, match=r"^initial_displacement: folds \(det J <= 0\) at more "
                                         r"than 50 % of the voxels \(element 1: 100\.0 %\)"):
        nt.register(torch.cat([f, f]), torch.cat([f, f.flip(-1)]), initial_displacement=flip)


@pytest.mark.parametrize("kwargs", [{}, {"preset": "paper"}, {"levels": 1}, {"warps": 0},
                                    {"levels": 1, "warps": 0}])
def test_a_noisy_initial_displacement_is_repaired_with_a_warning(kwargs):
    from tests.synthetic import smooth_field

    f = sample_slice(48)
    truth = smooth_field((48, 48), 2.0, seed=3)
    m = raw_warp(f, truth)
    gen = torch.Generator().manual_seed(0)
    noisy = truth + 1.0 * torch.randn(1, 2, 48, 48, generator=gen)
    before = float(nt.fold_percent(noisy)[0])
    assert 5 < before < 50
    with pytest.warns(UserWarning, match=r"^initial_displacement: folds \(det J <= 0\) at "
                                         r"[0-9.]+ % of the voxels of batch element 0; repaired"):
        d, diag = nt.register(f, m, initial_displacement=noisy, return_diagnostics=True,
                              **kwargs)
    assert diag.initial_fold_percent == pytest.approx([before])
    assert_fold_free(d)


def test_forward_determinant_matches_a_brute_force():
    from nadmm_torch.ops.diff import forward_jacobian_determinant

    d3 = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(forward_jacobian_determinant(d3)[:, :-1, :-1, :-1], forward_det(d3))
    d2 = torch.randn(2, 2, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(forward_jacobian_determinant(d2)[:, :-1, :-1], forward_det(d2))


def test_a_checkerboard_that_central_differences_miss_is_repaired():
    # d = ±0.6 alternating from voxel to voxel: central differences are 0 inside (det J = 1),
    # forward differences ±1.2 fold every cell.
    f = sample_slice(32)
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    board = (0.6 * (-1.0) ** (y + x)).expand(1, 2, 32, 32).clone()
    assert float(nt.fold_percent(board)[0]) < 50 and float(forward_det(board).min()) < 0
    with pytest.warns(UserWarning, match=r"^initial_displacement: folds"):
        d = nt.register(f, raw_warp(f, torch.full((1, 2, 32, 32), 0.7)),
                        initial_displacement=board)
    assert_fold_free(d)
