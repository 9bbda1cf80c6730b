#!/usr/bin/env python
"""Demons and SyN tuned on the same leave-one-subject-out folds as ``nt.tune`` on brain2d.

Usage::

    python benchmarks/brain2d_baselines_tune.py [--data DIR] [--cache DIR] [--runs DIR]
        [--json OUT.json] [--methods demons,syn] [--demons-sigmas 0.25,0.5,0.75,1,1.5,2]
        [--demons-iterations 50/30/15,100/60/30,200/120/60,400/240/120] [--syn-radii 2,4]
        [--syn-grad-steps 0.1,0.25,0.4,0.6] [--syn-flow-sigmas 3] [--syn-total-sigmas 0]
        [--nadmm-presets fast,paper,accurate,balanced] [--nadmm-records A.json,B.json]
        [--folds 0,1] [--threads N] [--quick]

Why: ``benchmarks/brain2d_tune.py`` tunes our λ/θ on each fold's 12 tuning pairs, while
``benchmarks/brain2d.py`` runs demons and SyN at one fixed anchor setting; a tuned method
against untuned baselines flatters the tuned one. Here the baselines get the same treatment.

Pairs, affine stage (ANTs ``Affine``, cached per pair under ``--cache``, shared with
``brain2d.py`` / ``brain2d_tune.py``) and scoring (:func:`brain2d.evaluate`) are
``benchmarks/brain2d.py``'s; folds are :func:`brain2d_tune.folds` (held-out subject s: the 12
pairs without s tune, the 8 pairs with s are scored). For each baseline family:

* ``anchor``: ``brain2d.py``'s fixed settings (demons σ 1.0, 100/60/30; SyN CC radius 4,
  100/70/50, antspyx's grad step 0.2, flow σ 3, total σ 0);
* ``tuned``: the grid point (anchor included, listed first: ties keep the anchor) with the
  best mean Dice over the fold's tuning pairs, scored on its held-out pairs. Every grid point
  is registered once on every pair (a registration does not depend on the fold). The default
  grids were each widened once, when the best point over all 20 pairs sat on their edge
  (demons σ 0.25 and 400/240/120 added; SyN steps 0.4, 0.6 added): SyN's best is now inside.

``--nadmm-presets`` adds each preset's defaults (``l2``, order 2) on the same affine stages
(no tuning: one point each), and ``--nadmm-records`` the per-fold rows of ``brain2d_tune.py``
records (their affine stage is their own cache's; see the note below). Every registration's
(Dice, % det J ≤ 0, seconds) is kept under ``--runs`` (one JSON per grid point and pair, tagged
with a fingerprint of the affine stage it used, so a changed stage is registered again): runs
are resumable and several processes (e.g. ``--methods demons`` and ``--methods syn``) can fill
the same folder in parallel; a last run with every method reads them all and writes the table.

Note: ANTs ``Affine`` (Mattes MI, random sampling) is not reproducible here even with
``random_seed=1`` and one ITK thread (the same pair, three calls: affine-only Dice 0.4474,
0.4449, 0.4481), so rows computed on different affine caches differ by that noise (± 0.01 per
pair); compare rows computed on the same cache (this script's, or ``brain2d_tune.py`` rerun on
it).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "benchmarks" / "records"
ANCHORS = {
    "demons": dict(sigma=1.0, iterations=(100, 60, 30)),
    "syn": dict(radius=4, grad_step=0.2, flow_sigma=3.0, total_sigma=0.0,
                iterations=(100, 70, 50)),
}


def _load(name: str):
    """A sibling script of ``benchmarks/`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


brain2d_tune = _load("brain2d_tune")
brain2d = brain2d_tune.brain2d


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(Fraction(v)) for v in s.split(",") if v.strip())


def _schedules(s: str) -> tuple[tuple[int, ...], ...]:
    """``"50/30/15,100/60/30"`` → ``((50, 30, 15), (100, 60, 30))``."""
    return tuple(tuple(int(i) for i in v.split("/")) for v in s.split(",") if v.strip())


def _names(s: str | None) -> list[str]:
    return [v.strip() for v in (s or "").split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(brain2d.DEFAULT_DATA))
    ap.add_argument("--cache", default=str(brain2d.DEFAULT_CACHE), help="affine-stage cache")
    ap.add_argument("--runs", default=str(RECORDS / "cache" / "brain2d_baselines_tune"),
                    help="per (grid point, pair) results, reused across runs")
    ap.add_argument("--json", default=str(RECORDS / "brain2d_baselines_tuned.json"))
    ap.add_argument("--methods", default="demons,syn", help="baseline families to tune")
    ap.add_argument("--demons-sigmas", type=_floats, default=_floats("0.25,0.5,0.75,1,1.5,2"))
    ap.add_argument("--demons-iterations", type=_schedules,
                    default=_schedules("50/30/15,100/60/30,200/120/60,400/240/120"))
    ap.add_argument("--syn-radii", type=lambda s: tuple(int(v) for v in s.split(",")),
                    default=(2, 4))
    ap.add_argument("--syn-grad-steps", type=_floats, default=_floats("0.1,0.25,0.4,0.6"))
    ap.add_argument("--syn-flow-sigmas", type=_floats, default=_floats("3"))
    ap.add_argument("--syn-total-sigmas", type=_floats, default=_floats("0"))
    ap.add_argument("--syn-iterations", type=_schedules, default=_schedules("100/70/50"))
    ap.add_argument("--nadmm-presets", default="",
                    help="comma list of presets whose defaults (l2, o2) to add as rows")
    ap.add_argument("--nadmm-records", default="",
                    help="comma list of brain2d_tune.py JSON records whose folds to add as rows")
    ap.add_argument("--folds", default=None, help="comma list of fold indices (default all)")
    ap.add_argument("--threads", type=int, default=1, help="torch / ITK threads")
    ap.add_argument("--quick", action="store_true",
                    help="fold 0, the anchors alone (one grid point per family)")
    return ap.parse_args(argv)


# -- grid points -------------------------------------------------------------------------------

def _its(iterations) -> str:
    return "-".join(str(int(i)) for i in iterations)


def point_key(family: str, settings: dict) -> str:
    """A file-name-safe, readable name of one grid point."""
    if family == "demons":
        return f"demons_sigma{settings['sigma']:g}_its{_its(settings['iterations'])}"
    if family == "syn":
        return (f"syn_r{settings['radius']}_g{settings['grad_step']:g}_f"
                f"{settings['flow_sigma']:g}_t{settings['total_sigma']:g}_its"
                f"{_its(settings['iterations'])}")
    return family  # nadmm-<preset>, affine: one setting


def grid(args: argparse.Namespace) -> dict[str, list[dict]]:
    """``{family: [settings, ...]}``, the anchor first (dropped from later if repeated)."""
    out: dict[str, list[dict]] = {}
    for family in _names(args.methods):
        if family == "demons":
            pts = [dict(sigma=s, iterations=tuple(i)) for s in args.demons_sigmas
                   for i in args.demons_iterations]
        elif family == "syn":
            pts = [dict(radius=r, grad_step=g, flow_sigma=f, total_sigma=t, iterations=tuple(i))
                   for r in args.syn_radii for g in args.syn_grad_steps
                   for f in args.syn_flow_sigmas for t in args.syn_total_sigmas
                   for i in args.syn_iterations]
        else:
            raise SystemExit(f"--methods: unknown baseline {family!r}; known: demons, syn")
        out[family], keys = [ANCHORS[family]], {point_key(family, ANCHORS[family])}
        for p in pts:
            if point_key(family, p) not in keys:
                keys.add(point_key(family, p))
                out[family].append(p)
    for preset in _names(args.nadmm_presets):
        out[f"nadmm-{preset}"] = [dict(preset=preset)]
    out["affine"] = [{}]  # the shared affine stage alone: the floor every row starts from
    return out


def runner(family: str, settings: dict) -> Callable:
    """``(fixed, moving) -> (1, 2, Y, X)`` displacement (``None`` for ``affine``: identity)."""
    if family == "affine":
        return lambda f, m: None
    if family == "demons":
        return lambda f, m: brain2d.demons_2d(f, m, settings["iterations"], settings["sigma"])
    if family == "syn":
        return lambda f, m: brain2d.syn_2d(f, m, **settings)
    if family.startswith("nadmm-"):
        return brain2d._nadmm(f"nadmm-{settings['preset']}-l2-o2", {})
    raise ValueError(f"family: unknown {family!r}")


# -- registrations (cached per grid point and pair) -------------------------------------------

def fingerprint(stage: dict) -> str:
    """A short hash of an affine stage (so a run of another stage is never reused)."""
    h = hashlib.sha1()
    for k in ("fixed", "moving", "moving_labels"):
        h.update(np.ascontiguousarray(stage[k]).tobytes())
    return h.hexdigest()[:16]


def register_point(family: str, settings: dict, pair: tuple, stage: dict, runs: Path) -> list:
    """``[Dice, % det J ≤ 0, seconds]`` of one grid point on one pair, from ``runs`` if there."""
    key = point_key(family, settings)
    path = runs / key / f"{pair[0]}__to__{pair[1]}.json"
    tag = fingerprint(stage)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("stage") == tag:
            return stored["result"]
    t0 = time.perf_counter()
    disp = runner(family, settings)(stage["fixed"], stage["moving"])
    seconds = time.perf_counter() - t0
    rec = brain2d.evaluate(stage, disp)
    result = [rec["dice"], rec["fold_percent"], seconds]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(stage=tag, settings=settings, result=result)))
    tmp.replace(path)
    return result


def run_grid(points: dict, stages: dict, runs: Path, log=print) -> dict:
    """``{family: {key: {pair: [dice, folds %, s]}}}`` over every point and pair."""
    out: dict = {}
    for family, settings_list in points.items():
        out[family] = {}
        for settings in settings_list:
            key = point_key(family, settings)
            cell = {p: register_point(family, settings, p, st, runs) for p, st in stages.items()}
            out[family][key] = cell
            log(f"{key}: mean Dice {np.mean([v[0] for v in cell.values()]):.4f}, "
                f"{np.mean([v[2] for v in cell.values()]):.1f} s/pair")
    return out


# -- folds ------------------------------------------------------------------------------------

def _scores(cell: dict, pairs: list) -> dict:
    v = [cell[p] for p in pairs]
    return dict(dice=float(np.mean([x[0] for x in v])),
                fold_percent=float(np.mean([x[1] for x in v])), per_pair=[x[0] for x in v])


def choose(cells: dict, pairs: list) -> str:
    """The key with the best mean Dice over ``pairs`` (the first of equals: the anchor)."""
    if not pairs:
        raise ValueError("pairs: a fold needs at least one tuning pair (three subjects)")
    best, best_dice = None, -math.inf
    for key, cell in cells.items():
        d = float(np.mean([cell[p][0] for p in pairs]))
        if d > best_dice:
            best, best_dice = key, d
    return best


def run_fold(fold: dict, results: dict, points: dict) -> dict:
    """Anchor and tuned choice of every family on one fold."""
    tune, test = fold["tune"], fold["test"]
    out = {"held_out": fold["held_out"], "test": ["__to__".join(p) for p in test]}
    for family, cells in results.items():
        anchor = point_key(family, points[family][0])
        name = family if family == "affine" else (
            f"{family} defaults" if family.startswith("nadmm-") else f"{family} anchor")
        out[name] = dict(_scores(cells[anchor], test), key=anchor)
        if len(cells) > 1:
            key = choose(cells, tune)
            settings = next(s for s in points[family] if point_key(family, s) == key)
            out[f"{family} tuned"] = dict(
                _scores(cells[key], test), key=key, settings=settings,
                tune_dice=float(np.mean([cells[key][p][0] for p in tune])),
                anchor_tune_dice=float(np.mean([cells[anchor][p][0] for p in tune])),
                time_s=float(sum(c[p][2] for c in cells.values() for p in tune)),
                registrations=len(cells) * len(tune))
    return out


def record_rows(paths: list[Path], folds_: list[dict]) -> dict[str, list[dict]]:
    """``{row name: [per-fold entry]}`` from ``brain2d_tune.py`` records, in ``folds_`` order."""
    rows: dict[str, list[dict]] = {}
    for path in paths:
        doc = json.loads(path.read_text())
        by_held = {}
        for f in doc["folds"]:
            by_held.setdefault(f["held_out"], []).append(f)
        for fold in folds_:
            for f in by_held.get(fold["held_out"], []):
                for m in brain2d_tune.METHODS:
                    if m in f:
                        name = f"nadmm-{f['preset']} {m} [{path.stem}]"
                        rows.setdefault(name, []).append(dict(
                            dice=f[m]["dice"], fold_percent=f[m]["fold_percent"],
                            per_pair=f[m]["per_pair"], held_out=f["held_out"]))
    return {k: v for k, v in rows.items() if len(v) == len(folds_)}


# -- tables -----------------------------------------------------------------------------------

def rows_of(fold_results: list[dict], extra: dict) -> dict[str, list[dict]]:
    """Every row's per-fold entries: this run's families, then the records' rows."""
    names = [k for k in fold_results[0] if k not in ("held_out", "test")]
    return {**{n: [f[n] for f in fold_results] for n in names}, **extra}


def compare(entries: list[dict], ref: list[dict]) -> tuple[int, int, float]:
    """(held-out scores where ``entries`` beat ``ref``, their number, mean difference)."""
    a = np.concatenate([e["per_pair"] for e in entries])
    b = np.concatenate([e["per_pair"] for e in ref])
    return int((a > b).sum()), len(a), float((a - b).mean())


def table(rows: dict[str, list[dict]], held: list[str], refs: list[str]) -> str:
    """Markdown: held-out Dice per fold and mean, % det J ≤ 0, and per reference row the
    (fold, pair) held-out scores above it (a pair is scored in two folds) and the mean gap."""
    lines = [(f"| method | mean | {' | '.join(held)} | % det J ≤ 0 | "
              + "".join(f"vs {r}: ahead on | Δ | " for r in refs)).rstrip(),
             "|---|---|" + "---|" * len(held) + "---|" + "---|---|" * len(refs)]
    for name, entries in rows.items():
        per_fold = " | ".join(f"{e['dice']:.4f}" for e in entries)
        folds_ = np.mean([e["fold_percent"] for e in entries])
        cells = ""
        for r in refs:
            if r == name:
                cells += "– | – | "
                continue
            wins, n, d = compare(entries, rows[r])
            cells += f"{wins}/{n} | {d:+.4f} | "
        lines.append(f"| {name} | {np.mean([e['dice'] for e in entries]):.4f} | {per_fold} | "
                     f"{folds_:.4f} | {cells}".rstrip())
    return "\n".join(lines)


def choices_table(fold_results: list[dict]) -> str:
    """Markdown: per fold, each family's chosen grid point and its tuning-pairs Dice."""
    fams = [k for k in fold_results[0] if k.endswith(" tuned")]
    lines = ["| held out | " + " | ".join(f"{f} (tuning Dice; anchor's)" for f in fams) + " |",
             "|---|" + "---|" * len(fams)]
    for f in fold_results:
        cells = [f"{f[k]['key']} ({f[k]['tune_dice']:.4f}; {f[k]['anchor_tune_dice']:.4f})"
                 for k in fams]
        lines.append(f"| {f['held_out']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------

def run(stages: dict, ids: list[str], args: argparse.Namespace, log=print) -> dict:
    """The comparison on cached stages ``{(moving, fixed): stage}``; the JSON document."""
    all_folds = brain2d_tune.folds(ids)
    chosen = range(len(ids)) if args.folds is None else [int(i) for i in args.folds.split(",")]
    folds_ = [all_folds[i] for i in chosen]
    needed = sorted({p for f in folds_ for p in f["tune"] + f["test"]})
    points = grid(args)
    if not points:
        raise SystemExit("--methods / --nadmm-presets: nothing to run")
    results = run_grid(points, {p: stages[p] for p in needed}, Path(args.runs), log)
    fold_results = [run_fold(f, results, points) for f in folds_]
    extra = record_rows([Path(p) for p in _names(args.nadmm_records)], folds_)
    rows = rows_of(fold_results, extra)
    refs = [r for r in ("syn tuned", "demons tuned") if r in rows]
    text = table(rows, [f["held_out"] for f in folds_], refs)
    return dict(table=text, choices=choices_table(fold_results) if any(
        k.endswith(" tuned") for k in fold_results[0]) else "", folds=fold_results,
        rows=rows, points={f: [dict(key=point_key(f, s), **s) for s in v]
                           for f, v in points.items()},
        grid={f: {k: {"__to__".join(p): v for p, v in cell.items()} for k, cell in c.items()}
              for f, c in results.items()})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.folds = args.folds or "0"
        args.demons_sigmas, args.demons_iterations = (1.0,), ((100, 60, 30),)
        args.syn_radii, args.syn_grad_steps = (4,), (0.2,)
    files = brain2d.subjects(Path(args.data))
    ids = list(files)
    stages = brain2d.affine_stages(files, Path(args.cache))
    doc = run(stages, ids, args, log=lambda s: print(s, flush=True))
    print(doc["table"])
    print(doc["choices"])
    doc["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    doc["environment"] = brain2d.environment(argv)
    brain2d_tune._write(doc, Path(args.json))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
