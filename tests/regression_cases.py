"""Registration cases whose displacements are pinned in ``tests/data/regression_displacements.npz``.

Every case registers crops of the bundled ACDC sample (``nadmm_torch.data.sample``) through the
public entry points: presets ``fast``/``paper``/``accurate``, data terms l1/l2, orders 1–3, with
and without learnable parameters (perturbed deterministically), float32 and float64, with an
initial displacement, and 3D (the whole slice stack, cropped in-plane).

Regenerate the reference file (only when a change of results is intended, and say so in the
commit) with ``python -m tests.regression_cases``.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch

import nadmm_torch as nt
from nadmm_torch.data.sample import load_sample

REFERENCE = Path(__file__).parent / "data" / "regression_displacements.npz"
# The cases pinned before θ became relative to the images' frequency: absolute θ.
_register = partial(nt.register, theta_scaling="none")
_Model = partial(nt.NADMMRegistration, theta_scaling="none")


@contextmanager
def pre_refactor_rounding():
    """λ and θ that are not learnable rounded as before the settings moved to
    ``nadmm_torch.config``: through a float32 logarithm, ``exp(float32(log λ))`` in the
    solve's dtype (now the configured value itself). With it, the refactored code must give
    the reference displacements bit for bit: the rounding of λ, θ is the one intended change."""
    original = nt.NADMMRegistration.hyperparameters

    def rounded(self, dtype, device=None):
        out = original(self, dtype, device)
        for name, key in (("lam", "lambda"), ("theta", "theta")):
            if key in self.learnable:
                continue
            logs = torch.tensor(self.config.per_level(name), dtype=torch.float64).log().float()
            out[name] = [torch.full_like(v, float(lg.to(dtype).exp()))
                         for v, lg in zip(out[name], logs)]
        return out

    nt.NADMMRegistration.hyperparameters = rounded
    try:
        yield
    finally:
        nt.NADMMRegistration.hyperparameters = original


def _crops():
    s = load_sample()
    z = s.fixed.shape[2] // 2
    f2 = s.fixed[:, :, z, 40:88, 40:88].contiguous()
    m2 = s.moving[:, :, z, 40:88, 40:88].contiguous()
    f3 = s.fixed[:, :, :, 44:84, 44:84].contiguous()
    m3 = s.moving[:, :, :, 44:84, 44:84].contiguous()
    return (f2, m2, s.spacing[1:]), (f3, m3, s.spacing)


def _initial(shape) -> torch.Tensor:
    """A smooth, fold-free displacement of max 1.5 voxels."""
    grids = torch.meshgrid(*[torch.linspace(0, np.pi, n) for n in shape], indexing="ij")
    comps = [torch.sin(grids[(i + 1) % len(shape)]) * (1.5 - 0.4 * i) for i in range(len(shape))]
    return torch.stack(comps)[None]


def _perturb(model: nt.NADMMRegistration) -> nt.NADMMRegistration:
    """Move every learnable parameter off its initial value, deterministically."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            steps = torch.arange(p.numel(), dtype=p.dtype).view_as(p)
            p.add_(0.05 * torch.cos(steps + len(name)))
    return model


def cases():
    """``name -> function returning the displacement`` (a float tensor). The cases pinned
    before θ became relative to the images' frequency (``theta_scaling="spectral"``) run with
    ``theta_scaling="none"``; the ``-spectral`` cases pin the default."""
    (f2, m2, h2), (f3, m3, h3) = _crops()
    out = _spectral_cases(f2, m2, h2, f3, m3, h3)

    for preset in ("fast", "paper"):
        for data_term in ("l2", "l1"):
            for order in (1, 2, 3):
                out[f"2d-{preset}-{data_term}-o{order}"] = (
                    lambda p=preset, t=data_term, o=order: _register(
                        f2, m2, spacing=h2, preset=p, data_term=t, order=o
                    )
                )
    out["2d-accurate-l2-o2"] = lambda: _register(f2, m2, spacing=h2, preset="accurate")
    out["2d-fast-l2-o2-float64"] = lambda: _register(f2.double(), m2.double(), spacing=h2)
    out["2d-paper-l1-o2-float64"] = lambda: _register(
        f2.double(), m2.double(), spacing=h2, preset="paper", data_term="l1"
    )
    out["2d-fast-l2-o2-initial"] = lambda: _register(
        f2, m2, spacing=h2, initial_displacement=_initial(f2.shape[2:])
    )
    out["2d-paper-l2-o2-overrides"] = lambda: _register(
        f2, m2, spacing=h2, preset="paper", lam=0.7, theta=(0.01, 0.002, 0.001), tol_admm=1e-3,
        boundary="periodic", restart=False,
    )

    def learned(preset, learnable, schedule, data_term="l2", dtype=torch.float32):
        model = _perturb(_Model(
            preset, data_term=data_term, learnable=learnable, schedule=schedule
        ))
        with torch.no_grad():
            return model(f2.to(dtype), m2.to(dtype), spacing=h2)

    out["2d-fast-learn-all-level"] = lambda: learned("fast", True, "level")
    out["2d-paper-learn-all-iteration"] = lambda: learned("paper", True, "iteration", "l1")
    out["2d-paper-learn-lambda-level"] = lambda: learned("paper", "lambda", "level")
    out["2d-fast-learn-theta-float64"] = lambda: learned(
        "fast", "theta", "level", dtype=torch.float64
    )
    out["3d-fast-l2-o2"] = lambda: _register(f3, m3, spacing=h3)
    out["3d-paper-l1-o2"] = lambda: _register(f3, m3, spacing=h3, preset="paper", data_term="l1")
    out["3d-fast-l2-o3-initial-thick"] = lambda: _register(
        f3, m3, spacing=h3, order=3, frozen_axes="thick",
        initial_displacement=_initial(f3.shape[2:]) * torch.tensor([0.0, 1, 1]).view(1, 3, 1, 1, 1),
    )
    return out


def _spectral_cases(f2, m2, h2, f3, m3, h3) -> dict:
    return {
        "2d-fast-l2-o2-spectral": lambda: nt.register(f2, m2, spacing=h2),
        "2d-paper-l1-o2-spectral": lambda: nt.register(f2, m2, spacing=h2, preset="paper",
                                                        data_term="l1"),
        "3d-balanced-l2-o2-spectral": lambda: nt.register(f3, m3, spacing=h3,
                                                           preset="balanced"),
    }


def main() -> None:
    torch.set_num_threads(1)
    arrays = {}
    for name, fn in cases().items():
        with pre_refactor_rounding():
            d = fn()
        arrays[name] = d.detach().cpu().numpy()  # float32 or float64, as computed
        print(name, tuple(d.shape), d.dtype)
    REFERENCE.parent.mkdir(exist_ok=True)
    np.savez_compressed(REFERENCE, **arrays)
    print(REFERENCE, REFERENCE.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
