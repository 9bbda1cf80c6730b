"""GPU checks (skipped without CUDA; `benchmarks/gpu_session.sh` runs them on a GPU machine):
the device paths give the CPU's numbers, run to run the same, with finite gradients."""

from __future__ import annotations

import pytest
import torch

import nadmm_torch as nt
from nadmm_torch.data.sample import load_sample
from nadmm_torch.ops.admm import nesterov_admm

from .synthetic import blobs, smooth_field

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("data_term", ["l2", "l1"])
def test_cuda_in_place_loop_equals_the_autograd_loop_and_the_cpu(data_term):
    gen = torch.Generator().manual_seed(5)
    shape = (6, 16, 12)
    g = torch.randn(2, 3, *shape, generator=gen)
    c = torch.randn(2, 1, *shape, generator=gen)
    kw = dict(lam=0.5, theta=0.05, iterations=15, spacing=(2.0, 1.0, 1.0), order=2,
              data_term=data_term, restart=True)
    fast, info = nesterov_admm(g.cuda(), c.cuda(), **kw)  # device bookkeeping, no host sync
    ref, info_ref = nesterov_admm(g.cuda(), c.cuda(), record=True, **kw)
    cpu, info_cpu = nesterov_admm(g, c, **kw)
    tol = 1e-5 * float(cpu.abs().max())
    torch.testing.assert_close(fast, ref, rtol=0, atol=tol)
    torch.testing.assert_close(fast.cpu(), cpu, rtol=0, atol=tol)
    assert torch.equal(info.restarts.cpu(), info_cpu.restarts)


@pytest.mark.parametrize("preset", ["fast", "balanced", "paper", "accurate"])
def test_cuda_registration_equals_cpu_and_repeats_exactly(preset):
    s = load_sample()
    cpu = nt.register(s.fixed, s.moving, spacing=s.spacing, preset=preset)
    gpu = nt.register(s.fixed.cuda(), s.moving.cuda(), spacing=s.spacing, preset=preset)
    again = nt.register(s.fixed.cuda(), s.moving.cuda(), spacing=s.spacing, preset=preset)
    assert torch.equal(gpu, again)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)
    assert float(nt.fold_percent(gpu).max()) == 0.0


def test_cuda_gradients_match_cpu():
    moving = blobs((24, 20), seed=3, dtype=torch.float64)
    fixed = nt.warp(moving, smooth_field((24, 20), 2.0, seed=4, dtype=torch.float64))

    def grads(device):
        model = nt.NADMMRegistration("fast", learnable={"lambda", "theta"}).to(device)
        f = fixed.to(device).requires_grad_()
        d = model(f, moving.to(device))
        (nt.warp(moving.to(device), d) - f).pow(2).mean().backward()
        return [x.detach().cpu() for x in (d, f.grad, model.log_lam.grad, model.log_theta.grad)]

    for a, b in zip(grads("cuda"), grads("cpu"), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def _pair(shape=(40, 36), seed=3):
    moving = blobs(shape, seed=seed, dtype=torch.float32)
    return nt.warp(moving, smooth_field(shape, 2.0, seed=seed + 1)), moving


def test_cuda_batch_equals_one_by_one_with_per_pair_theta():
    """Spectral θ: each pair of a batch its own k², on the device as on the CPU."""
    pairs = [_pair(seed=s) for s in (1, 5, 9)]
    fixed = torch.cat([f for f, _ in pairs]).cuda()
    moving = torch.cat([m for _, m in pairs]).cuda()
    batch = nt.register(fixed, moving, preset="balanced")
    for i in range(3):
        one = nt.register(fixed[i:i + 1], moving[i:i + 1], preset="balanced")
        torch.testing.assert_close(batch[i:i + 1], one, rtol=0, atol=1e-4)
    torch.testing.assert_close(batch.cpu(), nt.register(fixed.cpu(), moving.cpu(),
                                                        preset="balanced"), rtol=0, atol=1e-3)


def test_cuda_mask_features_and_affine_equal_cpu():
    fixed, moving = _pair()
    mask = torch.zeros_like(fixed, dtype=torch.bool)
    mask[..., 5:30, 4:32] = True
    runs = dict(mask=dict(mask=mask), mind=dict(features="mind"), affine=dict(affine=True))
    for name, kw in runs.items():
        cpu = nt.register(fixed, moving, **kw)
        gpu = nt.register(fixed.cuda(), moving.cuda(),
                          **{k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()})
        assert gpu.device.type == "cuda", name
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=2e-3, msg=name)


def test_cuda_inverse_and_apply_equal_cpu():
    d = smooth_field((32, 28), 2.5, seed=2)
    inv = nt.invert(d.cuda())
    torch.testing.assert_close(inv.cpu(), nt.invert(d), rtol=0, atol=1e-4)
    image = blobs((32, 28), seed=7, dtype=torch.float32)
    torch.testing.assert_close(nt.apply(image.cuda(), d.cuda()).cpu(), nt.apply(image, d),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("checkpoint", [True, "auto"])
def test_cuda_checkpointed_gradients_equal_plain(checkpoint):
    fixed, moving = (x.cuda() for x in _pair((48, 40)))

    def grads(mode):
        model = nt.NADMMRegistration("balanced", learnable=True, checkpoint=mode).cuda()
        d = model(fixed, moving)
        (nt.warp(moving, d) - fixed).pow(2).mean().backward()
        return [p.grad for p in model.parameters()]

    for a, b in zip(grads(checkpoint), grads(False), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_cuda_tune_learns_what_the_cpu_learns():
    def run(device):
        pairs = [nt.TunePair(*(x.to(device) for x in _pair(seed=s)), id=str(s))
                 for s in (1, 4, 7)]
        return nt.tune(pairs, epochs=2, progress=False)

    gpu, cpu = run("cuda"), run("cpu")
    for key in ("lam", "theta"):
        torch.testing.assert_close(torch.tensor(gpu.settings["overrides"][key]),
                                   torch.tensor(cpu.settings["overrides"][key]), rtol=1e-3, atol=0)
    assert abs(gpu.val_best - cpu.val_best) < 1e-4
