"""Gradient checkpointing of the warps (``checkpoint=True / False / "auto"``) and the decisions
that are computed without an autograd graph (safeguard, fold repair, restart test)."""

import pytest
import torch

import nadmm_torch as nt
from nadmm_torch.checks import check_checkpoint
from nadmm_torch.config import SolverConfig
from nadmm_torch.ops import solver
from nadmm_torch.ops.checkpoint import checkpoint_call
from nadmm_torch.ops.solver import (
    CHECKPOINT_AUTO_ELEMENTS,
    repair_folds,
    safeguarded_compose,
    solve,
    uses_checkpoint,
)
from nadmm_torch.ops.warp import compose

from .synthetic import blobs, smooth_field

MODES = (False, True, "auto")


def _train_step(checkpoint, learnable=True, dtype=torch.float32, **overrides):
    """Output and gradients (parameters, initial displacement, images) of one training step
    on a small 3D pair with an initial displacement."""
    torch.manual_seed(0)
    fixed = blobs((6, 20, 20), seed=1, dtype=dtype).requires_grad_(True)
    moving = blobs((6, 20, 20), seed=2, dtype=dtype).requires_grad_(True)
    init = smooth_field((6, 20, 20), 1.0, seed=3, dtype=dtype).requires_grad_(True)
    reg = nt.NADMMRegistration("fast", learnable=learnable, checkpoint=checkpoint,
                               **overrides).to(dtype)
    d, diag = reg(fixed, moving, (2.0, 1.0, 1.0), initial_displacement=init,
                  return_diagnostics=True)
    (nt.warp(moving, d) - fixed).pow(2).mean().backward()
    grads = {n: p.grad for n, p in reg.named_parameters()}
    grads.update(init=init.grad, fixed=fixed.grad, moving=moving.grad)
    return d.detach(), grads, diag


@pytest.mark.parametrize("learnable", [True, {"lambda", "theta"}])
def test_gradients_are_the_same_with_and_without_checkpointing(learnable):
    """``{"lambda", "theta"}``: the first pass of a checkpointed warp takes the in-place ADMM
    loop (no graph), the recomputation the autograd loop: equal to float rounding."""
    ref_d, ref, _ = _train_step(False, learnable)
    assert all(g is not None and g.abs().sum() > 0 for g in ref.values())
    for mode in (True, "auto"):
        d, grads, _ = _train_step(mode, learnable)
        torch.testing.assert_close(d, ref_d, rtol=1e-5, atol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6 * ref[name].abs().max(),
                                       msg=lambda m, n=name, k=mode: f"{n} ({k}): {m}")


def test_checkpointed_gradients_replay_the_safeguards_decisions():
    """With ``min_jacobian`` close to 1 the safeguard halves many steps; the recomputation in
    the backward pass takes the same steps (float64: equal to rounding)."""
    ref_d, ref, diag = _train_step(False, dtype=torch.float64, min_jacobian=0.8)
    scales = torch.cat([s for level in diag.step_scales for s in level])
    assert (scales < 1).any()  # the safeguard did reject steps
    d, grads, diag2 = _train_step(True, dtype=torch.float64, min_jacobian=0.8)
    assert torch.equal(scales, torch.cat([s for level in diag2.step_scales for s in level]))
    torch.testing.assert_close(d, ref_d, rtol=1e-10, atol=1e-10)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_gradcheck_float64_through_checkpointed_warps(checkpoint):
    cfg = SolverConfig(lam=2.0, theta=0.5, levels=1, iterations=3, warps=2, normalize=False)
    fixed = blobs((7, 6), seed=1).requires_grad_(True)
    moving = blobs((7, 6), seed=2).requires_grad_(True)
    lam = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    step = torch.tensor([0.9, 1.1], dtype=torch.float64, requires_grad=True)

    def fn(f, m, la, th, st):
        return solve(f, m, cfg, lam=[la], theta=[th], step_scale=[st], checkpoint=checkpoint)[0]

    assert torch.autograd.gradcheck(fn, (fixed, moving, lam, theta, step), eps=1e-6, atol=1e-5)


def test_auto_checkpoints_by_the_graph_it_frees():
    n = CHECKPOINT_AUTO_ELEMENTS
    with torch.enable_grad():
        small = torch.zeros(1, 3, 4, 8, 8)
        large = torch.zeros(1, 3, n // 3 + 1)
        assert not uses_checkpoint("auto", small, 7)
        assert uses_checkpoint("auto", large, 2) and not uses_checkpoint("auto", large, 1)
        assert uses_checkpoint("auto", torch.zeros(n // 4 + 1), 5)  # (5 - 1) warps' graphs
        assert not uses_checkpoint("auto", torch.zeros(n // 4), 5)
        assert uses_checkpoint(True, small, 1) and not uses_checkpoint(False, large, 9)
    with torch.no_grad():  # no graph: nothing to checkpoint
        assert not uses_checkpoint(True, small, 5) and not uses_checkpoint("auto", large, 5)


def test_auto_checkpoints_the_levels_above_the_threshold(monkeypatch):
    """fast on 32 × 32: 7 warps of 8 × 8 and 5 of 16 × 16 (fields of 128 and 512 elements:
    6 × 128 = 768 and 4 × 512 = 2048 elements of graph freed); with the threshold at 1000
    only the warps of the second level are checkpointed."""
    calls = []

    def counting(first, again, d, *args):
        calls.append(tuple(d.shape[2:]))
        return checkpoint_call(first, again, d, *args)

    monkeypatch.setattr(solver, "CHECKPOINT_AUTO_ELEMENTS", 1000)
    monkeypatch.setattr(solver, "checkpoint_call", counting)
    fixed, moving = blobs((32, 32), seed=1).float(), blobs((32, 32), seed=2).float()
    reg = nt.NADMMRegistration("fast", learnable={"lambda"})
    assert reg.checkpoint == "auto"  # the default
    reg(fixed, moving).sum().backward()
    assert calls == [(16, 16)] * 5
    calls.clear()
    with torch.no_grad():
        reg(fixed, moving)
    assert calls == []


@pytest.mark.parametrize("value,error", [("yes", ValueError), ("True", ValueError),
                                         (1, TypeError), (None, TypeError), (0.5, TypeError)])
def test_bad_checkpoint_values_are_refused(value, error):
    match = rf"^checkpoint: expected True, False or 'auto', got {value!r}"
    with pytest.raises(error, match=match):
        nt.NADMMRegistration(checkpoint=value)
    f = blobs((8, 8), seed=1)
    with pytest.raises(error, match=match):
        solve(f, f, SolverConfig(), checkpoint=value)
    assert check_checkpoint("auto") == "auto" and check_checkpoint(False) is False


def test_safeguard_graph_holds_the_chosen_step_only():
    """The result and its gradient are those of ``compose(d, s u)`` for the chosen ``s`` per
    batch element (the trials leave no trace in the graph)."""
    d = torch.zeros(2, 2, 16, 16, dtype=torch.float64)
    u = torch.zeros_like(d)
    u[0, 1, :, 8:] = -3.0  # element 0 tears, element 1 takes a small smooth step
    u[1] = smooth_field((16, 16), 0.3, seed=1, dtype=torch.float64)[0]
    u.requires_grad_(True)
    d_new, s = safeguarded_compose(d, u)
    assert float(s[0]) < 1.0 and float(s[1]) == 1.0
    expected = compose(d, s.view(2, 1, 1, 1) * u)
    torch.testing.assert_close(d_new, expected, rtol=0, atol=0)
    w = torch.randn_like(d_new)
    (g,) = torch.autograd.grad((d_new * w).sum(), u)
    (g_ref,) = torch.autograd.grad((expected * w).sum(), u)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


def test_repair_folds_falls_back_per_batch_element():
    """Where local rounds do not suffice (a compression that folds almost everywhere: local
    smoothing leaves a linear field as it is), only the element that still folds is smoothed
    everywhere; the other keeps its field exactly."""
    x = torch.arange(32, dtype=torch.float64) - 15.5
    bad = torch.zeros(1, 2, 32, 32, dtype=torch.float64)
    bad[:, 1] = -1.5 * x  # det J = -0.5 inside
    ok = smooth_field((32, 32), 1.0, seed=1, dtype=torch.float64)
    assert float(nt.fold_percent(bad)[0]) > 50 and float(nt.fold_percent(ok)[0]) == 0
    with pytest.warns(RuntimeWarning, match="still folds"):
        out = repair_folds(torch.cat([bad, ok]), max_rounds=1)
    assert float(nt.fold_percent(out)[0]) < float(nt.fold_percent(bad)[0])  # smoothed
    assert torch.equal(out[1], ok[0])
