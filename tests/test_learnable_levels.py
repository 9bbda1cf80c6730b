"""Learnable hyperparameters exist only for the pyramid levels that are solved."""

import torch

import nadmm_torch as nt
from nadmm_torch.module import solved_levels
from tests.synthetic import blobs


def test_a_level_without_warps_has_no_parameters_and_every_lambda_theta_is_reached():
    model = nt.NADMMRegistration("fast", learnable=True)  # warps (7, 5, 0)
    assert solved_levels(model.config) == [0, 1]
    assert all(p.shape[0] == 2 for p in model.parameters())
    f, m = blobs((32, 32), seed=1, dtype=torch.float32), blobs((32, 32), seed=2,
                                                               dtype=torch.float32)
    model(f, m).square().mean().backward()
    for name in ("log_lam", "log_theta"):
        assert bool((getattr(model, name).grad.abs() > 0).all()), name
    hp = model.hyperparameters(torch.float64)
    assert len(hp["lam"]) == 3 and not hp["lam"][2].requires_grad  # the config's value
    assert float(hp["lam"][2]) == model.config.per_level("lam")[2]
    assert hp["momentum"][2] is None and hp["step_scale"][2] is None
    full = nt.NADMMRegistration("paper", learnable=True)
    assert all(p.shape[0] == 3 for p in full.parameters())


def test_state_dicts_with_a_row_for_every_level_still_load():
    trained = nt.NADMMRegistration("fast", learnable=True)
    with torch.no_grad():
        trained.log_lam.add_(0.3)
    state = trained.state_dict()
    # the earlier layout: one row per level, the unsolved finest level's row included
    old = {k: (torch.cat([v, v[-1:]]) if k in ("log_lam", "log_theta", "momentum_logit",
                                                "log_step") else v) for k, v in state.items()}
    fresh = nt.NADMMRegistration("fast", learnable=True)
    fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh.log_lam, trained.log_lam)
    # older still: what was not learnable was stored as buffers of the config's values, with
    # a row for the unsolved level too; they are dropped (the config holds them)
    config_rows = nt.NADMMRegistration("fast", learnable="lambda").log_lam.detach()
    buffer = torch.cat([config_rows, torch.zeros(1, 1)])
    nt.NADMMRegistration("fast").load_state_dict({"log_lam": buffer}, strict=True)
