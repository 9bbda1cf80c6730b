"""PyTorch Lightning training and cohort registration.

* :class:`RegistrationLightningModule` trains any model that maps ``(fixed, moving, spacing)``
  to a displacement: :class:`~nadmm_torch.module.NADMMRegistration` with learnable settings,
  a network (:class:`~nadmm_torch.networks.VoxelMorph`), or a network refined by an NADMM
  layer (:class:`~nadmm_torch.networks.NetworkWithNADMM`). Loss = ``w_sim · similarity``
  (NCC or MSE of ``warp(moving, d)`` and ``fixed``) + ``w_dice · DiceLoss`` (warped one-hot
  labels, when the batch has labels) + ``w_smooth · SmoothnessLoss`` + ``w_fold ·
  JacobianFoldLoss``. Mean hard Dice and fold % are logged per epoch (train and val).
* :func:`register_cohort` registers a data set with ``Trainer.predict`` (any strategy, e.g.
  ``strategy="ddp"``, ``devices=N``) and writes one JSON per pair; Lightning's predict sampler
  does not repeat samples across ranks and every file is written atomically under the pair's
  id, so there are neither duplicates nor gaps.

Batches are dicts as :func:`nadmm_torch.data.pairs.collate_pairs` makes them:
``fixed``, ``moving`` ``(B, 1, *S)``; optional ``fixed_labels``, ``moving_labels``
``(B, 1, *S)`` int64; optional ``spacing`` ``(B, ndim)`` (array order, mm); ``pair_id``.

Importing this module imports ``pytorch_lightning`` (about 3 s); ``import nadmm_torch`` does
not (its ``RegistrationLightningModule`` attribute is resolved lazily).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .atomic import atomic_write
from .checks import check_int_list, check_spacing_rows
from .losses import DiceLoss, JacobianFoldLoss, MSELoss, NCCLoss, SmoothnessLoss, warp_onehot
from .metrics import dice as dice_score
from .metrics import fold_percent

# The unchecked warps: they run at every training step on tensors the data loader and the
# model made, where the public ones' value checks (finite) would synchronise with the device.
from .ops.warp import warp, warp_labels

Evaluator = Callable[[dict, Tensor], dict]

__all__ = [
    "RegistrationLightningModule",
    "CohortWriter",
    "register_cohort",
    "seed_everything",
]


def seed_everything(seed: int = 0, deterministic_algorithms: bool = False) -> int:
    """Seed Python, NumPy and torch (and data-loader workers) for a reproducible run.

    Wraps ``pl.seed_everything(seed, workers=True)``; with ``deterministic_algorithms``, also
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` (``warn_only`` because
    ``grid_sample``'s CUDA backward has no deterministic kernel). Pair it with
    ``Trainer(deterministic=True)``. Returns the seed.
    """
    pl.seed_everything(seed, workers=True)
    if deterministic_algorithms:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return seed


def _batch_item(batch: dict, i: int, spacing: tuple[float, ...] | None, pair_id: str) -> dict:
    """Pair ``i`` of a collated batch: its tensors ``(1, C, *S)``, spacing tuple and id."""
    item = {k: v[i : i + 1] for k, v in batch.items() if isinstance(v, Tensor) and k != "spacing"}
    return {**item, "spacing": spacing, "pair_id": pair_id}


class RegistrationLightningModule(pl.LightningModule):
    """Train / evaluate a registration model on batches of pairs.

    Args:
        model: ``model(fixed (B, 1, *S), moving (B, 1, *S), spacing)`` → ``(B, ndim, *S)``
            displacement in voxel units (pull-back).
        similarity: ``"ncc"``, ``"mse"`` or a module ``loss(warped, fixed)``.
        ncc_window: NCC box size (int or one per spatial axis).
        similarity_weight, dice_weight, smoothness_weight, fold_weight: loss weights; a term
            with weight 0 is not computed (Dice also needs labels in the batch).
        labels: label values scored by the logged Dice (and, with the background, the classes
            of the Dice loss: ``num_classes = max(labels) + 1``).
        lr: Adam learning rate (over the model's trainable parameters).
        weight_decay: Adam weight decay.
        evaluate: how :meth:`predict_step` scores a pair: ``"basic"`` (Dice per label, mean
            Dice, fold %) or an evaluator ``evaluate(item, displacement) -> dict`` of metrics,
            called per pair with ``item`` holding that pair's ``fixed``, ``moving`` (and
            labels, if batched) ``(1, C, *S)``, ``spacing`` (tuple or ``None``) and
            ``pair_id``, and ``displacement`` ``(1, ndim, *S)``; e.g.
            :func:`nadmm_torch.data.acdc.acdc_evaluator` (the ACDC protocol, adds Hausdorff
            distances). A module-level function keeps the module picklable.

    Logged (``self.log``): ``train/loss`` (step and epoch), ``train/sim``, ``train/dice_loss``,
    ``train/smooth``, ``train/fold_loss``, and per epoch ``train/dice``, ``train/fold_percent``
    (hard metrics, no gradient); in validation ``val/loss``, ``val/dice``, ``val/fold_percent``.
    """

    def __init__(
        self,
        model: nn.Module,
        similarity: str | nn.Module = "ncc",
        ncc_window: int | Sequence[int] = 9,
        similarity_weight: float = 1.0,
        dice_weight: float = 0.0,
        smoothness_weight: float = 0.0,
        fold_weight: float = 0.0,
        labels: Sequence[int] = (1, 2, 3),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        evaluate: str | Evaluator = "basic",
    ) -> None:
        super().__init__()
        self.model = model
        if isinstance(similarity, nn.Module):
            self.similarity = similarity
        elif similarity == "ncc":
            self.similarity = NCCLoss(ncc_window)
        elif similarity == "mse":
            self.similarity = MSELoss()
        else:
            raise ValueError(f"similarity: expected 'ncc', 'mse' or a module, got {similarity!r}")
        if not (evaluate == "basic" or callable(evaluate)):
            raise ValueError(
                "evaluate: expected 'basic' or a callable evaluate(item, displacement) -> dict "
                f"(e.g. nadmm_torch.data.acdc.acdc_evaluator), got {evaluate!r}"
            )
        self.labels = check_int_list(labels, "labels")
        if min(self.labels) < 1:
            raise ValueError(f"labels: expected positive label values, got {labels!r}")
        self.num_classes = max(self.labels) + 1
        self.dice_loss = DiceLoss(self.num_classes)
        self.smoothness = SmoothnessLoss()
        self.fold_loss = JacobianFoldLoss()
        self.weights = dict(
            sim=float(similarity_weight),
            dice=float(dice_weight),
            smooth=float(smoothness_weight),
            fold=float(fold_weight),
        )
        self.lr = lr
        self.weight_decay = weight_decay
        self.evaluate = evaluate
        # Modules are kept out of hparams (they are in the state dict).
        ignore = ["model"] + (["similarity"] if isinstance(similarity, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)

    # -- model ---------------------------------------------------------------------------------
    def forward(self, fixed: Tensor, moving: Tensor, spacing: Any = None) -> Tensor:
        """Displacement ``(B, ndim, *S)``; samples with different spacings run one by one
        (the NADMM layer takes one spacing per call)."""
        rows = check_spacing_rows(spacing, fixed.shape[0], fixed.dim() - 2)
        if all(r == rows[0] for r in rows):
            return self.model(fixed, moving, rows[0])
        return torch.cat(
            [self.model(fixed[i : i + 1], moving[i : i + 1], r) for i, r in enumerate(rows)]
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                "the model has no trainable parameters (e.g. NADMMRegistration(learnable=None))"
            )
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)

    # -- losses and metrics ----------------------------------------------------------------------
    def compute_losses(self, batch: dict, displacement: Tensor) -> dict[str, Tensor]:
        """The weighted terms and their sum ``loss`` (0-d tensors); zero-weight terms skipped."""
        fixed, moving = batch["fixed"], batch["moving"]
        d = displacement
        w = self.weights
        out: dict[str, Tensor] = {}
        if w["sim"]:
            out["sim"] = self.similarity(warp(moving.to(d.dtype), d), fixed.to(d.dtype))
        if w["dice"] and "moving_labels" in batch:
            soft = warp_onehot(batch["moving_labels"], d, self.num_classes)
            out["dice_loss"] = self.dice_loss(soft, batch["fixed_labels"])
        if w["smooth"]:
            out["smooth"] = self.smoothness(d, batch.get("spacing"))
        if w["fold"]:
            out["fold_loss"] = self.fold_loss(d)
        key = {"sim": "sim", "dice_loss": "dice", "smooth": "smooth", "fold_loss": "fold"}
        loss = sum((w[key[k]] * v for k, v in out.items()), d.new_zeros(()))
        out["loss"] = loss
        return out

    @torch.no_grad()
    def pair_metrics(self, batch: dict, displacement: Tensor) -> dict[str, Tensor]:
        """Hard metrics per pair: ``dice`` ``(B,)`` (mean over labels, NaN-skipping; absent
        without labels), ``dice_per_label`` ``(B, L)``, ``fold_percent`` ``(B,)``."""
        d = displacement.detach().float()
        out = {"fold_percent": fold_percent(d).double()}
        if "moving_labels" in batch:
            warped = warp_labels(batch["moving_labels"], d, num_classes=self.num_classes)
            per = dice_score(warped, batch["fixed_labels"], self.labels)
            out["dice_per_label"] = per
            out["dice"] = per.nanmean(dim=1)
        return out

    def _log_step(self, stage: str, batch: dict, d: Tensor, losses: dict) -> None:
        b = batch["fixed"].shape[0]
        for k, v in losses.items():
            on_step = stage == "train" and k == "loss"
            self.log(f"{stage}/{k}", v.detach(), on_step=on_step, on_epoch=True, batch_size=b,
                     sync_dist=True)
        m = self.pair_metrics(batch, d)
        if "dice" in m and not bool(m["dice"].isnan().all()):
            self.log(f"{stage}/dice", m["dice"].nanmean().float(), on_step=False, on_epoch=True,
                     batch_size=b, sync_dist=True)
        self.log(f"{stage}/fold_percent", m["fold_percent"].mean().float(), on_step=False,
                 on_epoch=True, batch_size=b, sync_dist=True)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        d = self(batch["fixed"], batch["moving"], batch.get("spacing"))
        losses = self.compute_losses(batch, d)
        self._log_step("train", batch, d, losses)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        d = self(batch["fixed"], batch["moving"], batch.get("spacing"))
        self._log_step("val", batch, d, self.compute_losses(batch, d))

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """Register the batch; one record per pair: ``pair_id``, the metrics of ``evaluate``
        (``"basic"``: ``dice``, ``dice_<label>``, ``fold_percent``; Python floats, NaN where
        undefined), ``rank``, and ``displacement`` (``(1, ndim, *S)`` CPU tensor).

        Use ``Trainer(inference_mode=False)`` if the same process trains NADMM afterwards (the
        solver's caches must not be created under inference mode)."""
        d = self(batch["fixed"], batch["moving"], batch.get("spacing"))
        b = d.shape[0]
        ids = [str(v) for v in batch.get("pair_id", [batch_idx * b + i for i in range(b)])]
        if self.evaluate == "basic":
            records = self._basic_records(batch, d, ids)
        else:
            rows = check_spacing_rows(batch.get("spacing"), b, d.dim() - 2)
            records = [
                {"pair_id": ids[i],
                 **self.evaluate(_batch_item(batch, i, rows[i], ids[i]), d[i : i + 1])}
                for i in range(b)
            ]  # fmt: skip
        for i, rec in enumerate(records):
            rec["rank"] = int(self.global_rank)
            rec["displacement"] = d[i : i + 1].detach().float().cpu()
        return records

    def _basic_records(self, batch: dict, d: Tensor, ids: list[str]) -> list[dict]:
        """``pair_id``, ``dice``, ``dice_<label>`` (with labels) and ``fold_percent`` per pair."""
        m = self.pair_metrics(batch, d)
        records = []
        for i, pair_id in enumerate(ids):
            rec: dict = {"pair_id": pair_id}
            if "dice" in m:
                rec["dice"] = float(m["dice"][i])
                for j, lab in enumerate(self.labels):
                    rec[f"dice_{lab}"] = float(m["dice_per_label"][i, j])
            rec["fold_percent"] = float(m["fold_percent"][i])
            records.append(rec)
        return records


# -- cohort registration -----------------------------------------------------------------------
def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN
    return v


def _safe_id(pair_id: str) -> str:
    if not pair_id or "/" in pair_id or "\\" in pair_id or pair_id.startswith("."):
        raise ValueError(f"pair_id {pair_id!r} cannot be used as a file name")
    return pair_id


class CohortWriter(BasePredictionWriter):
    """Writes each pair's record of :meth:`RegistrationLightningModule.predict_step` as
    ``outdir/<pair_id>.json`` (and ``<pair_id>_displacement.pt`` if ``save_displacement``),
    atomically, from whichever rank registered it. Writing by id makes a repeated pair
    overwrite its own file, never add one."""

    def __init__(self, outdir: str | Path, save_displacement: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.outdir = Path(outdir)
        self.save_displacement = save_displacement

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        self.outdir.mkdir(parents=True, exist_ok=True)
        for rec in prediction:
            rec = dict(rec)
            disp = rec.pop("displacement", None)
            pid = _safe_id(rec["pair_id"])
            if self.save_displacement and disp is not None:
                atomic_write(
                    self.outdir / f"{pid}_displacement.pt", lambda p, t=disp: torch.save(t, p)
                )
            text = json.dumps({k: _json_safe(v) for k, v in rec.items()}, indent=1)

            def write_json(p: str, text: str = text) -> None:
                with open(p, "w") as f:
                    f.write(text + "\n")

            atomic_write(self.outdir / f"{pid}.json", write_json)


def register_cohort(
    pairs_dataset: Dataset,
    model: nn.Module,
    outdir: str | Path,
    trainer_kwargs: dict | None = None,
    batch_size: int = 1,
    num_workers: int = 0,
    save_displacement: bool = False,
    evaluate: str | Evaluator = "basic",
    labels: Sequence[int] = (1, 2, 3),
) -> list[dict]:
    """Register every pair of a data set with ``Trainer.predict`` and write one JSON per pair.

    Args:
        pairs_dataset: items are ``tio.Subject`` pairs (e.g.
            :func:`~nadmm_torch.data.torchio_acdc.acdc_subjects_dataset`), batched with
            :func:`~nadmm_torch.data.pairs.collate_pairs`; each needs a unique
            ``pair_id``.
        model: a :class:`RegistrationLightningModule`, or any model it can wrap.
        outdir: where ``<pair_id>.json`` files go (created; meant to hold only this run's
            results: every ``*.json`` there is read back and counted).
        trainer_kwargs: for ``pl.Trainer``, e.g. ``dict(accelerator="cpu", devices=2,
            strategy="ddp")``; defaults: no logger, no checkpointing, no progress bar,
            ``inference_mode=False`` (see the comment in the code).
        batch_size, num_workers: of the ``DataLoader`` (in order, not shuffled).
        save_displacement: also write ``<pair_id>_displacement.pt`` ``(1, ndim, *S)``.
        evaluate, labels: for :class:`RegistrationLightningModule` when ``model`` is not one.

    Returns:
        On every rank, after all ranks finished: the records read back from ``outdir`` for
        this data set's pairs, sorted by ``pair_id``.

    Raises:
        RuntimeError: if the number of files differs from the number of pairs (a gap, or
            duplicate ids in the data set).
    """
    from .data.pairs import collate_pairs

    if not isinstance(model, RegistrationLightningModule):
        model = RegistrationLightningModule(model, evaluate=evaluate, labels=labels)
    # inference_mode=False: predict under no_grad, so that models that need autograd inside
    # predict (e.g. test-time refinement by gradient steps) work too.
    kwargs = dict(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, inference_mode=False
    )
    kwargs.update(trainer_kwargs or {})
    writer = CohortWriter(outdir, save_displacement=save_displacement)
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), writer]
    trainer = pl.Trainer(**kwargs)
    loader = DataLoader(
        pairs_dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate_pairs,
    )  # fmt: skip
    trainer.predict(model, dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier()
    records = []
    for p in sorted(Path(outdir).glob("*.json")):
        with open(p) as f:
            records.append(json.load(f))
    if len(records) != len(pairs_dataset):
        raise RuntimeError(
            f"register_cohort: {len(records)} result files in {outdir} for "
            f"{len(pairs_dataset)} pairs"
        )
    return sorted(records, key=lambda r: r["pair_id"])
