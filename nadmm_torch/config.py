"""The solver's settings: :class:`SolverConfig`, the named presets with their tuned λ and θ,
settings files, and :meth:`SolverConfig.from_preset`, the one place where options are validated.

Presets (ADMM iterations K and warps W per pyramid level, coarse → fine):

* ``paper``: the paper's capped schedule, K = (10, 5, 5), W = (10, 10, 5).
* ``fast``: K = 5, W = (7, 5, 0): the finest level has no warps, so the field is solved at half
  the in-plane resolution and upsampled (a smooth field loses little by it); about a fifth of
  ``paper``'s time for a Dice a few thousandths lower on ACDC (README: Results on ACDC,
  Speed).
* ``balanced``: ``fast`` plus one warp of K = 8 at full resolution, K = (5, 5, 8), W = (7, 5,
  1), with ``fast``'s λ and θ: ``paper``'s Dice (or better) at about 1.5× ``fast``'s time
  (schedule chosen on the ACDC tuning split by ``benchmarks/schedules.py``; README: Speed).
* ``accurate``: twice ``paper``'s iterations and up to twice its warps, a level stopping once
  its RMS step falls under 0.01 voxel. Longer settings cost much more for no measurable gain,
  so they are not a preset.

λ and θ depend on the data term and the regulariser order; they were selected on the tuning
split of the ACDC development data by ``benchmarks/tune_nadmm.py`` (record:
``benchmarks/records/tune_nadmm.json``), for images in [0, 1] and spacing in mm; with the default
``lam_scaling="gradient"`` they are re-expressed relative to the pair's gradient energy (see
:data:`ACDC_GRADIENT_RMS`).
θ, the ADMM penalty, does not change the convex model's minimiser; with capped iterations a
small θ acts as extra smoothing; with the default ``theta_scaling="spectral"`` it is
re-expressed relative to the pair's characteristic frequency (see :data:`ACDC_SPECTRAL_K2`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from .checks import (
    check_bool,
    check_choice,
    check_int,
    check_per_level,
    check_positive,
    check_real,
    is_int,
)
from .ops.admm import DATA_TERMS
from .ops.features import FEATURES
from .ops.fourier import BOUNDARIES
from .ops.solver import NORMALIZE_MODES

PRESETS: dict[str, dict] = {
    "fast": dict(iterations=(5, 5, 5), warps=(7, 5, 0), tol_admm=None, tol_warp=None),
    "balanced": dict(iterations=(5, 5, 8), warps=(7, 5, 1), tol_admm=None, tol_warp=None),
    "paper": dict(iterations=(10, 5, 5), warps=(10, 10, 5), tol_admm=None, tol_warp=None),
    "accurate": dict(iterations=(20, 10, 10), warps=(20, 20, 10), tol_admm=None, tol_warp=1e-2),
}

Value = float | tuple[float, ...]  # one for all levels, or one per level (coarse → fine)
# (preset, data_term, order) -> (λ, θ). ``fast`` (and ``balanced``) have per-level values (the
# finest level's, never solved by ``fast``, repeat the middle one's);
# ``paper`` and ``accurate`` one value for all levels.
TUNED: dict[tuple[str, str, int], tuple[Value, Value]] = {
    ("paper", "l2", 1): (9.0, 0.03),
    ("paper", "l2", 2): (0.3, 0.001),
    ("paper", "l2", 3): (0.1 / 9, 1e-4 / 9),
    ("paper", "l1", 1): (0.9, 0.01),
    ("paper", "l1", 2): (0.03, 0.001),
    ("paper", "l1", 3): (0.01 / 9, 1e-4 / 3),
    ("fast", "l2", 1): ((27.0, 27.0, 27.0), (0.0333333, 0.1, 0.1)),
    ("fast", "l2", 2): ((0.333333, 1.732051, 1.732051), (0.00057735, 0.005196153, 0.005196153)),
    ("fast", "l2", 3): ((0.0037037, 0.1 / 3, 0.1 / 3), (1e-4, 1e-4, 1e-4)),
    ("fast", "l1", 1): ((2.7, 2.7, 2.7), (0.03, 0.09, 0.09)),
    ("fast", "l1", 2): ((0.0333333, 0.1732051, 0.1732051), (0.00057735, 0.003, 0.003)),
    ("fast", "l1", 3): ((0.00111111, 0.01, 0.01), (0.0003, 0.0003, 0.0003)),
    ("accurate", "l2", 1): (3.0, 0.03),
    ("accurate", "l2", 2): (0.1, 0.001),
    ("accurate", "l2", 3): (0.1 / 27, 1e-4 / 3),
    ("accurate", "l1", 1): (0.9, 0.01 / 3),
    ("accurate", "l1", 2): (0.03, 1e-3 / 9),
    ("accurate", "l1", 3): (0.01 / 27, 1e-4),
}
# ``balanced`` is ``fast``'s schedule plus a finest-level warp: it keeps ``fast``'s values (the
# finest level's, tuned for nothing in ``fast``, repeat the middle one's).
TUNED.update({("balanced", dt, n): v for (p, dt, n), v in list(TUNED.items()) if p == "fast"})

# Settings files (written by :meth:`nadmm_torch.tuning.TuneResult.save`).
# RMS image gradient (voxel units, both images, percentile-normalised) of the ACDC tuning pairs
# per pyramid level (coarse → fine), mean over the 60 pairs (coefficient of variation 11-12 %).
# TUNED holds λ for intensities in [0, 1] (``lam_scaling="none"``); with the default
# ``lam_scaling="gradient"`` the images are divided by the pair's own RMS gradient, so the same
# model on ACDC takes λ × RMS² (l2) or λ × RMS (l1): :func:`_preset_settings` converts.
ACDC_GRADIENT_RMS = (0.1774, 0.1638, 0.1474)
LAM_SCALINGS = ("gradient", "none")
# Squared characteristic frequency k² = mean |Δ_h I|² / mean |∇_h I|² (mm⁻², both images,
# percentile-normalised; :func:`nadmm_torch.ops.solver.spectral_scale`) of the ACDC tuning
# pairs per pyramid level (coarse → fine), mean over the 60 pairs (``benchmarks/theta_rule.py
# --reference``). TUNED holds θ in absolute units (``theta_scaling="none"``); with the default
# ``theta_scaling="spectral"`` the solver multiplies θ by the pair's own k²ⁿ at each level, so
# the presets' θ are divided by this reference's k²ⁿ: ACDC sees the same θ on an average pair.
ACDC_SPECTRAL_K2 = (0.02609, 0.08526, 0.2753)
THETA_SCALINGS = ("spectral", "none")

SETTINGS_FORMAT = "nadmm-torch-settings"
SETTINGS_VERSION = 2
# Version 1 files predate ``theta_scaling``: their θ is absolute (read as ``"none"``).
SETTINGS_THETA_RELATIVE = 2

# λ and θ bounds that keep the solver's float32 arithmetic finite (λ h^-2n, 1/θ): beyond them
# a field silently comes back zero or an overflow error is raised from deep inside.
WEIGHT_BOUNDS = (1e-12, 1e12)


@dataclass(frozen=True)
class SolverConfig:
    """Settings of the solver. Per-level tuples run coarse → fine.

    Build it with :meth:`from_preset` (validated); the constructor only normalises the
    containers (a number for ``iterations``/``warps`` means one per level, lists become tuples).

    ``lam``/``theta`` are floats or per-level tuples. ``iterations`` (ADMM, K) and ``warps``
    (compositions, W) are maxima; ``tol_admm``/``tol_warp`` stop earlier where set.
    ``tol_warp`` is the RMS step (voxels of the level) under which a level stops (a step the
    safeguard scales to 0 counts as 0).
    ``frozen_axes``: spatial axes along which nothing moves (their displacement component stays
    zero), or ``"thick"`` for the axes with spacing > 2 × the finest (slice axes of 2D-stack MRI,
    whose image gradient across 5–10 mm slices is not a reliable motion cue).
    ``restart`` is on by default: without it the accelerated scheme can diverge on this
    weakly convex model once run long (see ``tests/test_admm.py``).
    ``features``: ``"none"`` (register intensities) or ``"mind"`` (register the MIND-SSC
    descriptors of the images, :func:`nadmm_torch.ops.features.mind_ssc`: for pairs whose
    intensities do not correspond, e.g. two MRI contrasts; needs ``data_term="l2"``). The
    preset's λ is kept: with ``lam_scaling="gradient"`` it is relative to the pair's gradient
    energy summed over the channels, so it means the same for descriptors as for intensities.
    Measured on brain2d (``benchmarks/multimodal.py``): MIND's Dice moves by 0.013 over λ/16
    … 4λ, and the preset's λ is within 0.008 of the best of that sweep (λ/16); no separate
    rule for features is needed.
    ``lam_scaling``/``theta_scaling``: ``"gradient"``/``"spectral"`` (defaults) make λ and θ
    relative to each pair's content at each level (λ to its gradient energy, θ to its
    characteristic frequency ``k²ⁿ``, :func:`nadmm_torch.ops.solver.spectral_scale`), so one
    preset holds across domains; ``"none"``: absolute values, for images in [0, 1] and mm.
    """

    data_term: str = "l2"
    order: int = 2
    lam: float | tuple[float, ...] = 1.0
    theta: float | tuple[float, ...] = 1.0
    levels: int = 3
    iterations: tuple[int, ...] = (10, 5, 5)
    warps: tuple[int, ...] = (10, 10, 5)
    tol_admm: float | None = None
    tol_warp: float | None = None
    accelerated: bool = True
    restart: bool = True
    restart_eta: float = 0.999
    safeguard: bool = True
    min_jacobian: float = 0.0
    boundary: str = "neumann"
    normalize: str = "percentile"
    lam_scaling: str = "gradient"
    theta_scaling: str = "spectral"
    anisotropic_pyramid: bool = True
    min_level_size: int = 4
    frozen_axes: tuple[int, ...] | str = ()
    features: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.normalize, bool):  # the old boolean form: True = the default scaling
            object.__setattr__(self, "normalize", "percentile" if self.normalize else "none")
        for name in ("iterations", "warps"):
            value = getattr(self, name)
            per_level = (value,) * self.levels if isinstance(value, int) else tuple(value)
            object.__setattr__(self, name, per_level)
        for name in ("lam", "theta", "frozen_axes"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    def per_level(self, name: str) -> tuple[float, ...]:
        """``lam``/``theta`` as one value per level."""
        value = getattr(self, name)
        if isinstance(value, (int, float)):
            return (float(value),) * self.levels
        return tuple(float(v) for v in value)

    def scaled(self, name: str, factor: float) -> tuple[float, ...]:
        """``lam``/``theta`` per level, each times ``factor`` (a sweep around a preset)."""
        return tuple(v * factor for v in self.per_level(name))

    @classmethod
    def from_preset(
        cls,
        preset: str | os.PathLike | SolverConfig = "fast",
        data_term: str | None = None,
        order: int | None = None,
        **overrides,
    ) -> SolverConfig:
        """The validated settings of a preset (or a settings file), with fields overridden.

        ``preset``: ``"fast"``, ``"balanced"``, ``"paper"``, ``"accurate"``, or a settings file
        (``.json``, from :meth:`nadmm_torch.tuning.TuneResult.save`), whose ``data_term``,
        ``order`` and values apply unless given here. ``data_term``: ``"l2"`` (default) or
        ``"l1"``; ``order``: regulariser order ≥ 1 (default 2). ``overrides``: any field;
        ``None`` means the preset's value. NumPy numbers count as numbers.

        ``lam``/``theta`` default to the tuned values for (preset, data_term, order); orders
        without tuned values use those of the nearest tuned order. The preset's per-level
        values (λ, θ, ``iterations``, ``warps``) follow an overridden ``levels`` by resolution,
        unless given explicitly: the finest levels keep theirs, added coarser levels take the
        coarsest value. A pyramid left with no level that warps (``fast``, whose finest level
        has none, at ``levels=1``) runs the finest solved level's warps at the finest level.

        Raises TypeError for a value of the wrong type, ValueError for a wrong value, each
        naming the option ("name: expected …, got …").
        """
        if isinstance(preset, SolverConfig):
            if data_term is not None or order is not None or overrides:
                raise ValueError(
                    "preset: a SolverConfig is complete; pass no data_term, order or overrides "
                    "with it (build one with SolverConfig.from_preset(name, ..., **overrides))"
                )
            return preset
        if _is_settings_file(preset):
            preset, data_term, order, overrides = _merge_file(preset, data_term, order, overrides)
        check_choice(preset, "preset", sorted(PRESETS))
        data_term = "l2" if data_term is None else data_term
        check_choice(data_term, "data_term", DATA_TERMS)
        order = check_int(2 if order is None else order, "order", 1)
        options = _check_options(overrides)
        if options.get("features", "none") != "none" and data_term != "l2":
            raise ValueError(
                f"features: {options['features']!r} gives multi-channel images, which need "
                f"data_term='l2', got data_term={data_term!r}"
            )
        settings = _preset_settings(preset, data_term, order, options)
        _check_levels(settings)
        return cls(**settings)


FIELDS = tuple(f.name for f in fields(SolverConfig))


def preset_config(
    preset: str | os.PathLike = "fast", data_term: str | None = None, order: int | None = None,
    **overrides,
) -> SolverConfig:
    """:meth:`SolverConfig.from_preset` under its former name."""
    return SolverConfig.from_preset(preset, data_term, order, **overrides)


# -- options ----------------------------------------------------------------------------------

POSITIVE_PER_LEVEL = "a positive finite number, or one per level"


def _weight(value: object, name: str) -> float:
    """λ or θ: positive, finite and within :data:`WEIGHT_BOUNDS`."""
    v = check_positive(value, name, POSITIVE_PER_LEVEL)
    lo, hi = WEIGHT_BOUNDS
    if not lo <= v <= hi:
        raise ValueError(
            f"{name}: expected values in [{lo:g}, {hi:g}] (beyond them the solver's float32 "
            f"arithmetic overflows or underflows), got {value!r}"
        )
    return v


def _weights(value: object, name: str):
    return check_per_level(value, name, lambda v: _weight(v, name))


def _counts(least: int):
    def check(value: object, name: str):
        return check_per_level(value, name, lambda v: check_int(v, f"{name} (per level)", least))

    return check


def _tolerance(value: object, name: str) -> float:
    return check_real(value, name, "None or a finite number >= 0", lambda v: 0 <= v < math.inf)


def _min_jacobian(value: object, name: str) -> float:
    # det J of the identity is 1: a threshold >= 1 would refuse every step.
    return check_real(value, name, "a finite number < 1", lambda v: -math.inf < v < 1)


def _restart_eta(value: object, name: str) -> float:
    return check_real(value, name, "a number in (0, 1]", lambda v: 0 < v <= 1)


def _boundary(value: object, name: str) -> str:
    check_choice(value, name, BOUNDARIES)
    return value


def _normalize(value: object, name: str) -> str | bool:
    """One of :data:`NORMALIZE_MODES`, or ``True``/``False`` (aliases of percentile/none,
    mapped by :class:`SolverConfig` itself)."""
    check_choice(value, name, (*NORMALIZE_MODES, True, False))
    return value


def _frozen_axes(value: object, name: str):
    if isinstance(value, str):
        if value != "thick":
            raise ValueError(f"{name}: expected a tuple of axis indices or 'thick', got {value!r}")
        return value
    if not (isinstance(value, Iterable) and all(is_int(a) for a in value)):
        raise TypeError(f"{name}: expected a tuple of axis indices or 'thick', got {value!r}")
    return tuple(int(a) for a in value)


# One validator per field (``data_term``/``order`` are checked with the preset): each takes
# ``(value, name)`` and returns the value in the form the config holds.
OPTION_CHECKS = {
    "lam": _weights,
    "theta": _weights,
    "levels": lambda v, n: check_int(v, n, 1),
    "iterations": _counts(1),
    "warps": _counts(0),
    "tol_admm": _tolerance,
    "tol_warp": _tolerance,
    "accelerated": check_bool,
    "restart": check_bool,
    "restart_eta": _restart_eta,
    "safeguard": check_bool,
    "min_jacobian": _min_jacobian,
    "boundary": _boundary,
    "normalize": _normalize,
    "lam_scaling": lambda v, n: check_choice(v, n, LAM_SCALINGS) or v,
    "theta_scaling": lambda v, n: check_choice(v, n, THETA_SCALINGS) or v,
    "anisotropic_pyramid": check_bool,
    "min_level_size": lambda v, n: check_int(v, n, 1),
    "frozen_axes": _frozen_axes,
    "features": lambda v, n: check_choice(v, n, FEATURES) or v,
}


def _check_options(options: Mapping) -> dict[str, object]:
    """The overrides, each validated by its :data:`OPTION_CHECKS` entry (``None``: dropped)."""
    unknown = sorted(set(options) - set(OPTION_CHECKS))
    if unknown:
        valid = ", ".join(n for n in FIELDS if n in OPTION_CHECKS)
        raise ValueError(f"unknown option(s) {unknown}; valid options: {valid}")
    return {
        name: OPTION_CHECKS[name](value, name) for name, value in options.items()
        if value is not None
    }


def _preset_settings(preset: str, data_term: str, order: int, options: dict) -> dict:
    """The preset's fields for (data_term, order), its per-level values fitted to the pyramid,
    overridden by ``options``."""
    tuned_orders = sorted(o for p, t, o in TUNED if p == preset and t == data_term)
    nearest = min(tuned_orders, key=lambda o: abs(o - order))
    lam, theta = TUNED[(preset, data_term, nearest)]
    settings = dict(PRESETS[preset], data_term=data_term, order=order, lam=lam, theta=theta)
    settings.update(options)
    levels = settings.get("levels", SolverConfig.levels)
    for name in ("lam", "theta", "iterations", "warps"):
        value = settings[name]
        if isinstance(value, tuple) and name not in options:
            settings[name] = _per_resolution(value, levels)
    warps = settings["warps"]
    if "warps" not in options and not any(warps):
        solved = [w for w in PRESETS[preset]["warps"] if w > 0]
        settings["warps"] = (*warps[:-1], solved[-1])
    if "lam" not in options and settings.get("lam_scaling", "gradient") == "gradient":
        power = 2 if data_term == "l2" else 1
        lam = settings["lam"]
        lam = lam if isinstance(lam, tuple) else (lam,) * levels
        ref = _per_resolution(ACDC_GRADIENT_RMS, levels)
        settings["lam"] = tuple(v * r**power for v, r in zip(lam, ref))
    if "theta" not in options and settings.get("theta_scaling", "spectral") == "spectral":
        theta = settings["theta"]
        theta = theta if isinstance(theta, tuple) else (theta,) * levels
        ref = _per_resolution(ACDC_SPECTRAL_K2, levels)
        settings["theta"] = tuple(v / r**order for v, r in zip(theta, ref))
    return settings


def _per_resolution(values: tuple, levels: int) -> tuple:
    """Per-level values (coarse → fine) for a pyramid of ``levels``, aligned at the finest."""
    if levels <= len(values):
        return values[len(values) - levels:]
    return (values[0],) * (levels - len(values)) + values


def _check_levels(settings: dict) -> None:
    """Per-level tuples hold one value per level."""
    levels = settings.get("levels", SolverConfig.levels)
    for name, what in (("lam", "number"), ("theta", "number"), ("iterations", "integer >= 1"),
                       ("warps", "integer >= 0")):
        value = settings[name]
        if isinstance(value, tuple) and len(value) != levels:
            raise ValueError(
                f"{name}: expected one {what}, or {levels} of them (one per level, coarse to "
                f"fine, for levels={levels}), got {value!r}"
            )


# -- settings files ---------------------------------------------------------------------------

def _is_settings_file(preset: object) -> bool:
    """A path (``os.PathLike``, or a string that is no preset name and ends in ``.json`` or
    names a folder) rather than a preset name."""
    if isinstance(preset, os.PathLike):
        return True
    return isinstance(preset, str) and preset not in PRESETS and (
        preset.endswith(".json") or os.sep in preset
    )


def _merge_file(path, data_term, order, overrides: dict):
    """A settings file's preset, data term, order and values, under the explicit ones."""
    saved = read_settings(path)
    preset = saved.pop("preset")
    file_term, file_order = saved.pop("data_term"), saved.pop("order")
    saved.update({k: v for k, v in overrides.items() if v is not None})
    return (preset, file_term if data_term is None else data_term,
            file_order if order is None else order, saved)


def read_settings(path: str | os.PathLike) -> dict:
    """A settings file as keyword arguments of ``register`` / ``NADMMRegistration`` /
    :meth:`SolverConfig.from_preset`: ``preset``, ``data_term``, ``order`` and the overrides."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"settings file not found: '{path}'") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"settings file '{path}': not valid JSON ({exc})") from None
    if not isinstance(doc, Mapping) or doc.get("format") != SETTINGS_FORMAT:
        raise ValueError(f"settings file '{path}': expected format {SETTINGS_FORMAT!r}")
    if doc.get("version", 0) > SETTINGS_VERSION:
        raise ValueError(f"settings file '{path}': version {doc['version']} is newer than "
                         f"this nadmm-torch reads ({SETTINGS_VERSION})")
    out = dict(preset=doc["preset"], data_term=doc["data_term"], order=doc["order"])
    for name, value in doc.get("overrides", {}).items():
        out[name] = tuple(value) if isinstance(value, list) else value
    if doc.get("version", 0) < SETTINGS_THETA_RELATIVE:
        out.setdefault("theta_scaling", "none")
    return out
