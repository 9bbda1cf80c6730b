"""``NADMMRegistration``: the solver as an ``nn.Module``, optionally with learnable settings.

Hyperparameters live in unconstrained form: ``λ = exp(log_lam)``, ``θ = exp(log_theta)``,
momentum ``a_k = sigmoid(momentum_logit)``, step scale ``exp(log_step)``. So positivity and
``0 < a_k < 1`` hold by construction, whatever the optimiser does. What is not learnable is
kept as a buffer (it moves with ``.to()`` and is saved in the state dict). The settings that
give these tensors their meaning (data term, order, levels, iterations, ...) are saved in the
state dict too, and loading it into a module with other settings is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .checks import (
    check_bool,
    check_displacement,
    check_learnable,
    check_module_device,
    check_options,
    check_pair,
    check_pyramid_size,
    check_spacing,
)
from .ops.solver import Diagnostics, SolverConfig, compile_mode, solve
from .presets import CONFIG_FIELDS, preset_config

LEARNABLE_NAMES = ("lambda", "theta", "momentum", "step")
# Stored tensor -> learnable name; ``log_*`` are exponentiated (so must stay within exp's range).
HYPERPARAMETERS = {
    "log_lam": "lambda", "log_theta": "theta", "momentum_logit": "momentum", "log_step": "step"
}


def _parse_learnable(learnable: bool | str | Iterable[str] | None) -> frozenset[str]:
    return check_learnable(learnable, LEARNABLE_NAMES)


def nesterov_momentum(iterations: int) -> list[float]:
    """The Nesterov weights ``a_k = (t_{k−1} − 1) / t_k``, ``t_0 = 1``, for k = 1 … K."""
    t, out = 1.0, []
    for _ in range(iterations):
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        out.append((t - 1.0) / t_new)
        t = t_new
    return out


def prepare_pair(fixed: Tensor, moving: Tensor) -> tuple[Tensor, Tensor]:
    """Validate a pair; half-precision inputs are computed in float32 (documented policy)."""
    fixed, moving = check_pair(fixed, moving)
    if fixed.dtype in (torch.float16, torch.bfloat16):
        fixed, moving = fixed.float(), moving.float()
    return fixed, moving


def _check_saved_settings(module, state_dict, prefix, *_args) -> None:
    """Load-state-dict pre-hook: refuse a state dict saved from a module with other settings
    (an order-1 module's λ would otherwise load silently into an order-3 one), before any
    tensor is copied, naming the fields that differ.

    λ and θ are not compared: the state dict carries them (``log_lam``/``log_theta``), the
    module's ``config`` only gave their initial values. A state dict without the entry (saved
    before settings were stored) loads as before, unchecked, also with ``strict=True``.
    """
    key = prefix + "_extra_state"
    saved = state_dict.get(key)
    if saved is None:
        state_dict[key] = None  # strict loading would report the entry as missing
        return
    mine = module._settings()
    theirs = _decode_settings(saved)
    diffs = [
        f"{name}: saved {theirs.get(name, '(absent)')!r}, this module {value!r}"
        for name, value in mine.items()
        if _normal(theirs.get(name)) != _normal(value)
    ]
    if diffs:
        raise ValueError(
            f"state_dict: saved from a NADMMRegistration with other settings ({'; '.join(diffs)}); "
            "build the module with the saved settings before loading"
        )


def _decode_settings(saved) -> dict:
    """The settings record of :meth:`NADMMRegistration.get_extra_state` (a uint8 tensor of
    JSON), or a ValueError saying the entry is not one."""
    try:
        doc = json.loads(bytes(saved.detach().cpu().to(torch.uint8).tolist()).decode())
        return dict(doc["settings"])
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise ValueError(
            f"state_dict: '_extra_state' is not a NADMMRegistration settings record ({exc})"
        ) from None


def _normal(value):
    """Tuples and lists alike (the record is JSON)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


class NADMMRegistration(nn.Module):
    """Diffeomorphic registration by Nesterov-accelerated ADMM, unrolled and differentiable.

    Args:
        preset: ``"fast"``, ``"paper"`` or ``"accurate"`` (see :mod:`nadmm_torch.presets`).
        data_term: ``"l2"`` or ``"l1"``.
        order: regulariser order ``n ≥ 1``.
        learnable: ``None``/``False`` (classical solver), ``True``/``"all"``, or a subset of
            ``{"lambda", "theta", "momentum", "step"}``.
        schedule: ``"level"`` (one λ, θ per pyramid level) or ``"iteration"`` (one per ADMM
            iteration and level: untied schedules).
        checkpoint: gradient checkpointing per warp (recompute in backward; saves memory).
        compile: ``torch.compile`` the solver's linearisation steps: ``False`` (eager), ``True``
            or a mode (``"reduce-overhead"``: CUDA graphs on a GPU). Worth it for many calls
            at one shape (training on fixed-size crops, a cohort); the first call per shape
            compiles for tens of seconds.
        **overrides: any :class:`~nadmm_torch.ops.solver.SolverConfig` field, e.g. ``lam``,
            ``theta``, ``iterations``, ``warps``, ``levels``, ``tol_admm``, ``tol_warp``,
            ``restart``, ``safeguard``, ``boundary``, ``accelerated``.

    Shapes:
        ``forward(fixed (B, 1, *S), moving (B, 1, *S), spacing=None, initial_displacement=None)``
        → displacement ``(B, ndim, *S)`` in voxel units (pull-back: ``moving(x + d(x))``
        matches ``fixed(x)``), ``ndim = len(S) ∈ {2, 3}``. ``fixed``/``moving`` may also be
        ``tio.ScalarImage`` objects, or ``fixed`` a ``tio.Subject`` with images ``"fixed"`` and
        ``"moving"`` (then ``moving=None``): spacing is then read from the fixed image and
        ``S`` is the array order ``(Z, Y, X)`` (see :func:`nadmm_torch.io.unpack_torchio_pair`;
        :func:`nadmm_torch.io.to_torchio` turns results back into TorchIO images).

    Policies (see :func:`nadmm_torch.ops.solver.solve`): the returned field is fold-free; a
    folding initial displacement is repaired with a warning, or refused above 50 % folded; a
    batch element with a constant image gets the initial displacement (or zero) with a
    warning; a non-finite hyperparameter raises, naming it. The state dict carries the
    settings, and loading it into a module with other settings raises.
    """

    def __init__(
        self,
        preset: str = "fast",
        *,
        data_term: str = "l2",
        order: int = 2,
        learnable: bool | str | Iterable[str] | None = None,
        schedule: str = "level",
        checkpoint: bool = False,
        compile: bool | str = False,
        **overrides,
    ) -> None:
        super().__init__()
        compile_mode(compile)  # a bad value fails here, not at the first forward
        if schedule not in ("level", "iteration"):
            raise ValueError(f"schedule: expected 'level' or 'iteration', got {schedule!r}")
        overrides = check_options(preset, data_term, order, overrides)
        self.config: SolverConfig = preset_config(preset, data_term, order, **overrides)
        self.learnable = _parse_learnable(learnable)
        self.schedule = schedule
        self.checkpoint = check_bool(checkpoint, "checkpoint")
        self.compile = compile
        cfg = self.config
        k_max, w_max = max(cfg.iterations), max(cfg.warps)
        per_iter = schedule == "iteration"
        lam = torch.tensor(cfg.per_level("lam"), dtype=torch.float64).log()
        theta = torch.tensor(cfg.per_level("theta"), dtype=torch.float64).log()
        cols = k_max if per_iter else 1
        self._store("log_lam", lam.unsqueeze(1).repeat(1, cols), "lambda")
        self._store("log_theta", theta.unsqueeze(1).repeat(1, cols), "theta")
        a = torch.tensor(nesterov_momentum(k_max), dtype=torch.float64).clamp(1e-3, 1 - 1e-3)
        self._store("momentum_logit", torch.logit(a).repeat(cfg.levels, 1), "momentum")
        self._store("log_step", torch.zeros(cfg.levels, w_max, dtype=torch.float64), "step")
        self.register_load_state_dict_pre_hook(_check_saved_settings)

    # -- the settings travel with the state dict -------------------------------------------
    def get_extra_state(self) -> Tensor:
        """The settings that give the stored tensors their meaning, saved in the state dict
        (``"_extra_state"``) and checked when it is loaded (see :func:`_check_saved_settings`).

        A uint8 tensor holding JSON, so that every value of the state dict stays a tensor
        (code that clones, moves or filters a state dict by tensor methods keeps working).
        """
        doc = json.dumps({"format": 1, "settings": self._settings()}, sort_keys=True)
        return torch.tensor(list(doc.encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """Nothing to restore: the settings were checked before any tensor was loaded."""

    def _settings(self) -> dict:
        c = self.config
        out = {name: getattr(c, name) for name in CONFIG_FIELDS if name not in ("lam", "theta")}
        out["schedule"] = self.schedule
        return out

    def _store(self, name: str, value: Tensor, key: str) -> None:
        value = value.float()
        if key in self.learnable:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def check_hyperparameters(self) -> None:
        """Raise if a stored hyperparameter (learnable or not) is NaN or ±inf, or its
        exponential over- or underflows: after an optimiser blow-up the solver would
        otherwise return ``d ≡ 0`` or NaN without a word. One host synchronisation."""
        bad = []
        for attr in HYPERPARAMETERS:
            t = getattr(self, attr).detach()
            ok = torch.isfinite(t)
            if attr.startswith("log_"):
                e = t.exp()
                ok = ok & torch.isfinite(e) & (e > 0)
            bad.append(~ok.all())
        if not bool(torch.stack(bad).any()):
            return
        for (attr, key), b in zip(HYPERPARAMETERS.items(), bad):
            if bool(b):
                t = getattr(self, attr).detach()
                kind = "learnable parameter" if key in self.learnable else "buffer"
                raise ValueError(
                    f"{attr} ({kind} {key!r}): holds non-finite values or values whose "
                    f"exponential overflows (min {float(t.min())}, max {float(t.max())}); an "
                    "optimiser step diverged? Lower the learning rate or clip the gradients"
                )

    # -- hyperparameters as the solver wants them -------------------------------------------
    def hyperparameters(self, dtype: torch.dtype) -> dict:
        """Per-level λ, θ (scalars or (K,) schedules), momentum and step scales (or None)."""
        cfg = self.config
        lam, theta, momentum, step = [], [], None, None
        for level, k in enumerate(cfg.iterations):
            sl = slice(0, k) if self.schedule == "iteration" else 0
            lam.append(self.log_lam[level, sl].to(dtype).exp())
            theta.append(self.log_theta[level, sl].to(dtype).exp())
        if "momentum" in self.learnable:
            momentum = [
                torch.sigmoid(self.momentum_logit[level, :k].to(dtype))
                for level, k in enumerate(cfg.iterations)
            ]
        if "step" in self.learnable:
            step = [
                self.log_step[level, :w].to(dtype).exp() for level, w in enumerate(cfg.warps)
            ]
        return dict(lam=lam, theta=theta, momentum=momentum, step_scale=step)

    def forward(
        self,
        fixed: Tensor,
        moving: Tensor | None = None,
        spacing=None,
        initial_displacement: Tensor | None = None,
        return_diagnostics: bool = False,
    ) -> Tensor | tuple[Tensor, Diagnostics]:
        return_diagnostics = check_bool(return_diagnostics, "return_diagnostics")
        if not (isinstance(fixed, Tensor) and isinstance(moving, Tensor)):
            from .io import unpack_torchio_pair  # TorchIO images / subject: spacing from them

            fixed, moving, spacing, _ = unpack_torchio_pair(fixed, moving, spacing)
        if isinstance(fixed, Tensor):
            check_module_device(fixed, self, "fixed")
        fixed, moving = prepare_pair(fixed, moving)
        ndim = fixed.dim() - 2
        spacing = check_spacing(spacing, ndim)
        check_pyramid_size(fixed.shape[2:])
        if initial_displacement is not None:
            initial_displacement = check_displacement(
                initial_displacement, "initial_displacement", like=fixed
            )
        self.check_hyperparameters()
        params = self.hyperparameters(fixed.dtype)
        d, diag = solve(
            fixed,
            moving,
            self.config,
            spacing=spacing,
            initial_displacement=initial_displacement,
            checkpoint=self.checkpoint,
            compile=self.compile,
            diagnostics=return_diagnostics,
            **params,
        )
        return (d, diag) if return_diagnostics else d

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"data_term={c.data_term!r}, order={c.order}, levels={c.levels}, "
            f"iterations={c.iterations}, warps={c.warps}, learnable={sorted(self.learnable)}"
        )
