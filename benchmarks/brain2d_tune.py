#!/usr/bin/env python
"""``nt.tune`` against a grid search on brain2d, leave one subject out.

Usage::

    python benchmarks/brain2d_tune.py [--data DIR] [--cache DIR] [--json OUT.json] [--quick]
        [--presets fast,paper] [--epochs N] [--lr LR] [--val-pairs N] [--unlabelled]
        [--lam-mults 1/3,1,3,9] [--theta-mults 1,3,10,30,100] [--folds 0,1] [--threads N]

Pairs and scoring are those of ``benchmarks/brain2d.py`` (every ordered pair of distinct
subjects, ANTs ``Affine`` first, read from its cache; Dice over the labels with ≥ 10 pixels in
both maps). For each held-out subject ``s`` (one fold per subject), the pairs without ``s`` are
the tuning pairs (12 of 20 with 5 subjects) and the pairs involving ``s`` are scored (8):

* ``defaults``: the preset's defaults (``fast``/``paper``, ``l2``, order 2);
* ``grid``: the (λ, θ) multipliers of the defaults (per level, all levels alike) with the best
  mean Dice over the fold's tuning pairs. Every grid point is registered once on every pair
  (registrations do not depend on the fold); a fold's choice reads only its tuning pairs, and
  its wall time is the sum of the registration times of its tuning pairs over the grid;
* ``tuned``: :func:`nadmm_torch.tune` from the defaults on the tuning pairs with labels (soft
  Dice), ``--val-pairs`` of them held out for early stopping; wall time ``TuneResult.time_s``;
* ``tuned-noscan`` (``--compare-no-scan``): the same without the scan of global multipliers
  that precedes gradient descent (``nt.tune(scan=False)``);
* ``tuned-nolabels`` (``--unlabelled``): the same with NCC + smoothness, no labels.

All on one thread (``--threads``). ``--quick``: fold 0 only, 3 epochs, a 2 × 2 grid.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _brain2d():
    """``benchmarks/brain2d.py`` as a module (this folder is not a package)."""
    spec = importlib.util.spec_from_file_location("brain2d", REPO / "benchmarks" / "brain2d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


brain2d = _brain2d()


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(Fraction(v)) for v in s.split(",") if v.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(brain2d.DEFAULT_DATA))
    ap.add_argument("--cache", default=str(brain2d.DEFAULT_CACHE), help="affine-stage cache")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "records" / "brain2d_tune.json"))
    ap.add_argument("--quick", action="store_true", help="fold 0, 3 epochs, 2 x 2 grid")
    ap.add_argument("--presets", default="fast", help="comma list of presets (l2, order 2)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--val-pairs", type=int, default=3)
    ap.add_argument("--unlabelled", action="store_true", help="also tune on NCC + smoothness")
    ap.add_argument("--no-scan", action="store_true",
                    help="tuned: nt.tune(scan=False) (how the records before the scan were made)")
    ap.add_argument("--compare-no-scan", action="store_true",
                    help="also nt.tune(scan=False): gradient descent from the defaults alone")
    ap.add_argument("--smoothness", type=float, default=1.0, help="unlabelled tuning's weight")
    ap.add_argument("--lam-mults", type=_floats, default=_floats("1/3,1,3,9"))
    ap.add_argument("--theta-mults", type=_floats, default=_floats("1,3,10,30,100"))
    ap.add_argument("--folds", default=None, help="comma list of fold indices (default all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid-from", default=None,
                    help="this script's JSON output whose grid (same pairs, preset, "
                         "multipliers) to reuse instead of registering it again")
    ap.add_argument("--merge", default=None,
                    help="comma list of this script's JSON outputs (e.g. of --folds run in "
                         "parallel): join their folds into --json and print the table")
    return ap.parse_args(argv)


def folds(ids: list[str]) -> list[dict]:
    """One fold per subject: ``tune`` = ordered pairs without it, ``test`` = pairs with it."""
    pairs = [(m, f) for m in ids for f in ids if m != f]
    return [dict(held_out=s, tune=[p for p in pairs if s not in p],
                 test=[p for p in pairs if s in p]) for s in ids]


def _tensors(stage: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(stage["fixed"])[None, None],
            torch.from_numpy(stage["moving"])[None, None])


def register(stage: dict, settings: dict) -> tuple[dict, float]:
    """Register one cached pair with ``nt.register(**settings)``; brain2d's record and seconds."""
    import nadmm_torch as nt

    f, m = _tensors(stage)
    t0 = time.perf_counter()
    d = nt.register(f, m, spacing=(1.0, 1.0), **settings)
    seconds = time.perf_counter() - t0
    return brain2d.evaluate(stage, d), seconds


def defaults(preset: str) -> dict:
    """The preset's default λ, θ per level (l2, order 2, as ``register`` resolves them)."""
    from nadmm_torch.config import preset_config

    cfg = preset_config(preset, "l2", 2)

    def per_level(v):
        return tuple(v) if isinstance(v, tuple) else (float(v),) * cfg.levels

    return dict(lam=per_level(cfg.lam), theta=per_level(cfg.theta))


def grid_settings(preset: str, lm: float, tm: float) -> dict:
    base = defaults(preset)
    return dict(preset=preset, data_term="l2", order=2,
                lam=tuple(v * lm for v in base["lam"]), theta=tuple(v * tm for v in base["theta"]))


def run_grid(stages: dict, preset: str, lam_mults, theta_mults, log=print) -> dict:
    """Every grid point on every pair: ``{(lm, tm): {pair: (dice, folds %, seconds)}}``."""
    out = {}
    for lm in lam_mults:
        for tm in theta_mults:
            settings = grid_settings(preset, lm, tm)
            cell = {}
            for pair, stage in stages.items():
                rec, seconds = register(stage, settings)
                cell[pair] = (rec["dice"], rec["fold_percent"], seconds)
            out[(lm, tm)] = cell
            log(f"grid {preset} λ×{lm:.3g} θ×{tm:.3g}: mean Dice "
                f"{np.mean([v[0] for v in cell.values()]):.4f}")
    return out


def tune_pairs(stages: dict, pairs: list, labelled: bool) -> list:
    from nadmm_torch.tuning import TunePair

    out = []
    for pair in pairs:
        st = stages[pair]
        f, m = _tensors(st)
        labels = ((torch.from_numpy(st["fixed_labels"])[None, None],
                   torch.from_numpy(st["moving_labels"])[None, None]) if labelled
                  else (None, None))
        out.append(TunePair(f, m, (1.0, 1.0), *labels, id="__to__".join(pair)))
    return out


def _score(stages: dict, pairs: list, settings: dict) -> dict:
    recs = [register(stages[p], settings)[0] for p in pairs]
    return dict(dice=float(np.mean([r["dice"] for r in recs])),
                fold_percent=float(np.mean([r["fold_percent"] for r in recs])),
                per_pair=[r["dice"] for r in recs])


def _from_grid(grid: dict, key, pairs: list) -> dict:
    v = [grid[key][p] for p in pairs]
    return dict(dice=float(np.mean([x[0] for x in v])),
                fold_percent=float(np.mean([x[1] for x in v])), per_pair=[x[0] for x in v])


def run_fold(fold: dict, stages: dict, grid: dict, preset: str, args, log=print) -> dict:
    """Defaults, grid choice and ``nt.tune`` (labelled, optionally not) on one fold."""
    import nadmm_torch as nt
    from nadmm_torch.tuning import load_settings

    tune, test = fold["tune"], fold["test"]
    out = {"held_out": fold["held_out"], "preset": preset}
    out["defaults"] = _from_grid(grid, (1.0, 1.0), test)
    choice = max(grid, key=lambda k: np.mean([grid[k][p][0] for p in tune]))
    out["grid"] = dict(_from_grid(grid, choice, test), lam_mult=choice[0], theta_mult=choice[1],
                       tune_dice=float(np.mean([grid[choice][p][0] for p in tune])),
                       time_s=float(sum(grid[k][p][2] for k in grid for p in tune)),
                       registrations=len(grid) * len(tune))
    variants = [("tuned", True, not args.no_scan)]
    variants += [("tuned-noscan", True, False)] if args.compare_no_scan else []
    variants += [("tuned-nolabels", False, True)] if args.unlabelled else []
    for name, labelled, scan in variants:
        result = nt.tune(tune_pairs(stages, tune, labelled), preset=preset, data_term="l2",
                         order=2, val_pairs=args.val_pairs, epochs=args.epochs, lr=args.lr,
                         patience=args.patience, smoothness=args.smoothness, seed=args.seed,
                         progress=False, scan=scan)
        with tempfile.TemporaryDirectory() as tmp:  # the settings file's round trip
            kwargs = load_settings(result.save(Path(tmp) / "tuned.json"))
        base = defaults(preset)
        out[name] = dict(
            _score(stages, test, kwargs), time_s=result.time_s, best_epoch=result.best_epoch,
            epochs_run=len(result.history) - 1, val_start=result.val_start,
            val_best=result.val_best, lam=list(kwargs["lam"]), theta=list(kwargs["theta"]),
            lam_mult=[a / b for a, b in zip(kwargs["lam"], base["lam"])],
            theta_mult=[a / b for a, b in zip(kwargs["theta"], base["theta"])],
            history=result.history, scan=result.scan)
        log(f"fold {fold['held_out']} {preset} {name}: held-out Dice {out[name]['dice']:.4f} "
            f"(val {result.val_start:.4f} -> {result.val_best:.4f}, epoch {result.best_epoch}, "
            f"{result.time_s:.0f} s)")
    log(f"fold {fold['held_out']} {preset}: defaults {out['defaults']['dice']:.4f}, grid "
        f"λ×{choice[0]:.3g} θ×{choice[1]:.3g} {out['grid']['dice']:.4f} "
        f"({out['grid']['time_s']:.0f} s)")
    return out


METHODS = ("defaults", "grid", "tuned", "tuned-noscan", "tuned-nolabels")


def table(results: list[dict]) -> str:
    """Markdown: one row per fold and method, then the mean over folds."""
    lines = ["| preset | held out | method | held-out Dice | % det J ≤ 0 | tuning s | chosen |",
             "|---|---|---|---|---|---|---|"]
    by_preset: dict[str, list[dict]] = {}
    for r in results:
        by_preset.setdefault(r["preset"], []).append(r)
    for preset, rs in by_preset.items():
        for r in rs:
            for m in METHODS:
                if m in r:
                    lines.append(_row(preset, r["held_out"], m, [r[m]]))
        for m in METHODS:
            if all(m in r for r in rs):
                lines.append(_row(preset, f"**mean of {len(rs)}**", m, [r[m] for r in rs]))
    return "\n".join(lines)


def _row(preset: str, held: str, method: str, entries: list[dict]) -> str:
    dice = np.mean([e["dice"] for e in entries])
    folds_ = np.mean([e["fold_percent"] for e in entries])
    secs = [e["time_s"] for e in entries if "time_s" in e]
    t = f"{np.mean(secs):.0f}" if secs else "–"
    chosen = ""
    if len(entries) == 1 and method == "grid":
        chosen = f"λ×{entries[0]['lam_mult']:.3g} θ×{entries[0]['theta_mult']:.3g}"
    elif len(entries) == 1 and method.startswith("tuned"):
        lm = "/".join(f"{v:.2g}" for v in entries[0]["lam_mult"])
        tm = "/".join(f"{v:.2g}" for v in entries[0]["theta_mult"])
        chosen = f"λ×{lm} θ×{tm}"
    return f"| {preset} | {held} | {method} | {dice:.4f} | {folds_:.4f} | {t} | {chosen} |"


def load_grid(path: Path, preset: str, needed: list) -> dict:
    """A grid stored by :func:`run` (JSON keys back to ``(lm, tm)`` and pair tuples)."""
    stored = json.loads(path.read_text())["grid"][preset]
    grid = {tuple(float(v) for v in key.split(",")): {tuple(p.split("__to__")): tuple(v)
                                                       for p, v in cell.items()}
            for key, cell in stored.items()}
    missing = [p for p in needed if any(p not in cell for cell in grid.values())]
    if missing:
        raise SystemExit(f"--grid-from: {path} lacks pairs {missing[:3]}")
    return grid


def run(stages: dict, ids: list[str], args, log=print) -> dict:
    """The whole comparison on cached stages ``{(moving, fixed): stage}``; the JSON document."""
    chosen = list(range(len(ids))) if args.folds is None else [int(i) for i in
                                                               args.folds.split(",")]
    all_folds = [folds(ids)[i] for i in chosen]
    needed = sorted({p for f in all_folds for p in f["tune"] + f["test"]})
    results, grids = [], {}
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        if args.grid_from:
            grid = load_grid(Path(args.grid_from), preset, needed)
        else:
            grid = run_grid({p: stages[p] for p in needed}, preset, args.lam_mults,
                            args.theta_mults, log)
        grids[preset] = {f"{lm!r},{tm!r}": {"__to__".join(p): v for p, v in cell.items()}
                         for (lm, tm), cell in grid.items()}
        for fold in all_folds:
            results.append(run_fold(fold, stages, grid, preset, args, log))
    text = table(results)
    return dict(table=text, folds=results, grid=grids)


def merge(paths: list[Path]) -> dict:
    """Several runs' documents as one: their folds (in order) and grids, the table redone."""
    docs = [json.loads(p.read_text()) for p in paths]
    results = [f for d in docs for f in d["folds"]]
    return dict(table=table(results), folds=results, grid=docs[0]["grid"],
                merged_from=[str(p) for p in paths],
                runs=[{k: d.get(k) for k in ("config", "environment")} for d in docs])


def _write(doc: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_jsonable))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        doc = merge([Path(p) for p in args.merge.split(",") if p.strip()])
        print(doc["table"])
        _write(doc, Path(args.json))
        return 0
    if args.quick:
        args.folds = args.folds or "0"
        args.epochs = min(args.epochs, 3)
        args.lam_mults, args.theta_mults = args.lam_mults[:2], args.theta_mults[:2]
    torch.set_num_threads(args.threads)
    files = brain2d.subjects(Path(args.data))
    ids = list(files)
    stages = brain2d.affine_stages(files, Path(args.cache))
    doc = run(stages, ids, args, log=lambda s: print(s, flush=True))
    print(doc["table"])
    doc["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    doc["environment"] = brain2d.environment(argv)
    _write(doc, Path(args.json))
    return 0


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
