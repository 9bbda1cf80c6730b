"""TorchIO pipeline for ACDC ES→ED pairs: subjects, data sets, augmentation.

Each pair is a subject of :func:`nadmm_torch.data.pairs.pair_subject` (``pair_id`` is the
patient, ``group`` the pathology group), batched by
:func:`nadmm_torch.data.pairs.collate_pairs`. ACDC subjects are built with
:func:`nadmm_torch.data.acdc.load_pair`, so the preprocessing is the protocol's exactly
(1.5 mm in-plane, 128 × 128 crop), and converted with :func:`nadmm_torch.io.to_torchio` on a
grid with the protocol spacing (identity direction, zero origin): TorchIO holds
``(1, X, Y, Z)``, the collated batch this package's ``(B, 1, Z, Y, X)``.

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

import torchio as tio

from .acdc import load_pair, read_acdc_pairs, split
from .pairs import IMAGE_KEYS, pair_subject

__all__ = [
    "acdc_subject",
    "acdc_patients",
    "acdc_subjects_dataset",
    "pair_augmentation",
]


def acdc_subject(data_dir: str | Path, patient: str | int) -> tio.Subject:
    """One patient's ES→ED pair (protocol steps 1–3) as a ``tio.Subject``.

    Images ``(1, 128, 128, Z)`` in TorchIO's ``(C, X, Y, Z)``; spacing ``(1.5, 1.5, s_z)``
    there, ``(s_z, 1.5, 1.5)`` in array order once collated.
    """
    p = load_pair(data_dir, patient)
    return pair_subject(
        p.fixed, p.moving, p.fixed_labels, p.moving_labels, p.spacing, p.patient, p.group
    )


def acdc_patients(data_dir: str | Path, which: str | Sequence[str] = "tune") -> list[str]:
    """Patient ids: ``"tune"`` / ``"report"`` (the protocol split), ``"all"``, or a list."""
    if not isinstance(which, str):
        return [str(p) for p in which]
    rows = read_acdc_pairs(data_dir)
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

    Use with ``torch.utils.data.DataLoader(..., collate_fn=nadmm_torch.data.pairs.collate_pairs)``.
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
