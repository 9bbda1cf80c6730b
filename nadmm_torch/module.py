"""``NADMMRegistration``: the solver as an ``nn.Module``, optionally with learnable settings.

The module's settings are a :class:`~nadmm_torch.config.SolverConfig`, built (and validated)
once and read-only. What is learnable is an ``nn.Parameter`` in unconstrained form:
``λ = exp(log_lam)``, ``θ = exp(log_theta)``, momentum ``a_k = sigmoid(momentum_logit)``, step
scale ``exp(log_step)``, so positivity and ``0 < a_k < 1`` hold whatever the optimiser does.
What is not learnable is read from the config at forward time, in the input's dtype. The
settings that give the parameters their meaning (data term, order, levels, iterations, ...) are
saved in the state dict, and loading it into a module with other settings is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .checks import (
    check_bool,
    check_checkpoint,
    check_displacement,
    check_learnable,
    check_module_device,
    check_pair,
    check_pyramid_size,
    check_spacing_rows,
    check_weight_map,
)
from .config import FIELDS, SolverConfig
from .ops.admm import nesterov_weights
from .ops.solver import Diagnostics, compile_mode, solve

LEARNABLE_NAMES = ("lambda", "theta", "momentum", "step")
# Parameter -> learnable name; ``log_*`` are exponentiated (so must stay within exp's range).
HYPERPARAMETERS = {
    "log_lam": "lambda", "log_theta": "theta", "momentum_logit": "momentum", "log_step": "step"
}


def prepare_pair(
    fixed: Tensor, moving: Tensor, multichannel: bool = False
) -> tuple[Tensor, Tensor]:
    """Validate a pair (``multichannel``: ``C >= 1`` channels, the same in both, else
    ``C = 1``); half-precision inputs are computed in float32 (documented policy)."""
    fixed, moving = check_pair(fixed, moving, multichannel)
    if fixed.dtype in (torch.float16, torch.bfloat16):
        fixed, moving = fixed.float(), moving.float()
    return fixed, moving


def solved_levels(config: SolverConfig) -> list[int]:
    """The pyramid levels with warps: the only ones with hyperparameters to learn (a level
    without warps, such as the finest of ``fast``, is never solved: no path reaches it)."""
    return [level for level, w in enumerate(config.warps) if w > 0]


def initial_values(config: SolverConfig, schedule: str) -> dict[str, Tensor]:
    """The unconstrained hyperparameters (float32) that reproduce ``config``, one row per
    solved level (:func:`solved_levels`, coarse → fine): ``(L, K)`` for
    ``schedule="iteration"`` λ, θ, else ``(L, 1)``; momentum ``(L, K)``, step ``(L, W)``
    (``K``, ``W``: the most iterations and warps of a level)."""
    rows = solved_levels(config)
    k_max, w_max = max(config.iterations), max(config.warps)
    cols = k_max if schedule == "iteration" else 1
    lam = torch.tensor(config.per_level("lam"), dtype=torch.float64)[rows].log()
    theta = torch.tensor(config.per_level("theta"), dtype=torch.float64)[rows].log()
    a = torch.tensor(nesterov_weights(k_max), dtype=torch.float64).clamp(1e-3, 1 - 1e-3)
    values = {
        "log_lam": lam.unsqueeze(1).repeat(1, cols),
        "log_theta": theta.unsqueeze(1).repeat(1, cols),
        "momentum_logit": torch.logit(a).repeat(len(rows), 1),
        "log_step": torch.zeros(len(rows), w_max, dtype=torch.float64),
    }
    return {name: v.float() for name, v in values.items()}


def _solved_rows_of(module, state_dict, prefix: str) -> None:
    """State dicts of earlier versions held one row per level, solved or not: keep the rows
    of the solved levels (the others were never used)."""
    config = module.config
    rows = solved_levels(config)
    if len(rows) == config.levels:
        return
    for name in HYPERPARAMETERS:
        saved = state_dict.get(prefix + name)
        if isinstance(saved, Tensor) and saved.dim() == 2 and saved.shape[0] == config.levels:
            state_dict[prefix + name] = saved[rows]


def _check_saved_settings(module, state_dict, prefix, *_args) -> None:
    """Load-state-dict pre-hook: refuse a state dict saved from a module with other settings
    (an order-1 module's λ would otherwise load silently into an order-3 one), before any
    tensor is copied, naming the fields that differ; then drop the entries of hyperparameters
    that this module reads from its config (see :func:`_drop_fixed_values`).

    λ and θ are not compared: learnable, the state dict carries them; not learnable, the
    module's config holds them. A state dict without the settings record (saved before
    settings were stored) loads unchecked, also with ``strict=True``.
    """
    key = prefix + "_extra_state"
    saved = state_dict.get(key)
    if saved is None:
        state_dict[key] = None  # strict loading would report the entry as missing
    else:
        _compare_settings(module._settings(), _decode_settings(saved))
    _solved_rows_of(module, state_dict, prefix)
    _drop_fixed_values(module, state_dict, prefix)


# Settings newer than the settings record: a record without them was saved with their then
# behaviour (absolute θ before ``theta_scaling`` existed).
SETTINGS_DEFAULTS = {"features": "none", "theta_scaling": "none"}


def _compare_settings(mine: dict, theirs: dict) -> None:
    theirs = {**SETTINGS_DEFAULTS, **theirs}
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


def _drop_fixed_values(module, state_dict, prefix: str) -> None:
    """Remove the entries (``log_lam`` ...) of hyperparameters this module does not learn:
    state dicts of earlier versions stored them as buffers holding the config's values. An
    entry that holds other values (learned ones) is refused, not dropped: it would be lost."""
    expected = None
    for name, key in HYPERPARAMETERS.items():
        saved = state_dict.get(prefix + name)
        if key in module.learnable or saved is None:
            continue
        if expected is None:
            expected = initial_values(module.config, module.schedule)
        ok = (isinstance(saved, Tensor) and saved.shape == expected[name].shape
              and torch.allclose(saved.detach().cpu().float(), expected[name]))
        if not ok:
            raise ValueError(
                f"state_dict: {prefix + name} holds values other than this module's settings "
                f"give, and {key!r} is not learnable here; build the module with "
                f"learnable including {key!r} to load them"
            )
        del state_dict[prefix + name]


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
        preset: ``"fast"``, ``"balanced"``, ``"paper"`` or ``"accurate"`` (see
            :mod:`nadmm_torch.config`), the path of a settings file (from
            :meth:`nadmm_torch.tuning.TuneResult.save`), or a
            ready :class:`~nadmm_torch.config.SolverConfig` (then no other setting is given).
        data_term: ``"l2"`` (default, or the settings file's) or ``"l1"``.
        order: regulariser order ``n ≥ 1`` (default 2, or the settings file's).
        learnable: ``None``/``False`` (classical solver), ``True``/``"all"``, or a subset of
            ``{"lambda", "theta", "momentum", "step"}``. Parameters exist only for the
            levels with warps (one row each, coarse → fine): a level without warps (the finest
            of ``fast``) is never solved, so it has none and keeps the config's values.
        schedule: ``"level"`` (one λ, θ per pyramid level) or ``"iteration"`` (one per ADMM
            iteration and level: untied schedules).
        checkpoint: gradient checkpointing per warp: ``True`` (each warp runs without an
            autograd graph and is recomputed in the backward pass: less memory, about 30–40 %
            more time per training step), ``False``, or ``"auto"`` (default): checkpoint the
            levels where that frees the graphs of more than 2**20 field elements, ``(warps −
            1) × field size`` (:data:`~nadmm_torch.ops.solver.CHECKPOINT_AUTO_ELEMENTS`, about
            200 MB of graph; e.g. ``fast`` on 96 × 128 × 128), where the graphs take GBs; below
            it (the ACDC grid, 2D slices) they are small and not recomputing is faster. The
            gradients are the same either way, to float rounding (README: Training cost).
        compile: ``torch.compile`` the solver's linearisation steps: ``False`` (eager), ``True``
            or a mode (``"reduce-overhead"``: CUDA graphs on a GPU). Worth it for many calls
            at one shape (training on fixed-size crops, a cohort); the first call per shape
            compiles for tens of seconds.
        **overrides: any :class:`~nadmm_torch.config.SolverConfig` field, e.g. ``lam``,
            ``theta``, ``iterations``, ``warps``, ``levels``, ``tol_admm``, ``tol_warp``,
            ``restart``, ``safeguard``, ``boundary``, ``accelerated``.

    Shapes:
        ``forward(fixed (B, C, *S), moving (B, C, *S), spacing=None, initial_displacement=None)``
        → displacement ``(B, ndim, *S)`` in voxel units (pull-back: ``moving(x + d(x))``
        matches ``fixed(x)``), ``ndim = len(S) ∈ {2, 3}``. ``spacing``: ``ndim`` numbers (mm,
        order of ``S``) or one row per sample, ``(B, ndim)`` (samples whose spacings differ are
        solved one by one). ``mask``: optional ``(B or 1, 1, *S)`` data-term weights. ``C > 1``
        channels (a multi-contrast pair, ``data_term="l2"``): the data term sums over them,
        each channel normalised on its own. Tensors only: TorchIO images go through
        :func:`nadmm_torch.register` (or :func:`nadmm_torch.io.unpack_torchio_pair`).

    Policies (see :func:`nadmm_torch.ops.solver.solve`): the returned field is fold-free; a
    folding initial displacement is repaired with a warning, or refused above 50 % folded; a
    batch element with a constant image gets the initial displacement (or zero) with a
    warning; a non-finite learnable parameter raises, naming it. The state dict carries the
    settings, and loading it into a module with other settings raises.
    """

    def __init__(
        self,
        preset: str | os.PathLike | SolverConfig = "fast",
        *,
        data_term: str | None = None,
        order: int | None = None,
        learnable: bool | str | Iterable[str] | None = None,
        schedule: str = "level",
        checkpoint: bool | str = "auto",
        compile: bool | str = False,
        **overrides,
    ) -> None:
        super().__init__()
        compile_mode(compile)  # a bad value fails here, not at the first forward
        if schedule not in ("level", "iteration"):
            raise ValueError(f"schedule: expected 'level' or 'iteration', got {schedule!r}")
        self._config = SolverConfig.from_preset(preset, data_term, order, **overrides)
        self.learnable = check_learnable(learnable, LEARNABLE_NAMES)
        self.schedule = schedule
        self.checkpoint = check_checkpoint(checkpoint)
        self.compile = compile
        values = initial_values(self._config, schedule)
        for name, key in HYPERPARAMETERS.items():
            if key in self.learnable:
                self.register_parameter(name, nn.Parameter(values[name]))
        self.register_load_state_dict_pre_hook(_check_saved_settings)

    @property
    def config(self) -> SolverConfig:
        """The settings (read-only: the parameters were built from them)."""
        return self._config

    @config.setter
    def config(self, _value) -> None:
        raise AttributeError(
            "config: read-only (the module's parameters were built from it); build a new "
            "NADMMRegistration(SolverConfig.from_preset(...)) instead"
        )

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
        c = self._config
        out = {name: getattr(c, name) for name in FIELDS if name not in ("lam", "theta")}
        out["schedule"] = self.schedule
        return out

    def check_hyperparameters(self) -> None:
        """Raise if a learnable parameter is NaN or ±inf, or its exponential over- or
        underflows: after an optimiser blow-up the solver would otherwise return ``d ≡ 0``
        or NaN without a word. One host synchronisation."""
        learned = [(n, k) for n, k in HYPERPARAMETERS.items() if k in self.learnable]
        if not learned:
            return
        bad = []
        for attr, _ in learned:
            t = getattr(self, attr).detach()
            ok = torch.isfinite(t)
            if attr.startswith("log_"):
                e = t.exp()
                ok = ok & torch.isfinite(e) & (e > 0)
            bad.append(~ok.all())
        if not bool(torch.stack(bad).any()):
            return
        for (attr, key), b in zip(learned, bad):
            if bool(b):
                t = getattr(self, attr).detach()
                raise ValueError(
                    f"{attr} (learnable parameter {key!r}): holds non-finite values or values "
                    f"whose exponential overflows (min {float(t.min())}, max {float(t.max())}); "
                    "an optimiser step diverged? Lower the learning rate or clip the gradients"
                )

    # -- hyperparameters as the solver wants them -------------------------------------------
    def hyperparameters(self, dtype: torch.dtype, device: torch.device | str | None = None) -> dict:
        """Per-level λ, θ (0-d tensors, or ``(K,)`` schedules), momentum and step scales (or
        None): the learnable ones from their parameters, the others from the config, exact
        in ``dtype``. ``device``: where the config's values go (default: the CPU)."""
        cfg, per_iter = self._config, self.schedule == "iteration"
        row = {level: r for r, level in enumerate(solved_levels(cfg))}
        out = {}
        for attr, name, key in (("log_lam", "lam", "lambda"), ("log_theta", "theta", "theta")):
            out[name] = [
                torch.full((k,) if per_iter else (), v, dtype=dtype, device=device)
                for v, k in zip(cfg.per_level(name), cfg.iterations)
            ]
            if key in self.learnable:
                p = getattr(self, attr)
                for level, r in row.items():
                    k = cfg.iterations[level]
                    out[name][level] = p[r, slice(0, k) if per_iter else 0].to(dtype).exp()
        out["momentum"] = out["step_scale"] = None
        if "momentum" in self.learnable:
            out["momentum"] = [
                torch.sigmoid(self.momentum_logit[row[level], :k].to(dtype)) if level in row
                else None for level, k in enumerate(cfg.iterations)
            ]
        if "step" in self.learnable:
            out["step_scale"] = [
                self.log_step[row[level], :w].to(dtype).exp() if level in row else None
                for level, w in enumerate(cfg.warps)
            ]
        return out

    def forward(
        self,
        fixed: Tensor,
        moving: Tensor | None = None,
        spacing=None,
        initial_displacement: Tensor | None = None,
        return_diagnostics: bool = False,
        mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Diagnostics]:
        return_diagnostics = check_bool(return_diagnostics, "return_diagnostics")
        for name, x in (("fixed", fixed), ("moving", moving)):
            if not isinstance(x, Tensor):
                raise TypeError(
                    f"{name}: expected a torch.Tensor, got {type(x).__name__}; TorchIO images "
                    "and subjects go through nadmm_torch.register, or unpack them with "
                    "nadmm_torch.io.unpack_torchio_pair"
                )
        check_module_device(fixed, self, "fixed")
        fixed, moving = prepare_pair(fixed, moving, multichannel=True)
        if fixed.shape[1] > 1 and self._config.data_term != "l2":
            raise ValueError(
                f"data_term: {self._config.data_term!r} takes single-channel images; with "
                f"C = {fixed.shape[1]} channels use data_term='l2' (summed over the channels)"
            )
        rows = check_spacing_rows(spacing, fixed.shape[0], fixed.dim() - 2)
        check_pyramid_size(fixed.shape[2:])
        if initial_displacement is not None:
            initial_displacement = check_displacement(
                initial_displacement, "initial_displacement", like=fixed
            )
        if mask is not None:
            mask = check_weight_map(mask, "mask", fixed)
        self.check_hyperparameters()
        if any(r != rows[0] for r in rows):
            if return_diagnostics:
                raise ValueError("return_diagnostics: not with a different spacing per sample")
            return torch.cat([self._solve(
                fixed[i:i + 1], moving[i:i + 1], r,
                None if initial_displacement is None else initial_displacement[i:i + 1],
                mask if mask is None or mask.shape[0] == 1 else mask[i:i + 1], False,
            )[0] for i, r in enumerate(rows)])
        d, diag = self._solve(fixed, moving, rows[0], initial_displacement, mask,
                              return_diagnostics)
        return (d, diag) if return_diagnostics else d

    def _solve(self, fixed, moving, spacing, initial, mask, diagnostics: bool):
        """:func:`~nadmm_torch.ops.solver.solve` with this module's settings (one spacing)."""
        return solve(
            fixed, moving, self._config, spacing=spacing, initial_displacement=initial,
            checkpoint=self.checkpoint, compile=self.compile, diagnostics=diagnostics,
            mask=mask, **self.hyperparameters(fixed.dtype, fixed.device),
        )

    def extra_repr(self) -> str:
        c = self._config
        return (
            f"data_term={c.data_term!r}, order={c.order}, levels={c.levels}, "
            f"iterations={c.iterations}, warps={c.warps}, learnable={sorted(self.learnable)}"
        )
