#!/usr/bin/env python
"""Learn λ, θ, momentum and step schedules of a preset; compare with the hand-tuned one.

The ``--preset`` (default ``paper``: l2 data term, order 2, ADMM iterations (10, 5, 5), warps
(10, 10, 5); the README's results were run with it, then under the name ``fast``) is made
learnable (``NADMMRegistration(..., learnable="all")``: λ, θ per pyramid level, or per ADMM
iteration with ``--schedule iteration``; the momentum weights ``a_k``; a step scale per warp)
and trained with ``RegistrationLightningModule`` on a seeded subset of the ACDC **tuning** pairs
(TorchIO pipeline, per-image intensity augmentation). Loss = ``dice_weight · soft Dice loss on
the warped one-hot ES labels`` (label supervision) + ``sim_weight · (1 − local NCC²)``.
The solver starts from the hand-tuned values, so training is fine-tuning of the preset.

Evaluation: the 20 **report** pairs, hand-tuned preset vs learned, same number of ADMM
iterations and warps, scored by :func:`nadmm_torch.data.acdc.evaluate_pair` (Dice per
structure and mean, slice-wise HD, % voxels with det J ≤ 0).

Usage::

    python examples/learn_schedules.py [--train-pairs 16] [--epochs 3] [--schedule level]
        [--learnable all] [--lr 0.05] [--json examples/results/learn_schedules.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (sibling helper module of the examples)
    add_common_args,
    evaluate,
    markdown_table,
    registration_module,
    setup,
    split_ids,
    train,
    trainable_count,
    unregistered,
    write_json,
)

import nadmm_torch as nt  # noqa: E402


def learned_values(reg: nt.NADMMRegistration) -> dict:
    """λ, θ, momentum and step scales as plain lists (for the JSON)."""
    hp = reg.hyperparameters(torch.float64)

    def lst(xs):
        return None if xs is None else [x.detach().flatten().tolist() for x in xs]

    return {k: lst(v) for k, v in hp.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(ap, train_pairs=16, epochs=3, json_name="learn_schedules.json")
    ap.add_argument("--schedule", choices=("level", "iteration"), default="level")
    ap.add_argument("--learnable", default="all",
                    help="'all' or a comma list of lambda,theta,momentum,step")
    ap.add_argument("--dice-weight", type=float, default=1.0)
    ap.add_argument("--sim-weight", type=float, default=1.0)
    args = ap.parse_args(argv)
    args.lr = 0.05 if args.lr is None else args.lr  # log-space parameters: ~5 % per step
    setup(args)
    train_ids, report_ids = split_ids(args)
    learnable = "all" if args.learnable == "all" else set(args.learnable.split(","))

    reg = nt.NADMMRegistration(
        args.preset, data_term="l2", order=2, learnable=learnable, schedule=args.schedule
    )
    module = registration_module(reg, args, similarity_weight=args.sim_weight)
    print(f"training {trainable_count(reg)} solver parameters on {len(train_ids)} tuning pairs "
          f"x {args.epochs} epochs", flush=True)
    train_info = train(module, args, train_ids)
    reg.eval()
    hand = nt.NADMMRegistration(args.preset, data_term="l2", order=2)

    predictors = {
        "unregistered": unregistered,
        f"{args.preset} preset, hand-tuned": lambda p: hand(p.fixed, p.moving, p.spacing),
        f"{args.preset} preset, learned ({args.schedule})": (
            lambda p: reg(p.fixed, p.moving, p.spacing)
        ),
    }
    records, summaries = evaluate(predictors, args.data, report_ids)
    table = markdown_table(summaries)
    names = list(summaries)
    delta = summaries[names[2]]["dice_mean"] - summaries[names[1]]["dice_mean"]
    wins = sum(
        a["dice"] > b["dice"] for a, b in zip(records[names[2]], records[names[1]], strict=True)
    )
    verdict = (
        f"learned − hand-tuned mean Dice: {delta:+.4f} (learned better on {wins}/"
        f"{len(report_ids)} report pairs); folds: learned "
        f"{summaries[names[2]]['fold_percent_mean']:.4f} %"
    )
    print(f"\nReport split ({len(report_ids)} pairs), ADMM iterations {hand.config.iterations}, "
          f"warps {hand.config.warps}:\n")
    print(table)
    print("\n" + verdict)
    write_json(
        args.json,
        {
            "train_ids": train_ids,
            "report_ids": report_ids,
            "training": train_info,
            "hand_tuned": learned_values(hand),
            "learned": learned_values(reg),
            "summaries": summaries,
            "verdict": verdict,
            "table": table,
            "records": records,
        },
        args,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
