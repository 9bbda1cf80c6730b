"""The presets carry the values that the tuning record selected."""

import json
import math
from pathlib import Path

import pytest

from nadmm_torch.presets import TUNED, preset_config

RECORD = Path(__file__).resolve().parents[1] / "benchmarks" / "records" / "tune_nadmm.json"


def test_presets_match_the_tuning_record():
    best = json.loads(RECORD.read_text())["best"]
    assert best, "empty tuning record"
    for key, sel in best.items():
        preset, term, order = key.split("-")
        lam, theta = TUNED[(preset, term, int(order[1:]))]
        assert math.isclose(lam, sel["lam"], rel_tol=1e-9), key
        assert math.isclose(theta, sel["theta"], rel_tol=1e-9), key


@pytest.mark.parametrize("preset", ["fast", "accurate", "paper"])
def test_preset_config_uses_tuned_values_and_overrides(preset):
    cfg = preset_config(preset, "l1", 3)
    assert (cfg.lam, cfg.theta) == TUNED[(preset, "l1", 3)]
    assert preset_config(preset, "l2", 2, lam=5.0).lam == 5.0
    assert preset_config(preset, "l2", 5).lam == TUNED[(preset, "l2", 3)][0]  # nearest order
