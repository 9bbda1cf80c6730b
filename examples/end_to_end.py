#!/usr/bin/env python
"""End-to-end: VoxelMorph + an unrolled NADMM layer trained jointly.

Model: ``NetworkWithNADMM(VoxelMorph(3), NADMMRegistration(--preset (default paper), l2, order 2,
learnable={"lambda", "theta"}))``. The layer starts from the network's displacement and its
output is the final displacement; the loss is computed on it only, so the network learns
through the layer (its gradient is the layer's vector–Jacobian product with respect to
``initial_displacement``), jointly with the layer's λ, θ. Loss as in
``examples/voxelmorph_refine.py``: ``1 − local NCC²`` + smoothness + soft Dice on warped labels.

The network starts from the weights ``examples/voxelmorph_refine.py`` saved (``--init``, if the
file exists; else from scratch) so that a short CPU run fine-tunes rather than trains from
nothing. The report table evaluates the jointly trained model and, from the JSON files of the
other two examples if present, their rows, so the three uses are side by side.

Usage::

    python examples/end_to_end.py [--train-pairs 12] [--epochs 2] [--lr 1e-4]
        [--init examples/results/voxelmorph.pt] [--json examples/results/end_to_end.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402  (sibling helper module of the examples)
    RESULTS,
    add_common_args,
    evaluate,
    load_voxelmorph,
    markdown_table,
    registration_module,
    setup,
    split_ids,
    train,
    trainable_count,
    write_json,
)

import nadmm_torch as nt  # noqa: E402
from nadmm_torch.networks import NetworkWithNADMM, VoxelMorph  # noqa: E402


def other_rows(results: Path) -> dict[str, dict]:
    """Summaries of the other two examples (same report pairs), where their JSON exists."""
    rows: dict[str, dict] = {}
    for name, keys in (
        ("voxelmorph_refine.json", ("VoxelMorph alone", "NADMM alone (fast)",
                                    "VoxelMorph + NADMM refinement")),
        ("learn_schedules.json", None),
    ):
        path = results / name
        if not path.is_file():
            continue
        s = json.loads(path.read_text())["summaries"]
        for k, v in s.items():
            if k == "unregistered" or (keys is not None and k not in keys):
                continue
            if name == "learn_schedules.json" and "hand-tuned" in k:
                continue  # the same solver as "NADMM alone (fast)"
            rows[f"{k} [{path.stem}]"] = {
                kk: (float("nan") if vv is None else vv) for kk, vv in v.items()
            }
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(ap, train_pairs=12, epochs=2, json_name="end_to_end.json")
    ap.add_argument("--init", default=str(RESULTS / "voxelmorph.pt"),
                    help="network weights to start from ('' or a missing file: from scratch)")
    ap.add_argument("--layer-lr", type=float, default=0.02, help="Adam lr of log λ, log θ")
    ap.add_argument("--dice-weight", type=float, default=1.0)
    ap.add_argument("--smooth-weight", type=float, default=1.0)
    args = ap.parse_args(argv)
    args.lr = 1e-4 if args.lr is None else args.lr
    setup(args)
    train_ids, report_ids = split_ids(args)

    from nadmm_torch.lightning import RegistrationLightningModule

    net = VoxelMorph(ndim=3)
    init = "scratch"
    if args.init and Path(args.init).is_file():
        net, _ = load_voxelmorph(args.init, report_ids)
        init = args.init
    layer = nt.NADMMRegistration(
        args.preset, data_term="l2", order=2, learnable={"lambda", "theta"}
    )
    model = NetworkWithNADMM(net, layer)

    class Module(RegistrationLightningModule):
        """Two learning rates: the network's (small, fine-tuning) and the layer's log λ, θ."""

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam([
                {"params": net.parameters(), "lr": args.lr},
                {"params": layer.parameters(), "lr": args.layer_lr},
            ])

    module = registration_module(model, args, smoothness_weight=args.smooth_weight, cls=Module)
    print(f"training network + NADMM layer ({trainable_count(model)} parameters, network from "
          f"{init}) on {len(train_ids)} tuning pairs x {args.epochs} epochs", flush=True)
    train_info = train(module, args, train_ids)
    model.eval()

    predictors = {
        "end-to-end: network output only": lambda p: net(p.fixed, p.moving, p.spacing),
        "end-to-end: network + NADMM layer": lambda p: model(p.fixed, p.moving, p.spacing),
    }
    records, summaries = evaluate(predictors, args.data, report_ids)
    table_e2e = markdown_table(summaries)
    others = other_rows(Path(args.json).parent)
    table_all = markdown_table({**others, **summaries})
    print(f"\nReport split ({len(report_ids)} pairs):\n")
    print(table_all)
    hp = layer.hyperparameters(torch.float64)
    lam = [float(x.detach()) for x in hp["lam"]]
    theta = [float(x.detach()) for x in hp["theta"]]
    print(f"\nlearned λ per level {lam}, θ {theta}")
    write_json(
        args.json,
        {
            "network_init": init,
            "train_ids": train_ids,
            "report_ids": report_ids,
            "training": train_info,
            "learned_lambda": lam,
            "learned_theta": theta,
            "summaries": summaries,
            "table": table_e2e,
            "table_with_other_examples": table_all,
            "records": records,
        },
        args,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
