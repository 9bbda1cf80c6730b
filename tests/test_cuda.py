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


@pytest.mark.parametrize("preset", ["fast", "paper"])
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
