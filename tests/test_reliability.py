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

    labels = torch.randint(0, 4, (1, 1, 8, 8))
    d = torch.randn(1, 2, 8, 8)
    # the form the CLI, the demo and the Lightning module call: num_classes = max + 1
    assert torch.equal(raw_warp_labels(labels, d, num_classes=6), nt.warp_labels(labels, d))
    assert torch.equal(nt.warp_labels(labels, torch.zeros(1, 2, 8, 8)), labels)  # exact identity
    assert torch.equal(nt.warp_labels(labels.to(torch.uint8), d.half()),
                       nt.warp_labels(labels, d).to(torch.uint8))
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
    from nadmm_torch.presets import PRESETS, preset_config

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
    with pytest.raises(ValueError, match=rf"^checkpoint: expected True or False, got {value!r}"):
        nt.NADMMRegistration(checkpoint=value)
    with pytest.raises(ValueError, match=r"^return_diagnostics: expected True or False"):
        nt.register(f, m, return_diagnostics=value)
    with pytest.raises(ValueError, match=r"^return_diagnostics: expected True or False"):
        nt.NADMMRegistration()(f, m, return_diagnostics=value)
    for option in ("safeguard", "normalize", "restart", "accelerated", "anisotropic_pyramid"):
        if value is None:  # None for a solver option means "the preset's value"
            continue
        with pytest.raises(ValueError, match=rf"^{option}: expected True or False"):
            nt.register(f, m, **{option: value})


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
    buffers = nt.NADMMRegistration()  # the same for a buffer (e.g. from a bad state dict)
    with torch.no_grad():
        getattr(buffers, attr)[-1, 0] = value
    with pytest.raises(ValueError, match=rf"^{attr} \(buffer '{key}'\)"):
        buffers(f, m)


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


def test_state_dict_round_trip_and_old_state_dicts(tmp_path):
    trained = nt.NADMMRegistration(order=1, learnable=True)
    with torch.no_grad():
        trained.log_lam.add_(0.5)
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    state = torch.load(path, weights_only=True)  # plain data: loads with weights_only
    fresh = nt.NADMMRegistration(order=1, learnable=True, lam=3.0)  # λ is carried, not compared
    fresh.load_state_dict(state)
    assert torch.equal(fresh.log_lam, trained.log_lam)
    # a state dict saved before the settings were stored still loads, strictly
    old = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    fresh = nt.NADMMRegistration(order=1)
    fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh.log_lam, trained.log_lam)
