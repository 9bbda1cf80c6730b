"""Self-tuning: the solver's λ, θ (optionally momentum and step schedules) learned by gradient
descent through the unrolled solver, from a handful of pairs of a new domain.

A classical tool must be grid-searched on each new kind of image; the unrolled NADMM solver is
differentiable in its hyperparameters, so it can fit them itself. :func:`tune` minimises, over
training pairs,

* with labels: ``1 − soft Dice`` of the warped one-hot moving labels against the fixed labels;
* without: ``1 − local NCC²`` + ``smoothness ×`` the diffusion energy of the displacement,

holds out validation pairs (hard Dice with labels, the loss without), keeps the best settings
seen (the starting ones included) and stops early. The result saves as a settings file that
``register``, ``NADMMRegistration`` and ``nadmm-register`` load (see :func:`load_settings`).

Shapes: each pair's images ``(1, 1, *S)`` (2D or 3D; pairs may differ in size), labels
``(1, 1, *S)`` integer maps with any ids (they are remapped to ``0 … K−1`` per pair).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .atomic import atomic_write
from .checks import check_same_device
from .config import SETTINGS_FORMAT, SETTINGS_VERSION, read_settings
from .losses import DiceLoss, NCCLoss, SmoothnessLoss, warp_onehot
from .metrics import dice
from .module import NADMMRegistration
from .ops.warp import warp, warp_labels


@dataclass
class TunePair:
    """One pair for :func:`tune`: images ``(1, 1, *S)``, spacing in mm (order of ``S``),
    optional integer label maps ``(1, 1, *S)``."""

    fixed: Tensor
    moving: Tensor
    spacing: tuple[float, ...] | None = None
    fixed_labels: Tensor | None = None
    moving_labels: Tensor | None = None
    id: str = ""

    @property
    def labelled(self) -> bool:
        return self.fixed_labels is not None and self.moving_labels is not None


@dataclass
class TuneResult:
    """What :func:`tune` learned and how: ``settings`` loads with :func:`load_settings`.
    ``scan``: the scored multipliers of the scan (all pairs); ``history`` and
    ``val_start``: from where gradient descent started (after the scan)."""

    settings: dict
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    val_start: float | None = None
    val_best: float | None = None
    time_s: float = 0.0
    scan: list[dict] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        """Write the settings file (JSON) atomically; returns its path."""
        doc = {**self.settings, "tuning": {k: v for k, v in asdict(self).items()
                                           if k != "settings"}}
        text = json.dumps(doc, indent=1) + "\n"
        return atomic_write(path, lambda tmp: tmp.write_text(text))


def load_settings(path: str | Path) -> dict:
    """A settings file from :meth:`TuneResult.save` as keyword arguments of ``register`` /
    ``NADMMRegistration``: ``preset``, ``data_term``, ``order`` and the solver overrides.
    (The path itself works as ``preset=`` too.)"""
    return read_settings(path)


def _remap(fixed_labels: Tensor, moving_labels: Tensor) -> tuple[Tensor, Tensor, int]:
    """Both label maps on the ids present in either, as ``0 … K−1`` (0 stays background)."""
    ids, inverse = torch.unique(
        torch.cat([fixed_labels.flatten(), moving_labels.flatten(), fixed_labels.new_zeros(1)]),
        return_inverse=True,
    )
    n = fixed_labels.numel()
    f = inverse[:n].view_as(fixed_labels)
    m = inverse[n:2 * n].view_as(moving_labels)
    return f, m, len(ids)


class _Objective:
    """Training loss and validation score of one pair under the model's current settings."""

    def __init__(self, pairs: Sequence[TunePair], smoothness: float, ncc_window: int) -> None:
        self.ncc = NCCLoss(ncc_window)
        self.smooth = SmoothnessLoss()
        self.smoothness = smoothness
        # Each labelled pair's remapped labels and scored ids, once (not per step and epoch).
        self.labels: dict[int, tuple[Tensor, Tensor, int, list[int]]] = {}
        for p in pairs:
            if p.labelled:
                f, m, k = _remap(p.fixed_labels, p.moving_labels)
                both = set(torch.unique(f).tolist()) & set(torch.unique(m).tolist())
                self.labels[id(p)] = (f, m, k, sorted(both - {0}))

    def loss(self, model: nn.Module, p: TunePair) -> Tensor:
        d = model(p.fixed, p.moving, spacing=p.spacing)
        if p.labelled:
            f, m, k, _ = self.labels[id(p)]
            return DiceLoss(k)(warp_onehot(m, d, k), f)
        loss = self.ncc(warp(p.moving, d), p.fixed)
        return loss + self.smoothness * self.smooth(d, p.spacing)

    @torch.no_grad()
    def score(self, model: nn.Module, p: TunePair) -> float:
        """Higher is better: mean hard Dice over the labels present in both maps, else −loss."""
        if not p.labelled:
            return -float(self.loss(model, p))
        d = model(p.fixed, p.moving, spacing=p.spacing)
        f, m, _, present = self.labels[id(p)]
        if not present:
            return float("nan")
        return float(dice(warp_labels(m, d), f, labels=present).nanmean())


def _split(pairs: Sequence[TunePair], val_pairs: int | None, seed: int):
    n = len(pairs)
    if val_pairs is None:
        val_pairs = n // 4 if n >= 3 else 0
    if not isinstance(val_pairs, int) or isinstance(val_pairs, bool) or not 0 <= val_pairs < n:
        raise ValueError(f"val_pairs: expected an integer in [0, {n - 1}], got {val_pairs!r}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = sorted(order[:val_pairs])
    return [pairs[i] for i in order[val_pairs:]], [pairs[i] for i in val]


# The scan of :func:`tune`: a pattern search over global multipliers of λ and θ on the powers
# of SCAN_FACTOR (a factor the descent's small steps need many epochs for), at most SCAN_MOVES
# moves from the start: from 3^-6 to 3^6 (±2.9 decades) along one of them.
SCAN_FACTOR = 3.0
SCAN_MOVES = 6


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def fit(
    model: nn.Module,
    train: Sequence,
    val: Sequence,
    loss: Callable[[nn.Module, object], Tensor],
    score: Callable[[nn.Module, object], float],
    *,
    epochs: int = 20,
    lr: float = 0.05,
    patience: int | None = 4,
    seed: int = 0,
    progress: bool | None = None,
) -> tuple[list[dict], int]:
    """Adam on ``model``'s parameters, one step per training item, shuffled each epoch.

    After each epoch (and once before training) the mean ``score`` over ``val`` (over ``train``
    if ``val`` is empty) is recorded; the best state is restored at the end, and training stops
    once ``patience`` epochs pass without improvement. Returns ``(history, best_epoch)``.
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("learnable: nothing to tune (the model has no learnable parameters)")
    opt = torch.optim.Adam(params, lr=lr)
    judge = list(val) if val else list(train)
    best = _mean([score(model, x) for x in judge])
    best_state, best_epoch, since = _snapshot(model), 0, 0
    history = [dict(epoch=0, train_loss=None, val_score=best)]
    rng = random.Random(seed)
    bar = tqdm(range(1, epochs + 1), desc="nadmm tune", disable=None if progress is None
               else not progress, leave=False)
    for epoch in bar:
        order = list(train)
        rng.shuffle(order)
        losses = []
        for item in order:
            opt.zero_grad(set_to_none=True)
            value = loss(model, item)
            value.backward()
            _check_gradients(params)
            opt.step()
            losses.append(float(value.detach()))
        current = _mean([score(model, x) for x in judge])
        history.append(dict(epoch=epoch, train_loss=_mean(losses), val_score=current))
        bar.set_postfix(val=f"{current:.4f}", best=f"{best:.4f}")
        if current > best:
            best, best_state, best_epoch, since = current, _snapshot(model), epoch, 0
        else:
            since += 1
            if patience is not None and since >= patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    return history, best_epoch


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_gradients(params: Sequence[Tensor]) -> None:
    for p in params:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            raise FloatingPointError("tune: a non-finite gradient; lower lr or check the pairs")


def tune(
    pairs: Sequence[TunePair],
    *,
    preset: str = "fast",
    data_term: str = "l2",
    order: int = 2,
    learnable: object = ("lambda", "theta"),
    val_pairs: int | None = None,
    epochs: int = 20,
    lr: float = 0.05,
    patience: int | None = 4,
    smoothness: float = 1.0,
    ncc_window: int = 9,
    seed: int = 0,
    progress: bool | None = None,
    scan: bool | Mapping[str, Sequence[float]] = True,
    **overrides,
) -> TuneResult:
    """Learn the solver's settings for a domain from ``pairs`` (see the module docstring).

    ``learnable``: ``"lambda"``, ``"theta"`` or both (what a settings file stores).
    ``val_pairs``: how many pairs to hold out (default a quarter when there are ≥ 3).
    ``scan``: before gradient descent, score global multipliers of the learnable λ and θ (all
    levels alike) on all pairs and start from the best: ``True``, a pattern search over powers
    of 3 from the given settings (:func:`_scan`), or every point of a grid ``{"lam": [...],
    "theta": [...]}``; ``False``: start from the given settings. The scan finds the order of
    magnitude that the descent's small steps cannot reach on a new domain; the descent then
    refines per level.
    ``overrides``: starting solver settings (e.g. ``lam``, ``theta``, ``warps``).
    Returns a :class:`TuneResult`.
    """
    pairs = _check_pairs(pairs)
    names = {learnable} if isinstance(learnable, str) else set(learnable or ())
    if not names or not names <= {"lambda", "theta"}:
        raise ValueError(f"learnable: expected 'lambda', 'theta' or both, got {learnable!r}")
    t0 = time.perf_counter()
    model = NADMMRegistration(preset, data_term=data_term, order=order, learnable=learnable,
                              **overrides).to(_device(pairs))
    train, val = _split(pairs, val_pairs, seed)
    objective = _Objective(pairs, smoothness, ncc_window)
    grid = _scan_grid(scan, names)
    # The scan picks two numbers: all pairs serve it (validation pairs too; their check of the
    # descent then favours the scan's choice, a conservative bias).
    scanned = [] if grid == {} else _scan(model, pairs, objective.score, grid)
    history, best_epoch = fit(model, train, val, objective.loss, objective.score, epochs=epochs,
                              lr=lr, patience=patience, seed=seed, progress=progress)
    settings = _settings(model, preset, data_term, order, overrides)
    return TuneResult(
        settings=settings, history=history, best_epoch=best_epoch,
        val_start=history[0]["val_score"], val_best=history[best_epoch]["val_score"],
        time_s=time.perf_counter() - t0, scan=scanned,
    )


def _scan_grid(scan: object, names: set[str]) -> dict[str, tuple[float, ...]] | None:
    """The multipliers to scan per learnable name: ``None`` for the pattern search of
    ``scan=True``, ``{}`` for no scan, else the grid of the mapping."""
    if scan is True:
        return None
    if scan is False:
        return {}
    if not isinstance(scan, Mapping) or not set(scan) <= {"lam", "theta"}:
        raise ValueError(f"scan: expected True, False or a mapping with keys 'lam' / 'theta', "
                         f"got {scan!r}")
    out = {}
    for key, name in (("lam", "lambda"), ("theta", "theta")):
        values = tuple(scan.get(key, (1.0,))) if name in names else (1.0,)
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"scan[{key!r}]: expected positive finite numbers, got {values!r}")
        out[key] = values
    return out


@torch.no_grad()
def _scan(model: NADMMRegistration, pairs: Sequence, score,
          grid: dict | None = None) -> list[dict]:
    """Score global multipliers ``(a, b)`` of the learnable λ and θ (mean ``score`` over
    ``pairs``), leave ``model`` at the best and return the scored points, the given settings
    ``(1, 1)`` first (they win ties). ``grid``: every combination of its values; ``None``: a
    pattern search on the lattice of powers of :data:`SCAN_FACTOR` from ``(1, 1)``, moving to
    the best of the (up to eight, diagonals included: λ and θ often want to move together)
    neighbours while one improves, at most :data:`SCAN_MOVES` moves."""
    params = {key: getattr(model, attr) for key, attr in (("lam", "log_lam"),
                                                          ("theta", "log_theta"))
              if hasattr(model, attr)}
    start = {key: p.detach().clone() for key, p in params.items()}
    rows: dict[tuple[float, float], dict] = {}  # by rounded logs: 3 · (1/3) is 1 again

    def apply(point: tuple[float, float]) -> None:
        for key, mult in zip(("lam", "theta"), point, strict=True):
            if key in params:
                params[key].copy_(start[key] + math.log(mult))

    def visit(point: tuple[float, float]) -> dict:
        key_ = tuple(round(math.log(m), 9) for m in point)
        if key_ not in rows:
            apply(point)
            rows[key_] = dict(lam_mult=point[0], theta_mult=point[1],
                              score=_mean([score(model, p) for p in pairs]))
        return rows[key_]

    def best() -> dict:  # first visited wins ties: the start, then earlier points
        return max(rows.values(), key=lambda r: r["score"])

    visit((1.0, 1.0))
    if grid is not None:
        for point in sorted((a, b) for a in grid["lam"] for b in grid["theta"]):
            visit(point)
    else:
        ratios = (1 / SCAN_FACTOR, 1.0, SCAN_FACTOR)
        steps = [(da, db) for da in (ratios if "lam" in params else (1.0,))
                 for db in (ratios if "theta" in params else (1.0,)) if (da, db) != (1.0, 1.0)]
        centre = rows[(0.0, 0.0)]
        for _ in range(SCAN_MOVES):
            a, b = centre["lam_mult"], centre["theta_mult"]
            for da, db in steps:
                visit((a * da, b * db))
            if best() is centre:
                break
            centre = best()
    chosen = best()
    apply((chosen["lam_mult"], chosen["theta_mult"]))
    return list(rows.values())


def _settings(model: NADMMRegistration, preset, data_term, order, overrides) -> dict:
    """The model's settings as a settings-file document (learned values per level)."""
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items()}
    values = model.hyperparameters(torch.float64)
    for name in ("lam", "theta"):
        out[name] = [float(v.detach().flatten()[0]) for v in values[name]]
    for name in ("lam_scaling", "theta_scaling"):  # the units of the values above
        out[name] = getattr(model.config, name)
    return dict(format=SETTINGS_FORMAT, version=SETTINGS_VERSION, preset=preset,
                data_term=data_term, order=order, overrides=out,
                learned=sorted(model.learnable))


def _device(pairs: Sequence[TunePair]) -> torch.device:
    """The one device of every pair's tensors (where the model is trained)."""
    device = pairs[0].fixed.device
    for i, p in enumerate(pairs):
        for name in ("fixed", "moving", "fixed_labels", "moving_labels"):
            x = getattr(p, name)
            if x is not None:
                check_same_device(x, device, f"pairs[{i}].{name}", "pairs[0].fixed")
    return device


def _check_pairs(pairs: object) -> list[TunePair]:
    if not isinstance(pairs, Sequence) or isinstance(pairs, (str, bytes)) or not pairs:
        raise ValueError(f"pairs: expected a non-empty sequence of TunePair, got {pairs!r:.80}")
    for i, p in enumerate(pairs):
        if not isinstance(p, TunePair):
            raise TypeError(f"pairs[{i}]: expected a TunePair, got {type(p).__name__}")
        if p.fixed_labels is not None and p.moving_labels is None:
            raise ValueError(f"pairs[{i}]: fixed_labels without moving_labels")
    return list(pairs)
