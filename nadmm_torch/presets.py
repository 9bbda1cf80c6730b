"""Named solver settings.

``paper`` is the paper's capped schedule (ADMM iterations K = (10, 5, 5), warps W = (10, 10, 5),
coarse → fine). ``fast`` is ours, chosen for time at little cost in Dice: K = 5 and W = (7, 5, 0),
i.e. the finest level has no warps: the field is solved at half the in-plane resolution and
upsampled (a smooth field loses little by it). On 12 ACDC tuning pairs it scores Dice 0.853
against the paper schedule's 0.860, in about a fifth of the time (tuned SimpleITK demons: 0.811
on the same pairs); 7 coarse warps scored as well as 10 (0.8526 vs 0.8514 at the same λ, θ). Its
λ, θ are per level (refined on all 60 tuning pairs: 0.8547 → 0.8589 for l2, order 2).
The README's Speed section has the timings. ``accurate`` runs twice the paper's ADMM
iterations and up to twice its warps, a level stopping once its RMS step falls under 0.01
voxel. Longer settings (60 ADMM iterations, 40 warps, ADMM tolerance 1e-3) cost 12–40×
``paper`` on ACDC for +0.002 Dice at most (measured on 6 tuning pairs), so they are not a
preset.

λ and θ depend on the data term and the regulariser order; the values below were tuned on
the tuning split of the ACDC development data (``benchmarks/tune_nadmm.py``; record in
``benchmarks/records/tune_nadmm.json``). θ, the ADMM penalty, does not change the convex
model's minimiser; with capped iterations a small θ acts as extra smoothing.
"""

from __future__ import annotations

from dataclasses import fields

from .ops.solver import SolverConfig

PRESETS: dict[str, dict] = {
    "fast": dict(iterations=(5, 5, 5), warps=(7, 5, 0), tol_admm=None, tol_warp=None),
    "paper": dict(iterations=(10, 5, 5), warps=(10, 10, 5), tol_admm=None, tol_warp=None),
    "accurate": dict(iterations=(20, 10, 10), warps=(20, 20, 10), tol_admm=None, tol_warp=1e-2),
}

# (preset, data_term, order) -> (λ, θ), for images mapped to [0, 1] by the default
# normalisation (joint 0.5/99.5 percentiles, ops.solver.normalise_pair) and spacing in mm.
Value = float | tuple[float, ...]  # one for all levels, or one per level
TUNED: dict[tuple[str, str, int], tuple[Value, Value]] = {
    # paper: best mean Dice (fold-free) of the λ × θ grid, 12 tuning pairs; grid values
    # are 3^k multiples, so 0.01 / 9 etc. are exact grid points.
    ("paper", "l2", 1): (9.0, 0.03),
    ("paper", "l2", 2): (0.3, 0.001),
    ("paper", "l2", 3): (0.1 / 9, 1e-4 / 9),
    ("paper", "l1", 1): (0.9, 0.01),
    ("paper", "l1", 2): (0.03, 0.001),
    ("paper", "l1", 3): (0.01 / 9, 1e-4 / 3),
    # fast: per pyramid level (coarse → fine; the finest, never solved, repeats the middle
    # one): the grid's best (λ, θ) (fast-* in the record's "best": 27, 0.1 | 1, 0.003 |
    # 0.1/3, 1e-4 | 2.7, 0.03 | 0.1, 0.003 | 0.01/3, 3e-4 for l2 o1–3, l1 o1–3) times the
    # per-level multipliers of --per-level (3^(k/2), rounded to 6 digits), on all 60 tuning pairs.
    ("fast", "l2", 1): ((27.0, 27.0, 27.0), (0.0333333, 0.1, 0.1)),
    ("fast", "l2", 2): ((0.333333, 1.732051, 1.732051), (0.00057735, 0.005196153, 0.005196153)),
    ("fast", "l2", 3): ((0.0037037, 0.1 / 3, 0.1 / 3), (1e-4, 1e-4, 1e-4)),
    ("fast", "l1", 1): ((2.7, 2.7, 2.7), (0.03, 0.09, 0.09)),
    ("fast", "l1", 2): ((0.0333333, 0.1732051, 0.1732051), (0.00057735, 0.003, 0.003)),
    ("fast", "l1", 3): ((0.00111111, 0.01, 0.01), (0.0003, 0.0003, 0.0003)),
    # accurate: λ × {1/3, 1, 3} around the paper value, at its θ, extended past edges.
    ("accurate", "l2", 1): (3.0, 0.03),
    ("accurate", "l2", 2): (0.1, 0.001),
    ("accurate", "l2", 3): (0.1 / 27, 1e-4 / 3),
    ("accurate", "l1", 1): (0.9, 0.01 / 3),
    ("accurate", "l1", 2): (0.03, 1e-3 / 9),
    ("accurate", "l1", 3): (0.01 / 27, 1e-4),
}

# RMS image gradient (voxel units, both images, joint-percentile normalised) of the ACDC tuning
# pairs per pyramid level (coarse → fine), mean over the 60 pairs (coefficient of variation
# 11-12 %). TUNED holds λ for intensities in [0, 1] (``lam_scaling="none"``); with the default
# ``lam_scaling="gradient"`` the images are divided by the pair's own RMS gradient, so the
# same model on ACDC takes λ × RMS² (l2) or λ × RMS (l1): :func:`preset_config` converts.
ACDC_GRADIENT_RMS = (0.1774, 0.1638, 0.1474)

CONFIG_FIELDS = tuple(f.name for f in fields(SolverConfig))


def preset_config(
    preset: str = "fast", data_term: str = "l2", order: int = 2, **overrides
) -> SolverConfig:
    """The :class:`SolverConfig` of a named preset, with any field overridden.

    ``lam``/``theta`` default to the tuned values for (preset, data_term, order); orders without
    tuned values use those of the nearest tuned order. The preset's per-level values (λ, θ,
    ``iterations``, ``warps``) follow an overridden ``levels`` by resolution, unless given
    explicitly: the finest levels keep theirs, added coarser levels take the coarsest value.
    A pyramid left with no level that warps (``fast``, whose finest level has none, at
    ``levels=1``) runs the finest solved level's warps at the finest level instead.
    """
    from .checks import check_options  # the one place for option validation

    overrides = check_options(preset, data_term, order, overrides)
    tuned_orders = sorted(o for p, t, o in TUNED if p == preset and t == data_term)
    nearest = min(tuned_orders, key=lambda o: abs(o - order))
    lam, theta = TUNED[(preset, data_term, nearest)]
    settings = dict(PRESETS[preset], data_term=data_term, order=order, lam=lam, theta=theta)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    levels = settings.get("levels", SolverConfig.levels)
    for name in ("lam", "theta", "iterations", "warps"):
        value = settings[name]
        if isinstance(value, tuple) and overrides.get(name) is None:
            settings[name] = _per_resolution(value, levels)
    warps = settings["warps"]
    if overrides.get("warps") is None and not any(warps):
        solved = [w for w in PRESETS[preset]["warps"] if w > 0]
        settings["warps"] = (*warps[:-1], solved[-1])
    if overrides.get("lam") is None and settings.get("lam_scaling", "gradient") == "gradient":
        power = 2 if data_term == "l2" else 1
        lam = settings["lam"]
        lam = lam if isinstance(lam, tuple) else (lam,) * levels
        ref = _per_resolution(ACDC_GRADIENT_RMS, levels)
        settings["lam"] = tuple(v * r**power for v, r in zip(lam, ref))
    return SolverConfig(**settings)


def _per_resolution(values: tuple[float, ...], levels: int) -> tuple[float, ...]:
    """Per-level values (coarse → fine) for a pyramid of ``levels``, aligned at the finest."""
    if levels <= len(values):
        return values[len(values) - levels:]
    return (values[0],) * (levels - len(values)) + values
