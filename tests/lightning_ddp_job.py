"""A 2-process ``strategy="ddp"`` job on synthetic 2D pairs (:mod:`tests.synthetic`).

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

# Run as a script, this file's folder is on sys.path but the repository root is not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.synthetic import small_nadmm, synthetic_dataset  # noqa: E402


def main(outdir: str) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from nadmm_torch.data.pairs import collate_pairs
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
