"""Helpers shared by the example scripts: arguments, the ACDC split, Lightning training on
tuning pairs, evaluation on the report split with the benchmark protocol, tables and JSON.

Every example trains on (a seeded subset of) the **tuning** split only and evaluates on the
**report** split with :func:`nadmm_torch.data.acdc.evaluate_pair`, so its numbers are
comparable with ``benchmarks/acdc.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from nadmm_torch.data.acdc import (
    ACDCPair,
    evaluate_pair,
    load_pair,
    read_acdc_pairs,
    split,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "acdc"
RESULTS = REPO / "examples" / "results"

Predictor = Callable[[ACDCPair], Tensor]


def add_common_args(
    ap: argparse.ArgumentParser, *, train_pairs: int, epochs: int, json_name: str
) -> None:
    """Flags every example has: data, sizes of the run, seed, output, threads."""
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="ACDC folder with pairs.csv")
    ap.add_argument("--train-pairs", type=int, default=train_pairs,
                    help="tuning pairs used for training (seeded subset of the 60)")
    ap.add_argument("--epochs", type=int, default=epochs, help="passes over the training pairs")
    ap.add_argument("--report-pairs", type=int, default=20,
                    help="report pairs evaluated (default: all 20)")
    ap.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    ap.add_argument("--clip", type=float, default=None,
                    help="clip the gradient norm at this value (default: no clipping)")
    ap.add_argument("--val-pairs", type=int, default=0,
                    help="tuning pairs held out for validation after every epoch; the weights "
                    "of the best validation Dice (the untrained start included) are kept "
                    "(default 0: no validation, the last epoch's weights)")
    ap.add_argument("--patience", type=int, default=None,
                    help="with --val-pairs: stop after this many epochs without a better "
                    "validation Dice")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    # The README's recorded results were run with the paper's schedule (then called "fast").
    ap.add_argument("--preset", default="paper",
                    help="solver preset of the NADMM layer (default: %(default)s)")
    ap.add_argument("--json", default=str(RESULTS / json_name), help="output JSON")


def setup(args: argparse.Namespace) -> None:
    """Threads and seeds (Python, NumPy, torch) for a reproducible CPU run."""
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    from nadmm_torch.lightning import seed_everything

    seed_everything(args.seed)


def split_ids(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``(training ids ⊂ tuning split, report ids)``; the report split is never trained on, and
    the validation pairs (:func:`validation_ids`) are not drawn for training."""
    tune, report = split(read_acdc_pairs(args.data))
    held_out = set(validation_ids(args))
    pool = [p for p in tune if p not in held_out]
    n = min(args.train_pairs, len(pool))
    train = sorted(random.Random(f"examples-{args.seed}").sample(pool, n))
    assert not set(train) & set(report)
    return train, report[: args.report_pairs]


def validation_ids(args: argparse.Namespace) -> list[str]:
    """``--val-pairs`` tuning pairs (seeded), held out from training; none by default."""
    if not getattr(args, "val_pairs", 0):
        return []
    tune, _ = split(read_acdc_pairs(args.data))
    n = min(args.val_pairs, len(tune) - 1)
    return sorted(random.Random(f"examples-val-{args.seed}").sample(tune, n))


def train_loader(args: argparse.Namespace, ids: Sequence[str], augment: bool = True):
    """DataLoader of tuning pairs as TorchIO subjects (batch 1: slice counts differ)."""
    from torch.utils.data import DataLoader

    from nadmm_torch.data.pairs import collate_pairs
    from nadmm_torch.data.torchio_acdc import acdc_subjects_dataset, pair_augmentation

    transform = pair_augmentation(intensity=True, spatial=False) if augment else None
    ds = acdc_subjects_dataset(args.data, list(ids), transform=transform)
    g = torch.Generator().manual_seed(args.seed)
    return DataLoader(ds, batch_size=1, shuffle=True, collate_fn=collate_pairs, generator=g)


def registration_module(
    model: nn.Module,
    args: argparse.Namespace,
    *,
    similarity_weight: float = 1.0,
    smoothness_weight: float = 0.0,
    cls: type | None = None,
):
    """The examples' training objective around ``model``: local NCC with a 3×9×9 window (thick
    5–10 mm slices: a small window along z) + ``args.dice_weight`` × Dice on warped labels
    (+ smoothness), Adam at ``args.lr``. ``cls``: a ``RegistrationLightningModule`` subclass."""
    from nadmm_torch.lightning import RegistrationLightningModule

    return (cls or RegistrationLightningModule)(
        model,
        similarity="ncc",
        ncc_window=(3, 9, 9),
        similarity_weight=similarity_weight,
        dice_weight=args.dice_weight,
        smoothness_weight=smoothness_weight,
        lr=args.lr,
    )


def fit(
    module, loader, epochs: int, clip: float | None = None, val_loader=None,
    patience: int | None = None,
) -> dict:
    """Train a ``RegistrationLightningModule`` on CPU (gradient norm clipped at ``clip``
    where given); returns the last epoch's logged metrics and the wall time.

    With ``val_loader``: validation Dice before training and after every epoch; the weights of
    the best one are restored at the end (so training never returns worse than its start on
    the validation pairs), and with ``patience`` training stops after that many epochs without
    improvement over the best so far, the untrained start included. The returned dict then
    also holds ``validation`` (history, best epoch).
    """

    def trainer(**kw):
        return pl.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, deterministic=True,
            log_every_n_steps=1, num_sanity_val_steps=0, **kw,
        )  # fmt: skip

    callbacks, best = [], None
    if val_loader is not None:
        start = trainer().validate(module, val_loader, verbose=False)[0][VAL_METRIC]
        best = KeepBest(VAL_METRIC, start, module)
        callbacks.append(best)
        if patience is not None:
            stopper = pl.callbacks.EarlyStopping(VAL_METRIC, patience=patience, mode="max")
            stopper.best_score = torch.tensor(float(start))  # count from the untrained score
            callbacks.append(stopper)
    fitter = trainer(max_epochs=epochs, gradient_clip_val=clip, callbacks=callbacks)
    t0 = time.perf_counter()
    fitter.fit(module, loader, val_dataloaders=val_loader)
    seconds = time.perf_counter() - t0
    logged = {k: float(v) for k, v in fitter.callback_metrics.items() if v.numel() == 1}
    info = {"seconds": seconds, "last_epoch": logged, "steps": int(fitter.global_step)}
    if best is not None:
        module.load_state_dict(best.state)
        info["validation"] = {"metric": VAL_METRIC, "history": best.history,
                              "best_epoch": best.epoch, "best": best.score,
                              "epochs_run": fitter.current_epoch}
    return info


VAL_METRIC = "val/dice"


class KeepBest(pl.Callback):
    """Keeps a copy of the weights with the best ``monitor`` (higher is better), starting from
    the untrained ``module`` scored ``score`` (epoch 0)."""

    def __init__(self, monitor: str, score: float, module: nn.Module) -> None:
        self.monitor, self.score, self.epoch = monitor, float(score), 0
        self.state = copy.deepcopy(module.state_dict())
        self.history = [float(score)]

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        value = float(trainer.callback_metrics[self.monitor])
        self.history.append(value)
        if value > self.score:
            self.score, self.epoch = value, trainer.current_epoch + 1
            self.state = copy.deepcopy(module.state_dict())


def train(module, args: argparse.Namespace, train_ids: Sequence[str]) -> dict:
    """:func:`fit` on the training pairs, validating on :func:`validation_ids` where asked."""
    val = validation_ids(args)
    return fit(
        module, train_loader(args, train_ids), args.epochs, clip=args.clip,
        val_loader=train_loader(args, val, augment=False) if val else None,
        patience=args.patience,
    )  # fmt: skip


def evaluate(
    predictors: dict[str, Predictor], data: str, ids: Sequence[str]
) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Register each report pair with each predictor (no gradients) and score it.

    Returns ``(records per method, summary per method)``; each record holds the
    :func:`evaluate_pair` fields, ``patient`` and ``seconds`` (registration time only).
    """
    records: dict[str, list[dict]] = {name: [] for name in predictors}
    for pid in ids:
        pair = load_pair(data, pid)
        for name, fn in predictors.items():
            t0 = time.perf_counter()
            # no_grad, not inference_mode: the solver's caches must stay usable by autograd.
            with torch.no_grad():
                d = fn(pair)
            sec = time.perf_counter() - t0
            rec = {"patient": pid, "group": pair.group, **evaluate_pair(pair, d), "seconds": sec}
            records[name].append(rec)
    summaries = {name: summarize(recs) for name, recs in records.items()}
    return records, summaries


def unregistered(pair: ACDCPair) -> Tensor:
    """Identity displacement (the protocol's 'before' row)."""
    return pair.fixed.new_zeros(1, 3, *pair.fixed.shape[2:])


def markdown_table(summaries: dict[str, dict]) -> str:
    """One row per method: Dice mean ± sd, per structure, HD, fold %, seconds per pair."""
    lines = [
        "| method | Dice | RV | Myo | LV | HD (mm) | fold % | s / pair |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: float, spec: str) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    for name, s in summaries.items():
        lines.append(
            f"| {name} | {f(s['dice_mean'], '.3f')} ± {f(s['dice_sd'], '.3f')} | "
            f"{f(s['dice_rv'], '.3f')} | {f(s['dice_myo'], '.3f')} | {f(s['dice_lv'], '.3f')} | "
            f"{f(s['hd_mean'], '.2f')} | {f(s['fold_percent_mean'], '.4f')} | "
            f"{f(s['seconds_mean'], '.2f')} |"
        )
    return "\n".join(lines)


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: str | Path, payload: dict, args: argparse.Namespace) -> None:
    """Write results plus the run's settings and hardware (atomic replace)."""
    meta = {
        "args": {k: v for k, v in vars(args).items()},
        "hardware": f"CPU ({platform.machine()}), {torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe({"meta": meta, **payload}), indent=1) + "\n")
    os.replace(tmp, path)


def load_voxelmorph(path: str | Path, report_ids: Sequence[str]) -> tuple[nn.Module, list[str]]:
    """The 3D VoxelMorph saved by ``voxelmorph_refine.py --save`` (the package's or MONAI's),
    and the IDs it was trained on; weights trained on any report pair are refused."""
    from nadmm_torch.networks import MonaiNetwork, VoxelMorph

    ck = torch.load(path, map_location="cpu")
    steps = ck.get("integration_steps", 0)
    if ck.get("network", "own") == "monai":
        from monai.networks.nets import VoxelMorph as MonaiVoxelMorph

        net = MonaiNetwork(MonaiVoxelMorph(spatial_dims=3, integration_steps=steps))
    else:
        net = VoxelMorph(ndim=3, integration_steps=steps)
    net.load_state_dict(ck["state_dict"])
    train_ids = list(ck.get("train_ids", []))
    overlap = sorted(set(train_ids) & set(report_ids))
    assert not overlap, f"{path}: the weights were trained on report pairs {overlap}"
    return net, train_ids


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
