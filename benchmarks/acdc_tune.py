"""``nt.tune`` on ACDC, where the presets were tuned: does self-tuning keep good defaults?

Usage::

    python benchmarks/acdc_tune.py [--data DIR] [--preset fast] [--tune-pairs 8]
        [--report-pairs 20] [--epochs 6] [--lr 0.1] [--json OUT.json]

``--tune-pairs`` pairs of the ACDC *tuning* split (evenly spaced; a quarter of them held out for
validation) tune the preset with labels (soft Dice), three ways: the scan of global
multipliers alone (``epochs=0``), the scan then gradient descent (the default), and the descent
alone (``scan=False``). Each result, and the preset's defaults, is then scored on
``--report-pairs`` pairs of the *report* split by the protocol's Dice (RV, Myo, LV) and the
folding percentage. ``--unlabelled 1,0.1`` adds label-free tuning (local NCC + weight ×
smoothness) at each weight. The brain2d counterpart is ``benchmarks/brain2d_tune.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nadmm_torch as nt  # noqa: E402
from nadmm_torch.data.acdc import (  # noqa: E402
    evaluate_pair,
    evenly_spaced,
    load_pair,
    read_acdc_pairs,
    split,
)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "acdc"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--tune-pairs", type=int, default=8)
    ap.add_argument("--report-pairs", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unlabelled", default="",
                    help="comma list of smoothness weights: also tune without labels (NCC + "
                         "weight x smoothness), scan + descent, once per weight")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "records" / "acdc_tune_nt.json"))
    return ap.parse_args(argv)


def score(pairs, kwargs: dict) -> dict:
    """Mean protocol Dice and folding of ``register(**kwargs)`` over ``pairs``."""
    recs = [evaluate_pair(q, nt.register(q.fixed, q.moving, spacing=q.spacing, **kwargs))
            for q in pairs]
    return dict(dice=statistics.fmean(r["dice"] for r in recs),
                fold_percent_max=max(r["fold_percent"] for r in recs),
                per_pair=[r["dice"] for r in recs])


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (Path(args.data) / "pairs.csv").is_file():
        raise SystemExit(f"--data: no pairs.csv in {args.data}")
    torch.set_num_threads(args.threads)
    tune_split, report_split = split(read_acdc_pairs(args.data))
    tune_ids = evenly_spaced(tune_split, args.tune_pairs)
    report_ids = evenly_spaced(report_split, args.report_pairs)
    tune_pairs = [nt.TunePair(q.fixed, q.moving, q.spacing, q.fixed_labels, q.moving_labels,
                              id=q.patient) for q in (load_pair(args.data, p) for p in tune_ids)]
    report = [load_pair(args.data, p) for p in report_ids]
    rows = {"defaults": dict(score(report, dict(preset=args.preset)), time_s=0.0)}
    variants = {"scan only": dict(epochs=0), "scan + descent": {},
                "descent only": dict(scan=False)}
    unlabelled = [nt.TunePair(p.fixed, p.moving, p.spacing, id=p.id) for p in tune_pairs]
    for w in [float(v) for v in args.unlabelled.split(",") if v.strip()]:
        variants[f"no labels, smoothness {w:g}"] = dict(pairs=unlabelled, smoothness=w)
    for name, kw in variants.items():
        t0 = time.perf_counter()
        result = nt.tune(kw.pop("pairs", tune_pairs), preset=args.preset,
                         val_pairs=max(1, len(tune_pairs) // 4),
                         epochs=kw.pop("epochs", args.epochs), lr=args.lr,
                         patience=args.patience, progress=False, **kw)
        seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            path = result.save(Path(tmp) / "tuned.json")
            rows[name] = dict(score(report, dict(preset=str(path))), time_s=seconds,
                              settings=result.settings["overrides"], scan=result.scan,
                              best_epoch=result.best_epoch, val_start=result.val_start,
                              val_best=result.val_best)
        best = max(result.scan, key=lambda r: r["score"]) if result.scan else None
        chosen = f"λ×{best['lam_mult']:.3g} θ×{best['theta_mult']:.3g}" if best else "–"
        print(f"{name}: report Dice {rows[name]['dice']:.4f} (scan chose {chosen}, "
              f"best epoch {result.best_epoch}, {seconds:.0f} s)", flush=True)
    lines = ["| method | report Dice | max % det J ≤ 0 | tuning s |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['dice']:.4f} | {v['fold_percent_max']:.4f} | {v['time_s']:.0f} |"
              for k, v in rows.items()]
    table = "\n".join(lines)
    print(table)
    doc = dict(table=table, rows=rows, tune_patients=tune_ids, report_patients=report_ids,
               config=vars(args), torch=torch.__version__, threads=torch.get_num_threads())
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
