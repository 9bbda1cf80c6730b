#!/usr/bin/env python
"""VoxelMorph trained on ACDC tuning pairs, then NADMM as test-time refinement.

Network (``--network``): ``own`` = :class:`nadmm_torch.networks.VoxelMorph`, the package's
VoxelMorph-1 (Balakrishnan et al. 2019), or ``monai`` = ``monai.networks.nets.VoxelMorph`` at
MONAI's defaults (the optional extra ``monai``) through :class:`nadmm_torch.networks.MonaiNetwork`;
in **3D on the protocol grid** ``Z × 128 × 128`` (padded internally to a multiple of 16 along z),
displacement output (no integration unless ``--integration-steps``). Trained with
``RegistrationLightningModule`` on a seeded subset of the **tuning** pairs: ``1 − local NCC²``
(window 3 × 9 × 9) + ``smooth_weight ·`` spacing-aware diffusion smoothness + ``dice_weight ·``
soft Dice on warped labels (VoxelMorph's auxiliary segmentation loss; ``--dice-weight 0`` for
the purely unsupervised network).

Evaluation on the 20 **report** pairs (:func:`nadmm_torch.data.acdc.evaluate_pair`):
VoxelMorph alone, NADMM alone (``--preset``, default paper, l2, order 2), and VoxelMorph +
NADMM (the preset started from the network's displacement: ``initial_displacement=``). The network's
weights are saved (``--save``) for ``examples/end_to_end.py``.

Usage::

    python examples/voxelmorph_refine.py [--train-pairs 30] [--epochs 6] [--lr 1e-3]
        [--dice-weight 1] [--smooth-weight 1] [--json examples/results/voxelmorph_refine.json]
"""

from __future__ import annotations

import argparse
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
    unregistered,
    write_json,
)

import nadmm_torch as nt  # noqa: E402
from nadmm_torch.networks import MonaiNetwork, VoxelMorph  # noqa: E402

NETWORK_NAMES = {
    "own": "nadmm_torch.networks.VoxelMorph (VoxelMorph-1), 3D",
    "monai": "monai.networks.nets.VoxelMorph (MONAI defaults) via MonaiNetwork, 3D",
}


def build_network(kind: str, integration_steps: int) -> torch.nn.Module:
    """The 3D network to train: the package's VoxelMorph or MONAI's (``--network``)."""
    if kind == "own":
        return VoxelMorph(ndim=3, integration_steps=integration_steps)
    from monai.networks.nets import VoxelMorph as MonaiVoxelMorph

    return MonaiNetwork(MonaiVoxelMorph(spatial_dims=3, integration_steps=integration_steps))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(ap, train_pairs=30, epochs=6, json_name="voxelmorph_refine.json")
    ap.add_argument("--dice-weight", type=float, default=1.0)
    ap.add_argument("--smooth-weight", type=float, default=1.0)
    ap.add_argument("--integration-steps", type=int, default=0)
    ap.add_argument("--network", choices=("own", "monai"), default="own",
                    help="own: nadmm_torch.networks.VoxelMorph; monai: monai.networks.nets."
                    "VoxelMorph (needs the extra 'monai')")
    ap.add_argument("--save", default=str(RESULTS / "voxelmorph.pt"),
                    help="where to save the trained network's state dict")
    ap.add_argument("--load", default=None,
                    help="evaluate these saved weights (from --save) instead of training")
    ap.add_argument("--refine-warps", default=None, metavar="W0,W1,W2",
                    help="warps per pyramid level of the refinement (default: the preset's); a "
                    "0 on the coarse levels starts the refinement finer, from the network's field")
    args = ap.parse_args(argv)
    args.lr = 1e-3 if args.lr is None else args.lr
    setup(args)
    train_ids, report_ids = split_ids(args)

    if args.load:  # evaluate a saved network (e.g. with another --preset); no training
        net, loaded_ids = load_voxelmorph(args.load, report_ids)
        train_info = {"loaded": args.load, "train_ids": loaded_ids}
    else:
        net = build_network(args.network, args.integration_steps)
        module = registration_module(net, args, smoothness_weight=args.smooth_weight)
        print(f"training VoxelMorph ({trainable_count(net)} parameters) on {len(train_ids)} "
              f"tuning pairs x {args.epochs} epochs", flush=True)
        train_info = train(module, args, train_ids)
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": net.state_dict(), "integration_steps": args.integration_steps,
                    "network": args.network, "train_ids": train_ids}, args.save)
    net.eval()
    nadmm = nt.NADMMRegistration(args.preset, data_term="l2", order=2)
    refiner = nadmm if args.refine_warps is None else nt.NADMMRegistration(
        args.preset, data_term="l2", order=2,
        warps=tuple(int(w) for w in args.refine_warps.split(",")),
    )  # fmt: skip

    def vm(p):
        return net(p.fixed, p.moving, p.spacing)

    alone = f"NADMM alone ({args.preset})"
    predictors = {
        "unregistered": unregistered,
        "VoxelMorph alone": vm,
        alone: lambda p: nadmm(p.fixed, p.moving, p.spacing),
        "VoxelMorph + NADMM refinement": lambda p: refiner(
            p.fixed, p.moving, p.spacing, initial_displacement=vm(p)
        ),
    }
    records, summaries = evaluate(predictors, args.data, report_ids)
    table = markdown_table(summaries)
    s = summaries
    refined = s["VoxelMorph + NADMM refinement"]["dice_mean"]
    verdict = (
        f"refinement − VoxelMorph: {refined - s['VoxelMorph alone']['dice_mean']:+.4f} Dice; "
        f"refinement − NADMM alone: {refined - s[alone]['dice_mean']:+.4f} Dice; "
        f"fold %: VoxelMorph {s['VoxelMorph alone']['fold_percent_mean']:.4f}, refined "
        f"{s['VoxelMorph + NADMM refinement']['fold_percent_mean']:.4f}"
    )
    print(f"\nReport split ({len(report_ids)} pairs):\n")
    print(table)
    print("\n" + verdict)
    write_json(
        args.json,
        {
            "network": NETWORK_NAMES[args.network],
            "train_ids": train_ids,
            "report_ids": report_ids,
            "training": train_info,
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
