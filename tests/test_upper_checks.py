"""The checks the upper layers share (device names, per-sample spacings, label lists) and the
evaluator hook of the Lightning module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nadmm_torch.checks import check_int_list, check_spacing_rows, resolve_device
from nadmm_torch.losses import MSELoss, SmoothnessLoss

from .synthetic import small_nadmm, synthetic_dataset


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="device: expected auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(TypeError, match="device: expected a device name"):
        resolve_device(0.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_spacing_rows_from_every_form():
    two = [(2.0, 1.0), (2.0, 1.0)]
    assert check_spacing_rows(None, 2, 2) == [None, None]
    assert check_spacing_rows((2, 1), 2, 2) == two
    assert check_spacing_rows(torch.tensor([2.0, 1.0]), 2, 2) == two
    assert check_spacing_rows(torch.tensor([[2.0, 1.0], [3.0, 1.0]]), 2, 2) == [
        (2.0, 1.0), (3.0, 1.0)
    ]
    assert check_spacing_rows(np.array([[2.0, 1.0]]), 2, 2) == two  # one row for all
    assert check_spacing_rows([[2, 1], [2, 1]], 2, 2) == two
    with pytest.raises(ValueError, match="spacing: expected 2 numbers or one row per batch"):
        check_spacing_rows(torch.ones(3, 2), 2, 2)
    with pytest.raises(ValueError, match="spacing: expected positive finite values"):
        check_spacing_rows([[1.0, 1.0], [1.0, -1.0]], 2, 2)
    with pytest.raises(ValueError, match="spacing: expected 2 numbers"):
        check_spacing_rows((1.0, 1.0, 1.0), 2, 2)


def test_int_list():
    assert check_int_list((1, np.int64(2)), "labels") == (1, 2)
    assert check_int_list(np.array([3, 4]), "labels") == (3, 4)
    for bad in ("123", 1, (1.0,), (True,)):
        with pytest.raises(TypeError, match="labels: expected a sequence of integers"):
            check_int_list(bad, "labels")
    with pytest.raises(ValueError, match="labels: expected at least one value"):
        check_int_list([], "labels")


def test_losses_refuse_wrong_types_with_type_errors():
    with pytest.raises(TypeError, match="warped: expected a torch.Tensor"):
        MSELoss()(np.zeros((1, 1, 4, 4)), torch.zeros(1, 1, 4, 4))
    with pytest.raises(TypeError, match="fixed: expected a floating dtype"):
        MSELoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="displacement: expected a floating dtype"):
        SmoothnessLoss()(torch.zeros(1, 2, 4, 4, dtype=torch.long))
    # a (B, ndim) spacing table as collate_pairs makes it, one row per pair
    ramp = torch.zeros(2, 2, 8, 8)
    ramp[:, 0] = 0.1 * torch.arange(8.0)
    per_pair = SmoothnessLoss()(ramp, torch.tensor([[2.0, 1.0], [2.0, 1.0]], dtype=torch.float64))
    assert float(per_pair) == pytest.approx(0.01)


def test_lightning_evaluator_gets_each_pair():
    pytest.importorskip("pytorch_lightning")
    from nadmm_torch.data.pairs import collate_pairs
    from nadmm_torch.lightning import RegistrationLightningModule

    seen = []

    def evaluator(item: dict, displacement: torch.Tensor) -> dict:
        seen.append(item)
        return {"max_abs": float(displacement.abs().max()), "n": int(item["fixed"].numel())}

    batch = collate_pairs([synthetic_dataset(2, spacing=(2.0, 1.0))[i] for i in range(2)])
    module = RegistrationLightningModule(small_nadmm(), evaluate=evaluator, labels=(1, 2))
    with torch.no_grad():
        records = module.predict_step(batch, 0)
    assert [r["pair_id"] for r in records] == ["pair00", "pair01"]
    assert all(r["n"] == 32 * 32 and r["max_abs"] > 0 for r in records)
    assert all(r["displacement"].shape == (1, 2, 32, 32) for r in records)
    for i, item in enumerate(seen):
        assert item["spacing"] == (2.0, 1.0) and item["pair_id"] == f"pair0{i}"
        assert torch.equal(item["moving_labels"], batch["moving_labels"][i : i + 1])
    with pytest.raises(ValueError, match="acdc_evaluator"):
        RegistrationLightningModule(small_nadmm(), evaluate="acdc")
