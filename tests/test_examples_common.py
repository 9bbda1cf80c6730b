"""The examples' training helper (``examples/common.py``): validation before and after every
epoch, the best weights kept, early stopping. Small synthetic 2D pairs, no data needed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from .synthetic import small_nadmm, synthetic_dataset

pl = pytest.importorskip("pytorch_lightning")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location("examples_common", EXAMPLES / "common.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(EXAMPLES))


def _loaders(n_train=4, n_val=2):
    from torch.utils.data import DataLoader

    from nadmm_torch.data.pairs import collate_pairs

    ds = synthetic_dataset(n_train + n_val)
    train = torch.utils.data.Subset(ds, range(n_train))
    val = torch.utils.data.Subset(ds, range(n_train, n_train + n_val))
    return (DataLoader(train, batch_size=2, collate_fn=collate_pairs),
            DataLoader(val, batch_size=2, collate_fn=collate_pairs))


def _module(lr: float):
    from nadmm_torch.lightning import RegistrationLightningModule, seed_everything

    seed_everything(0)
    # λ far too small: the data term is nearly ignored; learning raises it (and val Dice).
    model = small_nadmm(learnable={"lambda", "theta"}, lam=0.003)
    return RegistrationLightningModule(model, similarity="mse", labels=(1, 2), lr=lr)


def test_fit_validates_every_epoch_and_keeps_the_best(common):
    train, val = _loaders()
    module = _module(lr=0.3)
    info = common.fit(module, train, epochs=3, val_loader=val)
    v = info["validation"]
    assert len(v["history"]) == 4 and v["epochs_run"] == 3  # before training + 3 epochs
    assert v["best"] == max(v["history"]) > v["history"][0]
    assert v["best_epoch"] == v["history"].index(v["best"]) > 0
    # the module holds the best epoch's weights: validating it again gives the best score
    again = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                       enable_model_summary=False).validate(module, val, verbose=False)
    assert again[0]["val/dice"] == pytest.approx(v["best"], abs=1e-6)


def test_keep_best_restores_the_start_when_training_only_hurts(common):
    module = _module(lr=0.3)
    start = {k: t.clone() for k, t in module.state_dict().items()}
    keep = common.KeepBest("val/dice", 0.8, module)
    trainer = SimpleNamespace(callback_metrics={}, current_epoch=0)
    for epoch, score in enumerate([0.7, 0.75]):
        with torch.no_grad():
            module.model.log_lam.add_(1.0)  # the weights move, the score does not recover
        trainer.callback_metrics["val/dice"] = torch.tensor(score)
        trainer.current_epoch = epoch
        keep.on_validation_end(trainer, module)
    assert keep.epoch == 0 and keep.history == pytest.approx([0.8, 0.7, 0.75])
    assert all(torch.equal(keep.state[k], start[k]) for k in start)


def test_early_stopping_with_patience(common):
    train, val = _loaders()
    info = common.fit(_module(lr=0.0), train, epochs=5, val_loader=val, patience=1)
    v = info["validation"]  # lr 0: nothing beats the start, so training stops after `patience`
    assert v["epochs_run"] == 1 and v["best_epoch"] == 0
    assert len(set(round(h, 6) for h in v["history"])) == 1


def test_validation_pairs_are_held_out_of_training(common):
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"
    if not (data / "pairs.csv").is_file():
        pytest.skip(f"ACDC data folder absent ({data})")
    args = SimpleNamespace(data=str(data), train_pairs=60, report_pairs=20, seed=0, val_pairs=8)
    train, report = common.split_ids(args)
    val = common.validation_ids(args)
    assert len(val) == 8 and len(train) == 52 and len(report) == 20
    assert not (set(val) & set(train)) and not (set(val) & set(report))
    assert common.validation_ids(SimpleNamespace(**{**vars(args), "val_pairs": 0})) == []
