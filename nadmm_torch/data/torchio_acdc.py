"""TorchIO pipeline for registration pairs: ACDC ES→ED subjects, augmentation, collate.

Each pair is a ``tio.Subject`` with ``fixed`` / ``moving`` (``tio.ScalarImage``),
``fixed_labels`` / ``moving_labels`` (``tio.LabelMap``, optional for synthetic pairs) and the
plain attributes ``pair_id`` (the patient for ACDC), ``group``. ACDC subjects are built with
:func:`nadmm_torch.data.acdc.load_pair`, so the preprocessing is the protocol's exactly
(1.5 mm in-plane, 128 × 128 crop), and converted with :func:`nadmm_torch.io.to_torchio` on a
grid with the protocol spacing (identity direction, zero origin): TorchIO holds
``(1, X, Y, Z)``, :func:`collate_pairs` gives back this package's ``(B, 1, Z, Y, X)``.

Augmentation (:func:`pair_augmentation`), and why:

* intensity (``RandomGamma`` then ``RandomNoise``, scalar images only): TorchIO draws the
  parameters **per image**, so fixed and moving get different gamma / noise, like two
  acquisitions; labels are untouched;
* spatial (``RandomAffine``, off by default): TorchIO draws **one** transform per subject and
  applies it to all four images, so the pair stays a valid ES→ED pair (its motion is only
  conjugated by the affine) and the labels stay aligned with their images. Rotations are
  in-plane only and there is no scaling across slices, since ACDC's slice axis is 5–10 mm
  thick. A transform drawn separately for fixed and moving would invent motion that the
  labels could not follow, so it is not offered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchio as tio
from torch import Tensor

from ..io import Geometry, from_torchio, to_torchio
from .acdc import load_pair, read_pairs, split

__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "pair_subject",
    "acdc_subject",
    "acdc_patients",
    "acdc_subjects_dataset",
    "pair_augmentation",
    "collate_pairs",
]

IMAGE_KEYS = ("fixed", "moving")
LABEL_KEYS = ("fixed_labels", "moving_labels")


def pair_subject(
    fixed: Tensor,
    moving: Tensor,
    fixed_labels: Tensor | None = None,
    moving_labels: Tensor | None = None,
    spacing: Sequence[float] | None = None,
    pair_id: str = "",
    group: str = "",
) -> tio.Subject:
    """A registration pair as a ``tio.Subject`` (any data, e.g. synthetic 2D pairs).

    Args:
        fixed, moving: ``(1, 1, *S)`` images, ``S`` 2D ``(H, W)`` or 3D ``(Z, Y, X)``.
        fixed_labels, moving_labels: ``(1, 1, *S)`` integer maps, both or neither.
        spacing: ``len(S)`` spacings in array order (mm); default 1.
        pair_id: identifier kept in the subject (and in :func:`collate_pairs`' output).
        group: free text (ACDC: the pathology group).
    """
    if fixed.dim() not in (4, 5) or fixed.shape[:2] != (1, 1) or fixed.shape != moving.shape:
        raise ValueError(
            f"fixed/moving: expected two (1, 1, *S) images, got {tuple(fixed.shape)} and "
            f"{tuple(moving.shape)}"
        )
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("fixed_labels/moving_labels: give both or neither")
    geometry = Geometry.default(fixed.shape[2:], spacing)
    images: dict = {
        "fixed": to_torchio(fixed, geometry),
        "moving": to_torchio(moving, geometry),
    }
    if fixed_labels is not None:
        for key, lab in zip(LABEL_KEYS, (fixed_labels, moving_labels), strict=True):
            if lab.shape != fixed.shape or lab.is_floating_point():
                raise ValueError(
                    f"{key}: expected an integer map of shape {tuple(fixed.shape)}, got "
                    f"{lab.dtype} {tuple(lab.shape)}"
                )
            images[key] = to_torchio(lab, geometry, label=True)
    return tio.Subject(**images, pair_id=str(pair_id), group=str(group))


def acdc_subject(data_dir: str | Path, patient: str | int) -> tio.Subject:
    """One patient's ES→ED pair (protocol steps 1–3) as a ``tio.Subject``.

    Images ``(1, 128, 128, Z)`` in TorchIO's ``(C, X, Y, Z)``; spacing ``(1.5, 1.5, s_z)``
    there, ``(s_z, 1.5, 1.5)`` in array order after :func:`collate_pairs`.
    """
    p = load_pair(data_dir, patient)
    return pair_subject(
        p.fixed, p.moving, p.fixed_labels, p.moving_labels, p.spacing, p.patient, p.group
    )


def acdc_patients(data_dir: str | Path, which: str | Sequence[str] = "tune") -> list[str]:
    """Patient ids: ``"tune"`` / ``"report"`` (the protocol split), ``"all"``, or a list."""
    if not isinstance(which, str):
        return [str(p) for p in which]
    rows = read_pairs(data_dir)
    if which == "all":
        return [r["patient"] for r in rows]
    tune, report = split(rows)
    if which == "tune":
        return tune
    if which == "report":
        return report
    raise ValueError(f"which: expected 'tune', 'report', 'all' or a list of ids, got {which!r}")


def acdc_subjects_dataset(
    data_dir: str | Path,
    patients: str | Sequence[str] = "tune",
    transform: Callable[[tio.Subject], tio.Subject] | None = None,
) -> tio.SubjectsDataset:
    """A ``tio.SubjectsDataset`` of ACDC pairs (loaded now: about 2.6 MB per pair).

    Args:
        data_dir: folder with ``pairs.csv`` (e.g. ``shared/data/acdc``).
        patients: see :func:`acdc_patients`.
        transform: applied on every access, e.g. :func:`pair_augmentation` for training.

    Use with ``torch.utils.data.DataLoader(..., collate_fn=collate_pairs)``.
    """
    subjects = [acdc_subject(data_dir, p) for p in acdc_patients(data_dir, patients)]
    return tio.SubjectsDataset(subjects, transform=transform)


def pair_augmentation(
    intensity: bool = True,
    spatial: bool = False,
    gamma: float = 0.3,
    noise_std: float = 0.02,
    degrees: float = 10.0,
    scale: float = 0.1,
    translation: float = 5.0,
) -> tio.Compose:
    """Training augmentation for pairs (see the module docstring for the choices).

    Args:
        intensity: ``RandomGamma(log_gamma=±gamma)`` then ``RandomNoise(std=noise_std)``
            (images in 0…1; gamma first since it needs non-negative values), drawn per image.
        spatial: ``RandomAffine`` drawn once per subject: in-plane rotation ``±degrees``,
            in-plane scaling ``1 ± scale``, in-plane translation ``±translation`` mm.
    """
    ts: list = []
    if spatial:
        ts.append(
            tio.RandomAffine(
                scales=(1 - scale, 1 + scale, 1 - scale, 1 + scale, 1, 1),
                degrees=(0, 0, 0, 0, -degrees, degrees),
                translation=(-translation, translation, -translation, translation, 0, 0),
                default_pad_value=0.0,
            )
        )
    if intensity:
        ts += [
            tio.RandomGamma(log_gamma=(-gamma, gamma), include=list(IMAGE_KEYS)),
            tio.RandomNoise(std=(0, noise_std), include=list(IMAGE_KEYS)),
        ]
    return tio.Compose(ts)


def collate_pairs(batch: Sequence[tio.Subject]) -> dict:
    """Stack subjects of one grid into tensors in this package's array order.

    Returns:
        dict with ``fixed``, ``moving`` ``(B, 1, *S)`` float32; ``fixed_labels``,
        ``moving_labels`` ``(B, 1, *S)`` int64 (if every subject has them); ``spacing``
        ``(B, ndim)`` float64 (array order, mm); ``pair_id``, ``group``: lists of str.
        2D subjects (TorchIO ``(1, W, H, 1)``) give ``S = (H, W)``.
    """
    if not batch:
        raise ValueError("collate_pairs: empty batch")
    out: dict = {}
    spacing = []
    keys = list(IMAGE_KEYS)
    if all(all(k in s for k in LABEL_KEYS) for s in batch):
        keys += list(LABEL_KEYS)
    for key in keys:
        tensors = []
        for s in batch:
            t, geo = from_torchio(s[key])
            tensors.append(t)
            if key == "fixed":
                spacing.append(geo.array_spacing)
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"collate_pairs: {key} shapes differ in the batch: {sorted(shapes)}")
        out[key] = torch.cat(tensors, dim=0)
    out["spacing"] = torch.tensor(spacing, dtype=torch.float64)
    out["pair_id"] = [str(s.get("pair_id", "")) for s in batch]
    out["group"] = [str(s.get("group", "")) for s in batch]
    return out
