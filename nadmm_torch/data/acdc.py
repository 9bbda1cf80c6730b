"""The ACDC ES→ED evaluation protocol (``docs/protocols.md``).

Data layout: a folder with ``pairs.csv`` (``patient, group, ed_frame, es_frame, spacing_z_mm,
spacing_y_mm, spacing_x_mm, ed_file, es_file``) and the HDF5 volumes it names (datasets
``image`` float32 in 0…1 and ``label`` uint8, both ``(Z, Y, X)``).

Protocol, implemented by :func:`preprocess_pair` / :func:`load_pair`:

1. moving = ES image, fixed = ED image of the same patient;
2. both resampled to 1.5 mm in-plane (image linear, label nearest), slice axis untouched; new
   in-plane size ``round(old size × old spacing / 1.5)``. The resampling keeps the first voxel
   centre in place (physical-space resampling with the origin preserved, as
   ``SimpleITK.Resample`` with the input origin and a 1.5 mm output spacing does): output
   voxel ``j`` samples the input at index ``j * 1.5 / old_spacing``; samples beyond half a
   voxel outside the input are 0;
3. crop / zero-pad in-plane to 128 × 128 centred on the rounded centroid ``c`` of the
   resampled ED foreground (label > 0): output index ``k`` is input index ``c - 64 + k``.
   Result ``(Z, 128, 128)``, spacing ``(s_z, 1.5, 1.5)`` mm.
4. :func:`evaluate_pair` scores a displacement (voxel units, pull-back, ``(1, 3, Z, 128, 128)``):
   ES labels warped by argmax of the warped one-hot (:func:`nadmm_torch.warp_labels`),
   Dice per structure (RV 1, Myo 2, LV 3) and their mean; slice-wise Hausdorff distance
   (mm, in-plane) per structure and pooled over all (structure, slice) pairs where both masks
   have the structure (the pair's ``hd``); % of voxels with ``det(I + ∇d) <= 0``.

With these choices the unregistered Dice over the 80 pairs of the project folder is
0.603 ± 0.112 (population sd; RV/Myo/LV .633/.522/.654) and the Hausdorff distance 12.14 mm,
the protocol's reference fingerprint; label resampling matches ``SimpleITK.Resample`` exactly.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from ..api import warp_labels
from ..checks import check_choice, check_spacing, check_tensor
from ..metrics import dice, fold_percent, hausdorff_slices

__all__ = [
    "TARGET_SPACING",
    "CROP_SIZE",
    "LABELS",
    "STRUCTURES",
    "ACDCPair",
    "read_acdc_pairs",
    "load_volume",
    "resample_inplane",
    "crop_or_pad",
    "foreground_centre",
    "preprocess_pair",
    "load_pair",
    "split",
    "evenly_spaced",
    "evaluate_pair",
    "acdc_evaluator",
    "summarize",
]

TARGET_SPACING = 1.5
CROP_SIZE = 128
LABELS = (1, 2, 3)
STRUCTURES = ("rv", "myo", "lv")


@dataclass
class ACDCPair:
    """One ES→ED pair after protocol steps 1–3.

    Attributes:
        fixed: ED image ``(1, 1, Z, 128, 128)`` float32.
        moving: ES image, same shape.
        fixed_labels: ED labels ``(1, 1, Z, 128, 128)`` int64 (0 bg, 1 RV, 2 Myo, 3 LV).
        moving_labels: ES labels, same.
        spacing: ``(s_z, 1.5, 1.5)`` mm, in the order of the spatial axes.
        patient: e.g. ``"patient001"``.
        group: ``DCM``, ``HCM``, ``MINF``, ``NOR`` or ``RV`` (may be empty if unknown).
    """

    fixed: Tensor
    moving: Tensor
    fixed_labels: Tensor
    moving_labels: Tensor
    spacing: tuple[float, float, float]
    patient: str
    group: str = ""

    def to(self, device: torch.device | str) -> ACDCPair:
        """A copy with the four tensors on ``device``."""
        return ACDCPair(
            self.fixed.to(device),
            self.moving.to(device),
            self.fixed_labels.to(device),
            self.moving_labels.to(device),
            self.spacing,
            self.patient,
            self.group,
        )


def _data_dir(data_dir: str | Path) -> Path:
    d = Path(data_dir)
    if not (d / "pairs.csv").is_file():
        raise ValueError(f"data_dir: expected a folder holding pairs.csv, got {str(d)!r}")
    return d


def read_acdc_pairs(data_dir: str | Path) -> list[dict]:
    """Rows of ``data_dir/pairs.csv`` as dicts, sorted by patient.

    Types: ``patient``, ``group``, ``ed_file``, ``es_file`` (paths relative to ``data_dir``)
    are str; ``ed_frame``, ``es_frame`` int; ``spacing_z_mm``, ``spacing_y_mm``,
    ``spacing_x_mm`` float.
    """
    d = _data_dir(data_dir)
    rows = []
    with open(d / "pairs.csv", newline="") as f:
        for r in csv.DictReader(f):
            row = dict(r)
            for k in ("ed_frame", "es_frame"):
                if k in row and row[k] not in (None, ""):
                    row[k] = int(row[k])
            for k in ("spacing_z_mm", "spacing_y_mm", "spacing_x_mm"):
                row[k] = float(row[k])
            row.setdefault("group", "")
            rows.append(row)
    return sorted(rows, key=lambda r: r["patient"])


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32 (Z, Y, X), label uint8 (Z, Y, X))`` from an ACDC HDF5 file."""
    with h5py.File(path, "r") as f:
        image = np.asarray(f["image"][()], dtype=np.float32)
        label = np.asarray(f["label"][()], dtype=np.uint8)
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(
            f"{path}: expected image and label (Z, Y, X) arrays of one shape, got "
            f"{image.shape} and {label.shape}"
        )
    return image, label


def _axis_coords(n_in: int, spacing_in: float, spacing_out: float) -> tuple[np.ndarray, int]:
    n_out = int(round(n_in * spacing_in / spacing_out))
    return np.arange(n_out, dtype=np.float64) * (spacing_out / spacing_in), n_out


def resample_inplane(
    volume: np.ndarray,
    spacing_yx: Sequence[float],
    order: int,
    target: float = TARGET_SPACING,
) -> np.ndarray:
    """Resample the last two axes of ``(Z, Y, X)`` to ``target`` mm (protocol step 2).

    Output voxel ``j`` along an axis samples the input at index ``j * target / spacing``
    (origin kept), size ``round(n * spacing / target)``. ``order=1``: linear (clamped at the
    border), ``order=0``: nearest (index ``floor(c + 0.5)``). Samples more than half a voxel
    beyond the last input voxel are 0.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume: expected a (Z, Y, X) array, got shape {volume.shape}")
    check_choice(order, "order", (0, 1))  # 0 nearest, 1 linear
    spacing_yx = check_spacing(spacing_yx, 2)
    out = volume
    for axis, sp in zip((1, 2), spacing_yx, strict=True):
        n = out.shape[axis]
        c, _ = _axis_coords(n, float(sp), target)
        inside = c <= n - 0.5
        if order == 0:
            idx = np.minimum(np.floor(c + 0.5).astype(np.int64), n - 1)
            res = np.take(out, idx, axis=axis)
        else:
            lo = np.minimum(np.floor(c).astype(np.int64), n - 1)
            hi = np.minimum(lo + 1, n - 1)
            fr = (c - lo).clip(0.0, 1.0)
            shape = [1, 1, 1]
            shape[axis] = len(c)
            fr = fr.reshape(shape)
            a, b = np.take(out, lo, axis=axis), np.take(out, hi, axis=axis)
            res = (a * (1.0 - fr) + b * fr).astype(volume.dtype)
        mask_shape = [1, 1, 1]
        mask_shape[axis] = len(c)
        out = np.where(inside.reshape(mask_shape), res, np.zeros((), volume.dtype))
    return np.ascontiguousarray(out.astype(volume.dtype))


def foreground_centre(label: np.ndarray) -> tuple[int, int]:
    """Rounded in-plane centroid ``(y, x)`` of ``label > 0`` in a ``(Z, Y, X)`` label map.

    Rounding is half away from zero (``floor(c + 0.5)``); an empty map gives the grid centre.
    """
    idx = np.argwhere(label > 0)
    if len(idx) == 0:
        return label.shape[1] // 2, label.shape[2] // 2
    c = idx[:, 1:].mean(0)
    return int(math.floor(c[0] + 0.5)), int(math.floor(c[1] + 0.5))


def crop_or_pad(volume: np.ndarray, centre: Sequence[int], size: int = CROP_SIZE) -> np.ndarray:
    """In-plane crop / zero-pad of ``(Z, Y, X)`` to ``(Z, size, size)``.

    Output index ``k`` along y (x) is input index ``centre - size // 2 + k``; outside the
    input the output is 0.
    """
    z, h, w = volume.shape
    out = np.zeros((z, size, size), dtype=volume.dtype)
    y0, x0 = int(centre[0]) - size // 2, int(centre[1]) - size // 2
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + size, h), min(x0 + size, w)
    if ye > ys and xe > xs:
        out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = volume[:, ys:ye, xs:xe]
    return out


def preprocess_pair(
    ed_image: np.ndarray,
    ed_label: np.ndarray,
    es_image: np.ndarray,
    es_label: np.ndarray,
    spacing_zyx: Sequence[float],
    patient: str = "",
    group: str = "",
) -> ACDCPair:
    """Protocol steps 1–3 on native ``(Z, Y, X)`` ED/ES arrays with spacing ``(s_z, s_y, s_x)``."""
    if len(spacing_zyx) != 3:
        raise ValueError(f"spacing_zyx: expected 3 values, got {spacing_zyx!r}")
    sp_yx = (float(spacing_zyx[1]), float(spacing_zyx[2]))
    ed_i = resample_inplane(ed_image.astype(np.float32), sp_yx, order=1)
    es_i = resample_inplane(es_image.astype(np.float32), sp_yx, order=1)
    ed_l = resample_inplane(ed_label.astype(np.uint8), sp_yx, order=0)
    es_l = resample_inplane(es_label.astype(np.uint8), sp_yx, order=0)
    c = foreground_centre(ed_l)

    def img(a: np.ndarray) -> Tensor:
        return torch.from_numpy(crop_or_pad(a, c)).float()[None, None]

    def lab(a: np.ndarray) -> Tensor:
        return torch.from_numpy(crop_or_pad(a, c).astype(np.int64))[None, None]

    return ACDCPair(
        fixed=img(ed_i),
        moving=img(es_i),
        fixed_labels=lab(ed_l),
        moving_labels=lab(es_l),
        spacing=(float(spacing_zyx[0]), TARGET_SPACING, TARGET_SPACING),
        patient=patient,
        group=group,
    )


def _patient_id(patient: str | int) -> str:
    if isinstance(patient, int):
        return f"patient{patient:03d}"
    return str(patient)


def load_pair(data_dir: str | Path, patient: str | int) -> ACDCPair:
    """Load one patient's ES→ED pair from ``data_dir`` and apply protocol steps 1–3.

    Args:
        data_dir: folder with ``pairs.csv`` and the volumes it names.
        patient: ``"patient001"`` or ``1``.
    """
    d = _data_dir(data_dir)
    pid = _patient_id(patient)
    rows = [r for r in read_acdc_pairs(d) if r["patient"] == pid]
    if not rows:
        raise ValueError(f"patient {pid!r} is not in {d / 'pairs.csv'}")
    r = rows[0]
    ed_image, ed_label = load_volume(d / r["ed_file"])
    es_image, es_label = load_volume(d / r["es_file"])
    return preprocess_pair(
        ed_image,
        ed_label,
        es_image,
        es_label,
        (r["spacing_z_mm"], r["spacing_y_mm"], r["spacing_x_mm"]),
        patient=pid,
        group=r.get("group", ""),
    )


def split(
    patients: Sequence[Mapping[str, str]] | Mapping[str, str],
    n_report_per_group: int = 4,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Fixed tuning / reporting split, stratified by group.

    For each group (sorted), its patient IDs are sorted and ``n_report_per_group`` of them are
    drawn with ``random.Random(f"acdc-split-{seed}-{group}")`` (string seeds are hashed with
    SHA-512, so the draw is the same on every platform and Python ≥ 3.2) for the report set;
    the rest are for tuning. On the 80 patients of the project folder (16 per group) this gives
    60 tune / 20 report, the report set being patients 001, 011, 017, 019 (DCM), 023, 028,
    029, 032 (HCM), 044, 047, 049, 051 (MINF), 063, 067, 068, 069 (NOR), 082, 083, 088, 094
    (RV).

    Args:
        patients: rows of :func:`read_acdc_pairs` (dicts with ``patient`` and ``group``) or a
            mapping ``patient -> group``.
        n_report_per_group: report patients per group (all of a group if it has fewer).
        seed: split seed (0 is the project's split).

    Returns:
        ``(tune, report)``: sorted patient IDs.
    """
    if isinstance(patients, Mapping):
        groups = {str(p): str(g) for p, g in patients.items()}
    else:
        try:
            groups = {str(r["patient"]): str(r.get("group", "")) for r in patients}
        except (TypeError, KeyError) as e:
            raise ValueError(
                "patients: expected rows with 'patient' and 'group' keys or a mapping "
                f"patient -> group, got {type(patients).__name__}"
            ) from e
    if n_report_per_group < 0:
        raise ValueError(f"n_report_per_group: expected >= 0, got {n_report_per_group}")
    report: list[str] = []
    for g in sorted(set(groups.values())):
        ids = sorted(p for p, gg in groups.items() if gg == g)
        rng = random.Random(f"acdc-split-{seed}-{g}")
        report += rng.sample(ids, min(n_report_per_group, len(ids)))
    report_set = set(report)
    tune = sorted(p for p in groups if p not in report_set)
    return tune, sorted(report)


def evenly_spaced(ids: Sequence[str], n: int | None) -> list[str]:
    """``n`` IDs spread evenly over the sorted ``ids`` (all if ``n`` is None or >= len).

    The tuning scripts use it to take a stratified-looking subset of the tuning split (sorted
    IDs run through the groups in order).
    """
    ids = sorted(ids)
    if n is None or n >= len(ids):
        return ids
    step = len(ids) / n
    return [ids[int(i * step)] for i in range(n)]


def summarize(records: Sequence[Mapping]) -> dict:
    """Aggregate per-pair records of :func:`evaluate_pair` (plus optional ``seconds``).

    Returns ``dice_mean, dice_sd`` (mean and population sd over pairs of the per-pair mean
    Dice, as in the protocol's reference table), ``dice_rv, dice_myo, dice_lv``, ``hd_mean``
    (mean over pairs of the pooled per-pair HD), ``fold_percent_mean``, ``seconds_mean``
    (NaN if absent) and ``n_pairs``. Means skip NaN values; an empty input gives NaN.
    """

    def mean(key: str) -> float:
        v = np.array([float(r.get(key, math.nan)) for r in records], dtype=np.float64)
        v = v[~np.isnan(v)]
        return float(v.mean()) if len(v) else math.nan

    d = np.array([float(r["dice"]) for r in records], dtype=np.float64)
    d = d[~np.isnan(d)]
    return {
        "dice_mean": float(d.mean()) if len(d) else math.nan,
        "dice_sd": float(d.std()) if len(d) else math.nan,
        "dice_rv": mean("dice_rv"),
        "dice_myo": mean("dice_myo"),
        "dice_lv": mean("dice_lv"),
        "hd_mean": mean("hd"),
        "fold_percent_mean": mean("fold_percent"),
        "seconds_mean": mean("seconds"),
        "n_pairs": len(records),
    }


@torch.no_grad()
def evaluate_pair(pair: ACDCPair, displacement: Tensor | None) -> dict:
    """Protocol step 4 for one pair and one ES→ED displacement.

    Args:
        pair: output of :func:`load_pair`.
        displacement: ``(1, 3, Z, 128, 128)`` in voxel units, pull-back
            (``warped(x) = moving(x + d(x))``); ``None`` means the identity (unregistered).

    Returns:
        dict with ``dice_rv, dice_myo, dice_lv, dice`` (mean of the three), ``hd_rv, hd_myo,
        hd_lv`` (mean over slices, mm), ``hd`` (mean over all qualifying (structure, slice)
        pairs, mm) and ``fold_percent`` (% voxels with det(I + ∇d) <= 0; 0 for None), as
        Python floats.
    """
    fixed_labels = pair.fixed_labels
    moving_labels = pair.moving_labels
    if displacement is None:
        warped = moving_labels
        folds = 0.0
    else:
        expected = (1, fixed_labels.dim() - 2, *fixed_labels.shape[2:])
        if tuple(check_tensor(displacement, "displacement").shape) != expected:
            raise ValueError(
                f"displacement: expected shape {expected}, got {tuple(displacement.shape)}"
            )
        disp = displacement.detach().to(torch.float32)
        warped = warp_labels(moving_labels.to(disp.device), disp)
        folds = float(fold_percent(disp)[0])
    warped = warped.to(fixed_labels.device)
    d = dice(warped, fixed_labels, LABELS)[0]
    hd_all = hausdorff_slices(warped, fixed_labels, pair.spacing, LABELS, reduction="none")[0]
    rec: dict = {}
    for name, v in zip(STRUCTURES, d.tolist(), strict=True):
        rec[f"dice_{name}"] = v
    rec["dice"] = float(np.nanmean(d.cpu().numpy()))
    for name, row in zip(STRUCTURES, hd_all, strict=True):
        vals = row[~torch.isnan(row)]
        rec[f"hd_{name}"] = float(vals.mean()) if len(vals) else math.nan
    pooled = hd_all[~torch.isnan(hd_all)]
    rec["hd"] = float(pooled.mean()) if len(pooled) else math.nan
    rec["fold_percent"] = folds
    return rec


def acdc_evaluator(item: Mapping, displacement: Tensor) -> dict:
    """:func:`evaluate_pair` as an evaluator of
    :class:`nadmm_torch.lightning.RegistrationLightningModule` (``evaluate=acdc_evaluator``).

    ``item``: one pair of a collated batch (``fixed``, ``moving``, ``fixed_labels``,
    ``moving_labels`` ``(1, 1, Z, 128, 128)``, ``spacing`` (array order, mm), ``pair_id``);
    ``displacement``: ``(1, 3, Z, 128, 128)``.
    """
    missing = [k for k in ("fixed_labels", "moving_labels", "spacing") if item.get(k) is None]
    if missing:
        raise ValueError(f"item: the ACDC protocol needs {', '.join(missing)} in the batch")
    pair = ACDCPair(
        item["fixed"], item["moving"], item["fixed_labels"], item["moving_labels"],
        tuple(item["spacing"]), str(item.get("pair_id", "")),
    )  # fmt: skip
    return evaluate_pair(pair, displacement)
