"""Self-tuning (nadmm_torch.tuning): the fitting loop on a known optimum, and real tuning."""

import json
import math

import pytest
import torch
from torch import nn

import nadmm_torch as nt
from nadmm_torch.data.sample import load_sample
from nadmm_torch.tuning import TunePair, fit, load_settings, tune


class _Quadratic(nn.Module):
    def __init__(self, start: float) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([start]))


def _quadratic_loss(model, target):
    return (model.x - target).pow(2).sum()


def test_fit_finds_a_known_optimum_and_keeps_the_best():
    model = _Quadratic(0.0)
    items = [3.0, 3.0, 3.0]  # each item's loss has its minimum at 3

    def score(m, t):
        return -float(_quadratic_loss(m, t).detach())

    history, best = fit(model, items, [3.0], _quadratic_loss, score, epochs=60, lr=0.1,
                        patience=None, progress=False)
    assert abs(float(model.x) - 3.0) < 0.05
    assert history[best]["val_score"] == max(h["val_score"] for h in history)


def test_fit_never_leaves_a_worse_state_than_the_start():
    model = _Quadratic(3.0)  # already optimal: any step can only make it worse

    def score(m, t):
        return -float(_quadratic_loss(m, t).detach())

    history, best = fit(model, [2.0], [3.0], _quadratic_loss, score, epochs=10, lr=0.5,
                        patience=2, progress=False)
    assert best == 0 and float(model.x) == 3.0
    assert len(history) == 1 + 2  # the start and two epochs without improvement: early stop


def _slices(n=3):
    s = load_sample()
    out = []
    for z in range(1, 1 + n):
        crop = (slice(None), slice(None), z, slice(32, 96), slice(32, 96))
        out.append(TunePair(s.fixed[crop], s.moving[crop], (1.5, 1.5), s.fixed_labels[crop],
                            s.moving_labels[crop], id=f"z{z}"))
    return out


def test_tune_improves_a_bad_start_and_saves_loadable_settings(tmp_path):
    torch.manual_seed(0)
    pairs = _slices(4)
    result = tune(pairs, lam=0.003, warps=(4, 3, 0), val_pairs=1, epochs=2, lr=0.4,
                  progress=False, scan=False)
    assert result.val_best > result.val_start + 0.02
    path = result.save(tmp_path / "tuned.json")
    kwargs = load_settings(path)
    assert kwargs["preset"] == "fast" and len(kwargs["lam"]) == 3
    p = pairs[0]
    d_file = nt.register(p.fixed, p.moving, spacing=p.spacing, **kwargs)
    model = nt.NADMMRegistration("fast", lam=kwargs["lam"], theta=kwargs["theta"],
                                 warps=(4, 3, 0))
    torch.testing.assert_close(d_file, model(p.fixed, p.moving, spacing=p.spacing))
    assert json.loads(path.read_text())["tuning"]["best_epoch"] == result.best_epoch


def test_tune_without_labels_runs_on_ncc():
    pairs = [TunePair(p.fixed, p.moving, p.spacing) for p in _slices(2)]
    result = tune(pairs, warps=(2, 2, 0), val_pairs=0, epochs=1, lr=0.1, progress=False)
    assert len(result.history) == 2 and result.val_start < 0  # −loss


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(pairs=[]), "pairs"), (dict(pairs=[1]), "pairs\\[0\\]"),
     (dict(learnable="momentum"), "learnable"), (dict(val_pairs=5), "val_pairs")],
)
def test_tune_rejects_bad_input(kwargs, match):
    args = dict(pairs=_slices(2))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        tune(args.pop("pairs"), progress=False, **args)


def test_load_settings_rejects_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"preset": "fast"}')
    with pytest.raises(ValueError, match="format"):
        load_settings(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_settings(tmp_path / "missing.json")


def test_tune_refuses_pairs_on_two_devices():
    a, b = _slices(2)
    b = TunePair(b.fixed.to("meta"), b.moving.to("meta"), b.spacing)
    with pytest.raises(ValueError, match=r"^pairs\[1\]\.fixed: on meta, pairs\[0\]\.fixed on cpu"):
        tune([a, b], progress=False)


def test_scan_leaves_the_model_at_the_best_multipliers_and_keeps_the_start_on_ties():
    from nadmm_torch.tuning import _scan

    model = nt.NADMMRegistration("fast", learnable=("lambda", "theta"))
    lam0, theta0 = model.log_lam.detach().clone(), model.log_theta.detach().clone()
    grid = {"lam": (1 / 3, 1.0, 3.0), "theta": (1.0, 10.0, 100.0)}

    def score(m, _pair):  # best at λ ×3, θ ×10 (read back from the parameters)
        a = float((m.log_lam - lam0).mean()) - math.log(3.0)
        b = float((m.log_theta - theta0).mean()) - math.log(10.0)
        return -(a * a + b * b)

    rows = _scan(model, [None], score, grid)
    assert len(rows) == 9 and rows[0]["lam_mult"] == rows[0]["theta_mult"] == 1.0
    torch.testing.assert_close(model.log_lam.detach(), lam0 + math.log(3.0))
    torch.testing.assert_close(model.log_theta.detach(), theta0 + math.log(10.0))
    model = nt.NADMMRegistration("fast", learnable=("lambda", "theta"))
    _scan(model, [None], lambda m, p: 0.5, grid)  # flat: the given settings stay
    torch.testing.assert_close(model.log_lam.detach(), lam0)
    torch.testing.assert_close(model.log_theta.detach(), theta0)


def test_pattern_search_walks_to_a_far_optimum_and_stops_at_a_flat_start():
    from nadmm_torch.tuning import SCAN_FACTOR, _scan

    model = nt.NADMMRegistration("fast", learnable=("lambda", "theta"))
    lam0, theta0 = model.log_lam.detach().clone(), model.log_theta.detach().clone()
    f = math.log(SCAN_FACTOR)

    def score(m, _pair):  # best at λ ×3, θ ×27: three moves away (one diagonal)
        a = float((m.log_lam - lam0).mean()) / f - 1
        b = float((m.log_theta - theta0).mean()) / f - 3
        return -(a * a + b * b)

    rows = _scan(model, [None], score, None)
    torch.testing.assert_close(model.log_lam.detach(), lam0 + f)
    torch.testing.assert_close(model.log_theta.detach(), theta0 + 3 * f)
    assert rows[0]["lam_mult"] == rows[0]["theta_mult"] == 1.0 and len(rows) <= 9 + 3 * 5
    logs = {(round(math.log(r["lam_mult"]) / f), round(math.log(r["theta_mult"]) / f))
            for r in rows}
    assert len(logs) == len(rows)  # no lattice point scored twice
    model = nt.NADMMRegistration("fast", learnable=("lambda", "theta"))
    assert len(_scan(model, [None], lambda m, p: 0.5, None)) == 9  # the start and 8 neighbours
    torch.testing.assert_close(model.log_lam.detach(), lam0)


def test_tune_scans_only_what_it_learns_and_starts_descent_at_the_scan_best():
    pairs = _slices(3)
    result = tune(pairs, lam=0.03, warps=(4, 3, 0), val_pairs=1, epochs=1, lr=0.1,
                  learnable="lambda", progress=False)
    assert {r["theta_mult"] for r in result.scan} == {1.0} and len(result.scan) >= 3
    best = max(result.scan, key=lambda r: r["score"])
    assert best["score"] > result.scan[0]["score"] + 0.05  # λ = 0.03 is a bad start
    assert best["lam_mult"] < 1  # descent starts there: one epoch at lr 0.1 moves log λ little
    start = 0.03 * best["lam_mult"]
    assert all(abs(math.log(v / start)) < 0.2 for v in result.settings["overrides"]["lam"][:2])


@pytest.mark.parametrize("scan", [{"mu": (1.0,)}, {"theta": (0.0, 1.0)}, {"lam": ()}, "yes"])
def test_tune_rejects_a_bad_scan(scan):
    with pytest.raises(ValueError, match="^scan"):
        tune(_slices(2), scan=scan, progress=False)
