"""The solver's settings: one validating constructor, settings files, a read-only config, and
exactly the configured λ, θ in the solve."""

import pytest
import torch

import nadmm_torch as nt
from nadmm_torch import config as config_module
from nadmm_torch.config import PRESETS, TUNED, SolverConfig
from nadmm_torch.data.sample import load_sample
from nadmm_torch.tuning import TuneResult, load_settings


def crop():
    s = load_sample()
    return (s.fixed[:, :, 3, 40:88, 40:88].contiguous(),
            s.moving[:, :, 3, 40:88, 40:88].contiguous(), s.spacing[1:])


def test_from_preset_builds_the_preset_and_the_old_names_are_aliases():
    cfg = SolverConfig.from_preset("paper", "l1", 3, tol_warp=0.1, lam_scaling="none",
                                   theta_scaling="none")
    assert (cfg.data_term, cfg.order, cfg.tol_warp) == ("l1", 3, 0.1)
    assert (cfg.lam, cfg.theta) == TUNED[("paper", "l1", 3)]
    assert cfg.iterations == PRESETS["paper"]["iterations"]
    assert nt.preset_config("paper", "l1", 3, tol_warp=0.1, lam_scaling="none",
                            theta_scaling="none") == cfg
    assert SolverConfig.from_preset() == SolverConfig.from_preset("fast", "l2", 2)
    assert SolverConfig.from_preset(cfg) is cfg  # a ready config passes through


@pytest.mark.parametrize("kwargs,error,match", [
    ({"lam": "big"}, TypeError, r"^lam: expected a positive finite number, or one per level, "
                                r"got 'big'"),
    ({"lam": -1.0}, ValueError, r"^lam: expected a positive finite number"),
    ({"levels": 2.0}, TypeError, r"^levels: expected an integer >= 1, got 2.0"),
    ({"levels": 0}, ValueError, r"^levels: expected an integer >= 1, got 0"),
    ({"safeguard": "yes"}, TypeError, r"^safeguard: expected True or False, got 'yes'"),
    ({"boundary": 3}, TypeError, r"^boundary: expected one of \['neumann', 'periodic'\], got 3"),
    ({"frozen_axes": 1}, TypeError, r"^frozen_axes: expected a tuple of axis indices"),
    ({"data_term": 2}, TypeError, r"^data_term: expected one of \['l2', 'l1'\], got 2"),
    ({"order": "2"}, TypeError, r"^order: expected an integer >= 1, got '2'"),
])
def test_wrong_types_and_values_are_told_apart(kwargs, error, match):
    with pytest.raises(error, match=match):
        SolverConfig.from_preset(**kwargs)


def test_a_ready_config_takes_no_more_settings():
    cfg = SolverConfig.from_preset("paper")
    with pytest.raises(ValueError, match=r"^preset: a SolverConfig is complete"):
        SolverConfig.from_preset(cfg, lam=2.0)
    f, m, h = crop()
    torch.testing.assert_close(nt.register(f, m, spacing=h, preset=cfg),
                               nt.register(f, m, spacing=h, preset="paper"), rtol=0, atol=0)


def test_one_validation_per_register_call(monkeypatch):
    calls = []
    original = config_module._check_options

    def counting(options):
        calls.append(dict(options))
        return original(options)

    monkeypatch.setattr(config_module, "_check_options", counting)
    f, m, h = crop()
    nt.register(f, m, spacing=h, lam=0.5, iterations=2, warps=1)
    assert len(calls) == 1
    model = nt.NADMMRegistration(SolverConfig.from_preset(lam=0.5, iterations=2, warps=1))
    model(f, m, spacing=h)
    assert len(calls) == 2  # the config's own construction, none by the module


def _settings_file(tmp_path):
    settings = dict(
        format=config_module.SETTINGS_FORMAT, version=config_module.SETTINGS_VERSION,
        preset="paper", data_term="l1", order=3,
        overrides=dict(lam=[0.5, 0.25, 0.125], theta=[0.01, 0.02, 0.03], warps=[2, 2, 1]),
        learned=["lambda", "theta"],
    )
    return TuneResult(settings=settings).save(tmp_path / "tuned.json")


def test_settings_files_load_as_presets_and_explicit_settings_win(tmp_path):
    path = _settings_file(tmp_path)
    cfg = SolverConfig.from_preset(path)
    assert (cfg.data_term, cfg.order) == ("l1", 3)
    assert cfg.lam == (0.5, 0.25, 0.125) and cfg.theta == (0.01, 0.02, 0.03)
    assert cfg.warps == (2, 2, 1) and cfg.iterations == PRESETS["paper"]["iterations"]
    assert SolverConfig.from_preset(str(path)) == cfg
    assert load_settings(path) == dict(preset="paper", data_term="l1", order=3,
                                       lam=(0.5, 0.25, 0.125), theta=(0.01, 0.02, 0.03),
                                       warps=(2, 2, 1))
    mine = SolverConfig.from_preset(path, data_term="l2", warps=1, lam=None)
    assert (mine.data_term, mine.order, mine.warps) == ("l2", 3, (1, 1, 1))
    assert mine.lam == cfg.lam  # None: the file's value
    f, m, h = crop()
    explicit = nt.register(f, m, spacing=h, **load_settings(path))
    assert torch.equal(nt.register(f, m, spacing=h, preset=str(path)), explicit)
    assert torch.equal(nt.NADMMRegistration(path)(f, m, spacing=h), explicit)
    assert nt.NADMMRegistration(str(path), warps=1).config.warps == (1, 1, 1)


def test_bad_settings_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"settings file not found"):
        SolverConfig.from_preset(tmp_path / "missing.json")
    other = tmp_path / "other.json"
    other.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match=r"expected format 'nadmm-torch-settings'"):
        nt.register(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), preset=str(other))
    with pytest.raises(ValueError, match=r"^preset: expected one of \['accurate', 'balanced', "
                                         r"'fast', 'paper'\], got 'turbo'"):
        SolverConfig.from_preset("turbo")


def test_the_modules_config_is_read_only():
    model = nt.NADMMRegistration("paper")
    with pytest.raises(AttributeError, match=r"^config: read-only"):
        model.config = SolverConfig.from_preset("fast")
    with pytest.raises(AttributeError):  # frozen dataclass
        model.config.lam = 1.0
    assert model.config == SolverConfig.from_preset("paper")


def test_classical_float64_solve_gets_exactly_the_configured_values(monkeypatch):
    """λ, θ not learnable reach the ADMM solver as the configured numbers, in the input's
    dtype: no float32 round trip (0.1 is not a float32 number)."""
    import nadmm_torch.ops.solver as solver

    seen = []
    original = solver.nesterov_admm

    def spy(g, c, **kw):
        seen.append((kw["lam"], kw["theta"]))
        return original(g, c, **kw)

    monkeypatch.setattr(solver, "nesterov_admm", spy)
    f, m, h = crop()
    model = nt.NADMMRegistration("paper", lam=0.1, theta=(0.003, 0.002, 0.001), warps=1,
                                 theta_scaling="none")
    assert list(model.parameters()) == [] and list(model.buffers()) == []
    model(f.double(), m.double(), spacing=h)
    assert [(lam.dtype, float(lam)) for lam, _ in seen] == [(torch.float64, 0.1)] * 3
    assert [float(theta) for _, theta in seen] == [0.003, 0.002, 0.001]
    seen.clear()
    learned = nt.NADMMRegistration("paper", lam=0.1, learnable="lambda", warps=1,
                                   theta_scaling="none")
    learned(f.double(), m.double(), spacing=h)
    assert [float(theta) for _, theta in seen] == [0.001] * 3  # θ still exact
    assert all(lam.requires_grad for lam, _ in seen)


@pytest.mark.parametrize("data_term", ["l2", "l1"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_balanced_is_fast_plus_one_finest_warp(data_term, order):
    """``balanced`` keeps ``fast``'s λ/θ and coarse schedule and adds one full-resolution warp,
    so it solves the finest level that ``fast`` skips."""
    fast = SolverConfig.from_preset("fast", data_term=data_term, order=order)
    bal = SolverConfig.from_preset("balanced", data_term=data_term, order=order)
    assert (bal.lam, bal.theta) == (fast.lam, fast.theta)
    assert bal.warps == (7, 5, 1) and bal.iterations == (5, 5, 8)
    assert bal.warps[:2] == fast.warps[:2] and fast.warps[2] == 0


def test_balanced_solves_at_full_resolution():
    s = load_sample()
    f, m = s.fixed[:, :, 2:6, 32:96, 32:96], s.moving[:, :, 2:6, 32:96, 32:96]
    _, diag = nt.register(f, m, spacing=s.spacing, preset="balanced", return_diagnostics=True)
    assert diag.warps == [7, 5, 1] and diag.shapes[-1] == tuple(f.shape[2:])
