"""The ``compile=`` switch: torch.compile'd solver steps give the eager numbers.

Compiling costs tens of seconds per shape on a CPU, so the battery is kept to one 3D
inference case (with the safeguard on, i.e. the graph split at its host check) and one 2D
gradient case (AOTAutograd's backward against eager autograd).
"""

import pytest
import torch

import nadmm_torch as nt
from nadmm_torch.data.sample import load_sample
from nadmm_torch.ops.solver import COMPILE_MODES, compile_mode

from .synthetic import blobs, smooth_field


def test_compiled_inference_equals_eager_on_the_sample():
    s = load_sample()
    fixed, moving = s.fixed[..., 32:96, 32:96], s.moving[..., 32:96, 32:96]
    kw = dict(spacing=s.spacing, preset="fast", data_term="l1")
    eager = nt.register(fixed, moving, **kw)
    compiled = nt.register(fixed, moving, compile=True, **kw)
    again = nt.register(fixed, moving, compile=True, **kw)  # cached graphs
    assert eager.abs().max() > 0.5  # the pair moves: a real comparison
    # l1 on float32: the same pair in float64 differs by 1.7e-4–3.3e-4 voxel (its clamps
    # amplify rounding), so compiled and eager agree to that precision, not better.
    assert torch.allclose(compiled, eager, atol=5e-4, rtol=0)
    assert torch.equal(again, compiled)


def test_compiled_gradients_equal_eager():
    moving = blobs((24, 20), seed=3, dtype=torch.float32)
    fixed = nt.warp(moving, smooth_field((24, 20), 2.0, seed=4))

    def grads(compile):
        torch.manual_seed(0)
        model = nt.NADMMRegistration(
            "fast", learnable={"lambda", "theta"}, compile=compile, levels=2,
            iterations=(3, 3), warps=(2, 2),
        )  # fmt: skip
        d = model(fixed, moving)
        loss = (nt.warp(moving, d) - fixed).pow(2).mean()
        loss.backward()
        return d.detach(), model.log_lam.grad.clone(), model.log_theta.grad.clone()

    (d0, gl0, gt0), (d1, gl1, gt1) = grads(False), grads(True)
    assert torch.allclose(d1, d0, atol=1e-4, rtol=0)
    assert gl0.abs().max() > 0 and gt0.abs().max() > 0
    assert torch.allclose(gl1, gl0, rtol=1e-3, atol=1e-7)
    assert torch.allclose(gt1, gt0, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("value", ["fast", 1, "Default", None])
def test_bad_compile_value_is_named(value):
    with pytest.raises(ValueError, match="compile: expected"):
        nt.NADMMRegistration("fast", compile=value)


def test_compile_modes():
    assert compile_mode(False) is None
    assert compile_mode(True) == "default"
    assert all(compile_mode(m) == m for m in COMPILE_MODES)


def test_outputs_of_a_cuda_graph_replay_are_copied():
    from nadmm_torch.ops.admm import ADMMInfo
    from nadmm_torch.ops.solver import _own_outputs

    u, full, full_min = torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 4), torch.rand(1)
    info = ADMMInfo(iterations=torch.tensor([3]), residuals=[torch.rand(1)],
                    restarts=torch.tensor([0]))
    u2, info2, (full2, min2) = _own_outputs((u, info, (full, full_min)))
    pairs = [(u, u2), (full, full2), (full_min, min2), (info.iterations, info2.iterations),
             (info.residuals[0], info2.residuals[0]), (info.restarts, info2.restarts)]
    for a, b in pairs:
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", [True, "reduce-overhead"])
def test_compiled_on_cuda_equals_eager(mode):
    s = load_sample()
    fixed, moving = s.fixed.cuda(), s.moving.cuda()
    kw = dict(spacing=s.spacing, preset="fast")
    eager = nt.register(fixed, moving, **kw)
    first = nt.register(fixed, moving, compile=mode, **kw)
    second = nt.register(fixed, moving, compile=mode, **kw)  # replays (CUDA graphs)
    assert torch.allclose(first, eager, atol=1e-4, rtol=0)
    assert torch.allclose(second, eager, atol=1e-4, rtol=0)
