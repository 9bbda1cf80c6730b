"""The per-level stage of ``benchmarks/tune_nadmm.py`` on a synthetic score (no data needed):
the coordinate search must find a known optimum of the multipliers and record what it ran."""

from __future__ import annotations

import math

from .test_benchmark_smoke import _load


def _tuner():
    return _load("tune_nadmm")


def test_per_level_search_finds_the_optimum_of_a_synthetic_score(monkeypatch):
    tune = _tuner()
    lam0, theta0 = 1.0, 0.003
    # Best at λ multipliers (1/3, √3) and θ multipliers (1/9, 1) for the two solved levels of
    # `fast` (warps (7, 5, 0)); the score falls off with the squared log-distance.
    target = (math.log(1 / 3), math.log(3**0.5), math.log(1 / 9), 0.0)
    calls = []

    def fake_evaluate(pairs, preset, data_term, order, lam, theta):
        assert len(lam) == len(theta) == 3 and lam[2] == lam[1] and theta[2] == theta[1]
        x = (math.log(lam[0] / lam0), math.log(lam[1] / lam0),
             math.log(theta[0] / theta0), math.log(theta[1] / theta0))
        calls.append(x)
        dice = 0.85 - 0.01 * sum((a - b) ** 2 for a, b in zip(x, target))
        return {"summary": {"dice_mean": dice, "hd_mean": 7.0, "fold_percent_max": 0.0},
                "dice": [dice]}

    monkeypatch.setattr(tune, "evaluate", fake_evaluate)
    record = {"configs": {}}
    best = tune.per_level_search(record, lambda: None, "fast-l2-o2", [None], lam0, theta0)
    assert best["levels"] == [0, 1]
    got = [math.log(m) for m in best["multipliers"]]
    assert all(abs(a - b) < 1e-4 for a, b in zip(got, target)), best["multipliers"]
    assert math.isclose(best["lam"][0], lam0 / 3, rel_tol=1e-5)
    assert best["dice_mean"] > best["start_dice_mean"]
    assert len(record["configs"]) == len(calls)  # every configuration evaluated once, cached


def test_per_level_search_rejects_folding_settings(monkeypatch):
    tune = _tuner()

    def fake_evaluate(pairs, preset, data_term, order, lam, theta):
        folds = 0.01 if lam[0] < 1.0 else 0.0  # smaller λ scores higher but folds
        return {"summary": {"dice_mean": 0.9 - lam[0] / 100, "hd_mean": 7.0,
                            "fold_percent_max": folds}, "dice": []}

    monkeypatch.setattr(tune, "evaluate", fake_evaluate)
    best = tune.per_level_search({"configs": {}}, lambda: None, "fast-l2-o2", [None], 1.0, 0.003)
    assert best["lam"][0] >= 1.0
