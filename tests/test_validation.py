"""Every bad input gets a clear error naming the argument.

The same bad inputs go through ``nt.register`` and ``nt.NADMMRegistration(...)(...)``; the
warp and metric functions have their own tables. Each case is one distinct bad input; the
error must be of the stated type, and its message must match (argument name first, then what
was expected), not be a raw error from deep inside torch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nadmm_torch as nt
from nadmm_torch.checks import (
    MIN_AXIS,
    check_module_device,
    check_pair,
    check_pyramid_size,
    check_same_device,
)

NAN, INF = float("nan"), float("inf")
S = (16, 16)


def img(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A non-constant image of the given full shape."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen).to(dtype)


def with_value(x: torch.Tensor, value: float) -> torch.Tensor:
    """``x`` with one voxel set to ``value`` (a single bad voxel must be caught)."""
    x = x.clone()
    x.view(-1)[x.numel() // 2] = value
    return x


F, M = img(1, 1, *S, seed=1), img(1, 1, *S, seed=2)
Z2 = torch.zeros(1, 2, *S)
LABELS = torch.ones(1, 1, 8, 8, dtype=torch.long)

# (id, fixed, moving, keyword arguments, error type, message regex)
REGISTER_CASES = [
    # number of dimensions
    ("no-batch-no-channel", img(*S), M, {}, ValueError, r"^fixed: expected a \(B, C, H, W\)"),
    ("3-dims", img(1, *S), M, {}, ValueError, r"^fixed: expected a \(B, C, H, W\).*3 dims"),
    ("6-dims", img(1, 1, 2, 2, *S), M, {}, ValueError, r"^fixed: .*6 dims"),
    ("moving-3d-fixed-2d", F, img(1, 1, 4, *S), {}, ValueError, r"^moving: expected 2 spatial"),
    # shapes
    ("spatial-mismatch", F, img(1, 1, 16, 17), {}, ValueError,
     r"^moving: spatial shape \(16, 17\) does not match fixed \(16, 16\)"),
    ("batch-mismatch", F, img(2, 1, *S), {}, ValueError,
     r"^moving: batch size 2 does not match fixed batch size 1"),
    # channel policy: C > 1 needs the same C in both images and the l2 data term
    ("moving-three-channels", F, img(1, 3, *S), {}, ValueError,
     r"^moving: 3 channel\(s\), fixed 1; expected the same number of channels"),
    ("two-channels-l1", img(1, 2, *S), img(1, 2, *S, seed=3), {"data_term": "l1"}, ValueError,
     r"^data_term: 'l1' takes single-channel images; with C = 2 channels use data_term='l2'"),
    ("mind-l1", F, M, {"features": "mind", "data_term": "l1"}, ValueError,
     r"^features: 'mind' gives multi-channel images, which need data_term='l2'"),
    ("features-unknown", F, M, {"features": "sift"}, ValueError,
     r"^features: expected one of \['none', 'mind'\]"),
    # spacing
    ("spacing-too-short", F, M, {"spacing": (1.0,)}, ValueError, r"^spacing: expected 2 numbers"),
    ("spacing-too-long", F, M, {"spacing": (1.0, 1.0, 1.0)}, ValueError,
     r"^spacing: expected 2 numbers"),
    ("spacing-zero", F, M, {"spacing": (1.0, 0.0)}, ValueError, r"^spacing: expected positive"),
    ("spacing-negative", F, M, {"spacing": (-1.0, 1.0)}, ValueError,
     r"^spacing: expected positive"),
    ("spacing-nan", F, M, {"spacing": (1.0, NAN)}, ValueError, r"^spacing: expected positive"),
    ("spacing-inf", F, M, {"spacing": (INF, 1.0)}, ValueError, r"^spacing: expected positive"),
    ("spacing-nan-scalar", F, M, {"spacing": NAN}, ValueError, r"^spacing: expected positive"),
    ("spacing-string", F, M, {"spacing": "ab"}, ValueError, r"^spacing: expected 2 numbers"),
    ("spacing-bool", F, M, {"spacing": True}, ValueError, r"^spacing: expected 2 numbers"),
    ("spacing-tensor-3", F, M, {"spacing": torch.ones(3)}, ValueError,
     r"^spacing: expected 2 numbers"),
    # dtypes
    ("int-images", torch.ones(1, 1, *S, dtype=torch.int32), M, {}, TypeError,
     r"^fixed: expected a floating dtype"),
    ("bool-images", F, M > 0.5, {}, TypeError, r"^moving: expected a floating dtype"),
    ("complex-images", F.to(torch.complex64), M, {}, TypeError,
     r"^fixed: expected a floating dtype"),
    ("float32-vs-float64", F, M.double(), {}, TypeError,
     r"^moving: dtype torch.float64 differs from fixed dtype torch.float32"),
    ("int-initial-displacement", F, M,
     {"initial_displacement": torch.zeros(1, 2, *S, dtype=torch.long)}, TypeError,
     r"^initial_displacement: expected a floating dtype"),
    # devices (the meta device stands in for a second device; it holds no values)
    ("moving-on-other-device", F, M.to("meta"), {}, ValueError,
     r"^moving: on meta, fixed on cpu; use one device"),
    ("initial-displacement-on-other-device", F, M,
     {"initial_displacement": Z2.to("meta")}, ValueError,
     r"^initial_displacement: on meta, the image on cpu"),
    # non-finite values
    ("nan-in-fixed", with_value(F, NAN), M, {}, ValueError,
     r"^fixed: contains non-finite values \(1 NaN, 0 Inf\)"),
    ("inf-in-moving", F, with_value(M, INF), {}, ValueError,
     r"^moving: contains non-finite values \(0 NaN, 1 Inf\)"),
    ("minus-inf-in-fixed", with_value(F, -INF), M, {}, ValueError,
     r"^fixed: contains non-finite values \(0 NaN, 1 Inf\)"),
    ("nan-in-initial-displacement", F, M, {"initial_displacement": with_value(Z2, NAN)},
     ValueError, r"^initial_displacement: contains non-finite values \(1 NaN"),
    ("inf-in-initial-displacement", F, M, {"initial_displacement": with_value(Z2, INF)},
     ValueError, r"^initial_displacement: contains non-finite values \(0 NaN, 1 Inf"),
    # empty images
    ("zero-size-axis", img(1, 1, 0, 16), img(1, 1, 0, 16), {}, ValueError,
     r"^fixed: is empty \(shape \(1, 1, 0, 16\)\)"),
    ("zero-batch", img(0, 1, *S), img(0, 1, *S), {}, ValueError, r"^fixed: is empty"),
    # (constant images are not refused: tests/test_reliability.py)
    # too small for the pyramid (an axis of 2-3 voxels: almost surely a mix-up of axes)
    ("axis-of-2", img(1, 1, 2, 16), img(1, 1, 2, 16, seed=1), {}, ValueError,
     rf"^fixed: spatial shape \(2, 16\) is too small: every axis needs >= {MIN_AXIS}"),
    ("3x3", img(1, 1, 3, 3), img(1, 1, 3, 3, seed=1), {}, ValueError, r"^fixed: .*too small"),
    ("channels-last-rgb-as-3d", img(1, 1, 16, 16, 3), img(1, 1, 16, 16, 3, seed=1), {},
     ValueError, r"^fixed: spatial shape \(16, 16, 3\) is too small"),
    # presets and option names
    ("unknown-preset", F, M, {"preset": "turbo"}, ValueError,
     r"^preset: expected one of \['accurate', 'balanced', 'fast', 'paper'\], got 'turbo'"),
    ("unhashable-preset", F, M, {"preset": ["fast"]}, TypeError, r"^preset: expected one of"),
    ("unknown-option", F, M, {"lamda": 1.0}, ValueError,
     r"^unknown option\(s\) \['lamda'\]; valid options: .*lam"),
    ("unknown-data-term", F, M, {"data_term": "l3"}, ValueError,
     r"^data_term: expected one of \['l2', 'l1'\]"),
    ("order-zero", F, M, {"order": 0}, ValueError, r"^order: expected an integer >= 1"),
    ("order-fractional", F, M, {"order": 1.5}, TypeError, r"^order: expected an integer"),
    ("order-bool", F, M, {"order": True}, TypeError, r"^order: expected an integer"),
    ("unknown-boundary", F, M, {"boundary": "zero"}, ValueError,
     r"^boundary: expected one of \['neumann', 'periodic'\]"),
    # λ and θ
    ("lam-zero", F, M, {"lam": 0.0}, ValueError, r"^lam: expected a positive finite number"),
    ("lam-negative", F, M, {"lam": -1.0}, ValueError, r"^lam: expected a positive finite"),
    ("lam-nan", F, M, {"lam": NAN}, ValueError, r"^lam: expected a positive finite"),
    ("lam-inf", F, M, {"lam": INF}, ValueError, r"^lam: expected a positive finite"),
    ("lam-nan-on-one-level", F, M, {"lam": (1.0, NAN, 1.0)}, ValueError,
     r"^lam: expected a positive finite"),
    ("lam-string", F, M, {"lam": "big"}, TypeError, r"^lam: expected a positive finite"),
    ("lam-tensor", F, M, {"lam": torch.tensor(0.5)}, TypeError, r"^lam: expected"),
    ("theta-zero", F, M, {"theta": 0.0}, ValueError, r"^theta: expected a positive finite"),
    ("theta-negative", F, M, {"theta": -0.1}, ValueError, r"^theta: expected a positive finite"),
    ("theta-nan", F, M, {"theta": NAN}, ValueError, r"^theta: expected a positive finite"),
    ("theta-inf", F, M, {"theta": INF}, ValueError, r"^theta: expected a positive finite"),
    # other solver options
    ("iterations-zero", F, M, {"iterations": 0}, ValueError,
     r"^iterations \(per level\): expected an integer >= 1"),
    ("iterations-negative-on-one-level", F, M, {"iterations": (10, -1, 5)}, ValueError,
     r"^iterations \(per level\): expected an integer >= 1, got -1"),
    ("iterations-fractional", F, M, {"iterations": 2.5}, TypeError, r"^iterations"),
    ("warps-negative", F, M, {"warps": -1}, ValueError, r"^warps \(per level\): expected an int"),
    ("levels-zero", F, M, {"levels": 0}, ValueError, r"^levels: expected an integer >= 1"),
    ("levels-string", F, M, {"levels": "3"}, TypeError, r"^levels: expected an integer"),
    ("tol-warp-negative", F, M, {"tol_warp": -1.0}, ValueError,
     r"^tol_warp: expected None or a finite number >= 0"),
    ("tol-admm-nan", F, M, {"tol_admm": NAN}, ValueError, r"^tol_admm: expected None or"),
    ("min-jacobian-nan", F, M, {"min_jacobian": NAN}, ValueError,
     r"^min_jacobian: expected a finite number < 1"),
    ("min-jacobian-one", F, M, {"min_jacobian": 1.0}, ValueError, r"^min_jacobian: expected"),
    ("restart-eta-nan", F, M, {"restart_eta": NAN}, ValueError,
     r"^restart_eta: expected a number in \(0, 1\]"),
    ("accelerated-string", F, M, {"accelerated": "no"}, TypeError,
     r"^accelerated: expected True or False"),
    ("min-level-size-zero", F, M, {"min_level_size": 0}, ValueError, r"^min_level_size: expected"),
    ("frozen-axis-out-of-range", F, M, {"frozen_axes": (5,)}, ValueError,
     r"^frozen_axes: axes \[5\] out of range for 2 dims"),
    ("frozen-axes-unknown-word", F, M, {"frozen_axes": "thin"}, ValueError,
     r"^frozen_axes: expected a tuple of axis indices or 'thick'"),
    # initial displacement of the wrong shape
    ("initial-displacement-wrong-size", F, M, {"initial_displacement": torch.zeros(1, 2, 8, 8)},
     ValueError, r"^initial_displacement: shape \(1, 2, 8, 8\) does not fit .*expected \(1, 2, 16"),
    ("initial-displacement-3-components", F, M,
     {"initial_displacement": torch.zeros(1, 3, *S)}, ValueError,
     r"^initial_displacement: expected a \(B, ndim, \*S\)"),
    ("initial-displacement-batch", F, M, {"initial_displacement": torch.zeros(2, 2, *S)},
     ValueError, r"^initial_displacement: shape \(2, 2, 16, 16\) does not fit"),
    # not tensors
    ("numpy-fixed", F.numpy(), M, {}, TypeError, r"^fixed: expected a torch.Tensor, got ndarray"),
    ("moving-none", F, None, {}, TypeError, r"^moving: expected a torch.Tensor, got NoneType"),
]

FORWARD_KEYS = ("spacing", "initial_displacement")


def _call_module(fixed, moving, kwargs: dict):
    """``NADMMRegistration(**options)(fixed, moving, spacing=..., initial_displacement=...)``."""
    fwd = {k: v for k, v in kwargs.items() if k in FORWARD_KEYS}
    options = {k: v for k, v in kwargs.items() if k not in FORWARD_KEYS}
    preset = options.pop("preset", "fast")
    return nt.NADMMRegistration(preset, **options)(fixed, moving, **fwd)


@pytest.mark.parametrize(
    "fixed,moving,kwargs,error,match",
    [pytest.param(*c[1:], id=c[0]) for c in REGISTER_CASES],
)
@pytest.mark.parametrize("entry", ["register", "module"])
def test_bad_registration_input(entry, fixed, moving, kwargs, error, match):
    with pytest.raises(error, match=match):
        if entry == "register":
            nt.register(fixed, moving, **kwargs)
        else:
            _call_module(fixed, moving, kwargs)


# (id, constructor keywords, message regex); learnable names and schedules only exist here.
MODULE_CASES = [
    ("learnable-unknown-name", {"learnable": {"lam"}}, r"^learnable: unknown name\(s\) \['lam'\]"),
    ("learnable-unknown-string", {"learnable": "lam"}, r"^learnable: unknown name\(s\)"),
    ("learnable-int", {"learnable": 3}, r"^learnable: expected None, True, 'all' or names"),
    ("learnable-non-strings", {"learnable": [1, 2]}, r"^learnable: expected None, True"),
    ("learnable-mixed", {"learnable": ["lambda", "momentm"]},
     r"^learnable: unknown name\(s\) \['momentm'\]"),
    ("unknown-schedule", {"schedule": "epoch"}, r"^schedule: expected 'level' or 'iteration'"),
]


@pytest.mark.parametrize("kwargs,match", [pytest.param(*c[1:], id=c[0]) for c in MODULE_CASES])
def test_bad_module_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nt.NADMMRegistration(**kwargs)


def test_module_on_another_device_than_its_input():
    model = nt.NADMMRegistration(learnable=True).to("meta")
    with pytest.raises(ValueError, match=r"^fixed: on cpu, the module's parameters on meta"):
        model(F, M)


def test_learnable_generators_and_all_are_accepted():
    # The check must not consume a one-shot iterable before the module reads it.
    model = nt.NADMMRegistration(learnable=(n for n in ("lambda", "theta")))
    assert model.learnable == {"lambda", "theta"}
    assert nt.NADMMRegistration(learnable="all").learnable == {
        "lambda", "theta", "momentum", "step"
    }


E2 = torch.zeros(1, 2, 8, 8)
I8 = img(1, 1, 8, 8)

# (id, image, displacement, mode, error, regex)
WARP_CASES = [
    ("image-no-batch", img(8, 8), E2, "bilinear", ValueError,
     r"^image: expected a \(B, C, H, W\) or \(B, C, D, H, W\) tensor, got shape \(8, 8\)"),
    ("displacement-no-batch", I8, torch.zeros(2, 8, 8), "bilinear", ValueError,
     r"^displacement: expected a \(B, ndim, \*S\)"),
    ("displacement-wrong-size", I8, torch.zeros(1, 2, 8, 9), "bilinear", ValueError,
     r"^displacement: shape \(1, 2, 8, 9\) does not fit .* expected \(1, 2, 8, 8\)"),
    ("displacement-batch", img(2, 1, 8, 8), E2, "bilinear", ValueError,
     r"^displacement: .* expected \(2, 2, 8, 8\)"),
    ("displacement-3-components-2d", I8, torch.zeros(1, 3, 8, 8), "bilinear", ValueError,
     r"^displacement: expected a \(B, ndim, \*S\)"),
    ("3d-image-2d-displacement", img(1, 1, 4, 8, 8), E2, "bilinear", ValueError,
     r"^displacement: .* expected \(1, 3, 4, 8, 8\)"),
    ("integer-image-bilinear", LABELS, E2, "bilinear", TypeError,
     r"^image: integer images .* need mode='nearest'"),
    ("complex-image", I8.to(torch.complex64), E2, "bilinear", TypeError,
     r"^image: expected a real dtype"),
    ("integer-displacement", I8, E2.long(), "bilinear", TypeError,
     r"^displacement: expected a floating dtype"),
    ("nan-in-image", with_value(I8, NAN), E2, "bilinear", ValueError,
     r"^image: contains non-finite values \(1 NaN"),
    ("inf-in-displacement", I8, with_value(E2, INF), "bilinear", ValueError,
     r"^displacement: contains non-finite values \(0 NaN, 1 Inf"),
    ("empty-image", img(1, 1, 0, 8), torch.zeros(1, 2, 0, 8), "bilinear", ValueError,
     r"^image: is empty"),
    ("unknown-mode", I8, E2, "cubic", ValueError,
     r"^mode: expected one of \['bilinear', 'nearest'\], got 'cubic'"),
    ("displacement-on-other-device", I8, E2.to("meta"), "bilinear", ValueError,
     r"^displacement: on meta, the image on cpu"),
    ("image-list", [[1.0]], E2, "bilinear", TypeError, r"^image: expected a torch.Tensor"),
]


@pytest.mark.parametrize(
    "image,displacement,mode,error,match", [pytest.param(*c[1:], id=c[0]) for c in WARP_CASES]
)
def test_bad_warp_input(image, displacement, mode, error, match):
    with pytest.raises(error, match=match):
        nt.warp(image, displacement, mode=mode)


def test_warp_channel_policy_any_number_of_channels():
    # Unlike the registration, warp takes C > 1: each channel is warped alike.
    x = img(1, 3, 12, 10)
    d = 0.7 * torch.ones(1, 2, 12, 10)
    out = nt.warp(x, d)
    assert out.shape == x.shape
    for c in range(3):
        torch.testing.assert_close(out[:, c:c + 1], nt.warp(x[:, c:c + 1], d), rtol=0, atol=0)


LONG = torch.long
# (id, function, arguments, regex); all metric errors are ValueErrors.
METRIC_CASES = [
    ("dice-float-labels", nt.dice, (img(1, 1, 8, 8), LABELS), TypeError,
     r"^pred_labels: expected an integer label map"),
    ("dice-shape-mismatch", nt.dice, (LABELS, torch.ones(1, 1, 8, 9, dtype=LONG)), ValueError,
     r"^true_labels: expected the same shape as pred_labels"),
    ("dice-no-labels", nt.dice, (LABELS, LABELS, ()), ValueError,
     r"^labels: expected at least one value"),
    ("dice-labels-string", nt.dice, (LABELS, LABELS, "ab"), TypeError,
     r"^labels: expected a sequence of integers"),
    ("dice-empty", nt.dice, (torch.ones(1, 0, dtype=LONG),) * 2, ValueError,
     r"^pred_labels: is empty"),
    ("dice-1d", nt.dice, (torch.ones(8, dtype=LONG),) * 2, ValueError,
     r"^pred_labels: expected at least 2 dims \(a batch axis"),
    ("dice-list", nt.dice, ([1], LABELS), TypeError, r"^pred_labels: expected a torch.Tensor"),
    ("hd-spacing-nan", nt.hausdorff_slices, (LABELS, LABELS, (NAN, 1.0)), ValueError,
     r"^spacing: expected positive finite values"),
    ("hd-spacing-zero", nt.hausdorff_slices, (LABELS, LABELS, (0.0, 1.0)), ValueError,
     r"^spacing: expected positive finite values"),
    ("hd-spacing-short", nt.hausdorff_slices, (LABELS, LABELS, (1.0,)), ValueError,
     r"^spacing: expected at least the two in-plane values"),
    ("hd-reduction", nt.hausdorff_slices, (LABELS, LABELS, (1.0, 1.0), (1,), "sum"), ValueError,
     r"^reduction: expected one of \['mean', 'none'\]"),
    ("hd-2d", nt.hausdorff_slices, (torch.ones(1, 8, dtype=LONG),) * 2 + ((1.0, 1.0),),
     ValueError, r"^pred: expected at least 3 dims"),
    ("hd-empty", nt.hausdorff_slices, (torch.ones(1, 1, 0, 8, dtype=LONG),) * 2 + ((1.0, 1.0),),
     ValueError, r"^pred: is empty"),
    ("hd-float", nt.hausdorff_slices, (img(1, 1, 8, 8), LABELS, (1.0, 1.0)), TypeError,
     r"^pred: expected an integer label map"),
    ("fold-nan", nt.fold_percent, (with_value(E2, NAN),), ValueError,
     r"^displacement: contains non-finite values \(1 NaN"),
    ("fold-empty", nt.fold_percent, (torch.zeros(1, 2, 0, 8),), ValueError,
     r"^displacement: is empty"),
    ("fold-components", nt.fold_percent, (torch.zeros(1, 3, 8, 8),), ValueError,
     r"^displacement: expected a \(B, ndim, \*S\) displacement"),
    ("fold-int", nt.fold_percent, (E2.long(),), TypeError,
     r"^displacement: expected a floating dtype"),
    ("fold-list", nt.fold_percent, ([0.0],), TypeError, r"^displacement: expected a torch.Tensor"),
    ("jac-nan", nt.jacobian_determinant, (with_value(E2, NAN),), ValueError,
     r"^displacement: contains non-finite"),
    ("jac-inf", nt.jacobian_determinant, (with_value(E2, -INF),), ValueError,
     r"^displacement: contains non-finite values \(0 NaN, 1 Inf"),
    ("jac-components", nt.jacobian_determinant, (torch.zeros(1, 3, 8, 8),), ValueError,
     r"^displacement: expected a \(B, ndim, \*S\)"),
    ("jac-no-batch", nt.jacobian_determinant, (torch.zeros(8, 8),), ValueError,
     r"^displacement: expected a \(B, ndim, \*S\)"),
    ("jac-empty", nt.jacobian_determinant, (torch.zeros(1, 2, 0, 8),), ValueError,
     r"^displacement: is empty"),
    ("jac-list", nt.jacobian_determinant, ([0.0],), TypeError,
     r"^displacement: expected a torch.Tensor"),
]


@pytest.mark.parametrize(
    "fn,args,error,match", [pytest.param(*c[1:], id=c[0]) for c in METRIC_CASES]
)
def test_bad_metric_input(fn, args, error, match):
    with pytest.raises(error, match=match):
        fn(*args)


def test_fold_percent_of_nan_field_is_not_silently_zero():
    # The bug this guards: NaN <= 0 is False, so a NaN field used to report 0 % folds.
    d = torch.zeros(1, 2, 8, 8)
    d[0, 0, 3, 3] = NAN
    with pytest.raises(ValueError, match="non-finite"):
        nt.fold_percent(d)


# -- the check functions themselves -----------------------------------------------------------


def test_pyramid_size_check_directly():
    check_pyramid_size((1, 16))  # a single slice is fine
    check_pyramid_size((1, 1, MIN_AXIS))
    for bad in [(1, 1), (1, 1, 1), (MIN_AXIS - 1, 16), (16, 16, 2)]:
        with pytest.raises(ValueError, match=r"^fixed: spatial shape .* too small"):
            check_pyramid_size(bad)


def test_same_device_check_with_a_fake_device():
    x = torch.zeros(2)
    check_same_device(x, torch.device("cpu"), "moving", "fixed")
    with pytest.raises(ValueError, match=r"^moving: on cpu, fixed on cuda:0; use one device"):
        check_same_device(x, torch.device("cuda:0"), "moving", "fixed")
    with pytest.raises(ValueError, match=r"^fixed: on meta, the module's parameters on cpu"):
        check_module_device(x.to("meta"), nt.NADMMRegistration(learnable=True), "fixed")
    check_module_device(x.to("meta"), nt.NADMMRegistration(), "fixed")  # nothing to move


def test_device_is_checked_before_any_value_is_read():
    # A meta tensor has no values: reaching a finite/constant check would raise a raw error.
    with pytest.raises(ValueError, match=r"^moving: on meta"):
        check_pair(F, torch.full((1, 1, *S), NAN, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_images_are_refused():
    with pytest.raises(ValueError, match=r"^moving: on cpu, fixed on cuda"):
        nt.register(F.cuda(), M)
    with pytest.raises(ValueError, match=r"^fixed: on cuda:0, the module's parameters on cpu"):
        nt.NADMMRegistration(learnable=True)(F.cuda(), M.cuda())
    with pytest.raises(ValueError, match=r"^displacement: on cpu, the image on cuda"):
        nt.warp(F.cuda(), Z2)


def test_accepted_edge_inputs_still_work():
    # Inputs next to the refused ones: a single slice, a 4-voxel axis, numpy/tensor spacing,
    # None for an option (the preset's value), a NumPy λ.
    d = nt.register(img(1, 1, 1, 16), img(1, 1, 1, 16, seed=4), iterations=2, warps=2)
    assert d.shape == (1, 2, 1, 16) and torch.isfinite(d).all()
    assert float(d[:, 0].abs().max()) == 0.0  # nothing moves along the single-slice axis
    d = nt.register(img(1, 1, MIN_AXIS, 16), img(1, 1, MIN_AXIS, 16, seed=4),
                    spacing=torch.tensor([2.0, 1.0]), lam=np.float32(0.3), boundary=None)
    assert torch.isfinite(d).all()
    d = nt.register(F, M, spacing=[torch.tensor(1.0), 1.0], tol_warp=0.0)
    assert torch.isfinite(d).all() and not math.isnan(float(nt.fold_percent(d)[0]))


def count_bad_inputs() -> int:
    """Distinct bad inputs tested in this file (reported in the issue's note)."""
    direct = 4 + 2 + 1 + 1  # pyramid size, fake devices, meta module, value-before-device
    return len(REGISTER_CASES) + len(MODULE_CASES) + len(WARP_CASES) + len(METRIC_CASES) + direct


if __name__ == "__main__":
    print(count_bad_inputs())
