"""The presets carry the values that the tuning record selected."""

import json
import math
from pathlib import Path

import pytest

from nadmm_torch.config import TUNED, preset_config

RECORD = Path(__file__).resolve().parents[1] / "benchmarks" / "records" / "tune_nadmm.json"


def _close(a, b) -> bool:
    def seq(x):
        return list(x) if isinstance(x, (list, tuple)) else [x]

    a, b = seq(a), seq(b)
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b))


def test_presets_match_the_tuning_record():
    record = json.loads(RECORD.read_text())
    best = {**record["best"], **record.get("best_per_level", {})}  # per-level where searched
    assert best, "empty tuning record"
    for key, sel in best.items():
        preset, term, order = key.split("-")
        lam, theta = TUNED[(preset, term, int(order[1:]))]
        assert _close(lam, sel["lam"]), key
        assert _close(theta, sel["theta"]), key


@pytest.mark.parametrize("preset", ["fast", "accurate", "paper"])
def test_preset_config_uses_tuned_values_and_overrides(preset):
    # TUNED holds λ in intensity units: lam_scaling="none" takes it as it is (the default,
    # "gradient", converts it: tests/test_normalise.py).
    cfg = preset_config(preset, "l1", 3, lam_scaling="none", theta_scaling="none")
    assert (cfg.lam, cfg.theta) == TUNED[(preset, "l1", 3)]
    assert preset_config(preset, "l2", 2, lam=5.0).lam == 5.0
    nearest = preset_config(preset, "l2", 5, lam_scaling="none")
    assert nearest.lam == TUNED[(preset, "l2", 3)][0]  # nearest order


def test_per_level_tuned_values_follow_an_overridden_pyramid():
    lam, theta = TUNED[("fast", "l2", 2)]
    assert isinstance(lam, tuple) and len(lam) == 3  # per level, coarse → fine
    two = preset_config("fast", "l2", 2, levels=2, iterations=(5, 5), warps=(5, 5),
                        lam_scaling="none", theta_scaling="none")
    assert two.lam == lam[1:] and two.theta == theta[1:]  # the finest two resolutions
    four = preset_config("fast", "l2", 2, levels=4, iterations=5, warps=(5, 5, 5, 0),
                         lam_scaling="none", theta_scaling="none")
    assert four.lam == (lam[0], *lam) and four.theta == (theta[0], *theta)
    given = preset_config("fast", "l2", 2, levels=2, iterations=5, warps=5, lam=0.5,
                          theta_scaling="none")
    assert given.lam == 0.5 and given.theta == theta[1:]
