"""Synthetic 2D pairs for the learning tests, and a 2-process ``strategy="ddp"`` job.

Run as a script (``python tests/lightning_ddp_job.py OUTDIR``): Lightning's ``ddp`` launcher
re-runs this file for rank 1, so the job must live in a script rather than inside pytest. It
registers 6 synthetic pairs with :func:`nadmm_torch.lightning.register_cohort` into
``OUTDIR/cohort`` (2 CPU processes, gloo) and then runs a 2-step DDP fit of learnable λ/θ,
writing ``OUTDIR/fit_rank<r>.json`` (world size, final λ) from each rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import Tensor

N_PAIRS = 6


def blobs(centers: list[tuple[float, float]], n: int = 32, r: float = 4.0) -> Tensor:
    """Sum of Gaussian blobs ``(1, 1, n, n)`` (smooth, values in 0…~1)."""
    y, x = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")
    img = torch.zeros(n, n)
    for cy, cx in centers:
        img = img + torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    return img[None, None]


def blob_labels(centers: list[tuple[float, float]], n: int = 32, r: float = 4.0) -> Tensor:
    """Label ``k + 1`` inside radius ``1.2 r`` of blob ``k`` (later blobs win): ``(1, 1, n, n)``."""
    y, x = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")
    lab = torch.zeros(n, n, dtype=torch.int64)
    for k, (cy, cx) in enumerate(centers):
        lab[(y - cy) ** 2 + (x - cx) ** 2 <= (1.2 * r) ** 2] = k + 1
    return lab[None, None]


def synthetic_pair(seed: int, n: int = 32) -> dict:
    """Two blobs in ``fixed``; in ``moving`` each moved by a random shift of up to 2.5 voxels
    (a known smooth motion). Returns ``fixed``, ``moving``, ``fixed_labels``, ``moving_labels``
    ``(1, 1, n, n)`` and ``pair_id``."""
    g = torch.Generator().manual_seed(seed)
    c = [(0.35 * n, 0.35 * n), (0.62 * n, 0.66 * n)]
    c = [(cy + float(torch.rand((), generator=g)) * 2 - 1, cx) for cy, cx in c]
    shift = (torch.rand(len(c), 2, generator=g) * 5 - 2.5).tolist()
    cm = [(cy + sy, cx + sx) for (cy, cx), (sy, sx) in zip(c, shift, strict=True)]
    return dict(
        fixed=blobs(c, n), moving=blobs(cm, n), fixed_labels=blob_labels(c, n),
        moving_labels=blob_labels(cm, n), pair_id=f"pair{seed:02d}",
    )  # fmt: skip


def synthetic_dataset(count: int = N_PAIRS, n: int = 32, spacing=(1.0, 1.0)):
    """A ``tio.SubjectsDataset`` of :func:`synthetic_pair` subjects ``pair00`` … ."""
    import torchio as tio

    from nadmm_torch.data.torchio_acdc import pair_subject

    subjects = []
    for i in range(count):
        p = synthetic_pair(i, n)
        subjects.append(
            pair_subject(p["fixed"], p["moving"], p["fixed_labels"], p["moving_labels"],
                         spacing, p["pair_id"])
        )
    return tio.SubjectsDataset(subjects)


def small_nadmm(**kw):
    """A tiny NADMM layer (2 levels, 3 ADMM iterations, 2 warps) for tests."""
    from nadmm_torch import NADMMRegistration

    cfg = dict(levels=2, iterations=(3, 3), warps=(2, 2))
    cfg.update(kw)
    return NADMMRegistration("fast", **cfg)


def main(outdir: str) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from nadmm_torch.data.torchio_acdc import collate_pairs
    from nadmm_torch.lightning import RegistrationLightningModule, register_cohort, seed_everything

    out = Path(outdir)
    seed_everything(0)
    ddp = dict(accelerator="cpu", devices=2, strategy="ddp", enable_progress_bar=False,
               logger=False, enable_checkpointing=False, enable_model_summary=False)
    ds = synthetic_dataset()
    register_cohort(ds, small_nadmm(), out / "cohort", trainer_kwargs=ddp, labels=(1, 2))

    model = small_nadmm(learnable={"lambda", "theta"}, lam=0.01)
    module = RegistrationLightningModule(model, similarity="mse", labels=(1, 2), lr=0.1)
    trainer = pl.Trainer(max_steps=2, **ddp)
    loader = DataLoader(ds, batch_size=1, shuffle=True, collate_fn=collate_pairs)
    trainer.fit(module, loader)
    rec = dict(
        world_size=trainer.world_size,
        rank=trainer.global_rank,
        steps=trainer.global_step,
        log_lam=model.log_lam.detach().flatten().tolist(),
        dice=float(trainer.callback_metrics.get("train/dice", float("nan"))),
    )
    (out / f"fit_rank{trainer.global_rank}.json").write_text(json.dumps(rec))


if __name__ == "__main__":
    main(sys.argv[1])
