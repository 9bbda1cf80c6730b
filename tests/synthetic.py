"""Synthetic data shared by the tests: smooth fields, blob images, small 2D pairs.

One copy of each builder (the tests and ``lightning_ddp_job.py`` import them from here); the
device / dtype fixtures are in ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

N_PAIRS = 6


def smooth_field(shape, amplitude, seed=0, dtype=torch.float32, zero_axes=()):
    """A smooth random displacement (B=1) with max |d| = amplitude (voxels)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, len(shape), *[4] * len(shape), generator=gen)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    d = torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    for a in zero_axes:
        d[:, a] = 0
    return (d * amplitude / d.abs().max()).to(dtype)


def blobs(shape, seed=0, dtype=torch.float64):
    """Smoothed uniform noise ``(1, 1, *shape)`` scaled to [0, 1]: textured, with no flat
    regions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=gen, dtype=dtype)
    k = 5
    pool = torch.nn.functional.avg_pool2d if len(shape) == 2 else torch.nn.functional.avg_pool3d
    for _ in range(2):
        x = pool(x, k, stride=1, padding=k // 2, count_include_pad=False)
    return (x - x.min()) / (x.max() - x.min())


def gaussian_blobs(centers: list[tuple[float, float]], n: int = 32, r: float = 4.0) -> Tensor:
    """Sum of Gaussian blobs ``(1, 1, n, n)`` (smooth, values in 0…~1)."""
    y, x = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")
    img = torch.zeros(n, n)
    for cy, cx in centers:
        img = img + torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    return img[None, None]


def blob_labels(centers: list[tuple[float, float]], n: int = 32, r: float = 4.0) -> Tensor:
    """Label ``k + 1`` inside radius ``1.2 r`` of blob ``k`` (later blobs win): ``(1, 1, n, n)``."""
    y, x = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")
    lab = torch.zeros(n, n, dtype=torch.int64)
    for k, (cy, cx) in enumerate(centers):
        lab[(y - cy) ** 2 + (x - cx) ** 2 <= (1.2 * r) ** 2] = k + 1
    return lab[None, None]


def synthetic_pair(seed: int, n: int = 32) -> dict:
    """Two blobs in ``fixed``; in ``moving`` each moved by a random shift of up to 2.5 voxels
    (a known smooth motion). Returns ``fixed``, ``moving``, ``fixed_labels``, ``moving_labels``
    ``(1, 1, n, n)`` and ``pair_id``."""
    g = torch.Generator().manual_seed(seed)
    c = [(0.35 * n, 0.35 * n), (0.62 * n, 0.66 * n)]
    c = [(cy + float(torch.rand((), generator=g)) * 2 - 1, cx) for cy, cx in c]
    shift = (torch.rand(len(c), 2, generator=g) * 5 - 2.5).tolist()
    cm = [(cy + sy, cx + sx) for (cy, cx), (sy, sx) in zip(c, shift, strict=True)]
    return dict(
        fixed=gaussian_blobs(c, n), moving=gaussian_blobs(cm, n), fixed_labels=blob_labels(c, n),
        moving_labels=blob_labels(cm, n), pair_id=f"pair{seed:02d}",
    )  # fmt: skip


def synthetic_dataset(count: int = N_PAIRS, n: int = 32, spacing=(1.0, 1.0)):
    """A ``tio.SubjectsDataset`` of :func:`synthetic_pair` subjects ``pair00`` … ."""
    import torchio as tio

    from nadmm_torch.data.pairs import pair_subject

    subjects = []
    for i in range(count):
        p = synthetic_pair(i, n)
        subjects.append(
            pair_subject(p["fixed"], p["moving"], p["fixed_labels"], p["moving_labels"],
                         spacing, p["pair_id"])
        )
    return tio.SubjectsDataset(subjects)


def small_nadmm(**kw):
    """A tiny NADMM layer (2 levels, 3 ADMM iterations, 2 warps) for tests."""
    from nadmm_torch import NADMMRegistration

    cfg = dict(levels=2, iterations=(3, 3), warps=(2, 2))
    cfg.update(kw)
    return NADMMRegistration("fast", **cfg)


def sine_image(shape) -> Tensor:
    """A deterministic smooth image ``(1, 1, *shape)`` (sines and a product of the axes)."""
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    img = sum(np.sin((3 + 2 * k) * a + k) for k, a in enumerate(axes)) + np.prod(axes, axis=0)
    return torch.tensor(img, dtype=torch.float32)[None, None]


def sine_field(shape, amplitude=(0.6, 2.5, -2.0)) -> Tensor:
    """A deterministic smooth displacement ``(1, ndim, *shape)``: component ``i`` is
    ``amplitude[i]`` times a product of sines of two other axes."""
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    comps = []
    for i, amp in enumerate(amplitude[-len(shape):]):
        a, b = axes[(i + 1) % len(shape)], axes[(i + 2) % len(shape)]
        comps.append(amp * np.sin(np.pi * a) * np.sin(2 * np.pi * b + 0.3 * i))
    return torch.tensor(np.stack(comps), dtype=torch.float32)[None]


def brain2d_subject(shift: float) -> tuple[np.ndarray, np.ndarray]:
    """A 32 × 32 stand-in for a brain2d slice: two nested discs (raw-scanner-like intensities)
    and their labels (a cortical id ≥ 1000 outside, a subcortical one inside), shifted."""
    y, x = np.mgrid[0:32, 0:32].astype(np.float32)
    r = np.hypot(y - 16 - shift, x - 16 + shift / 2)
    image = (np.where(r < 10, 800.0, 0.0) + np.where(r < 5, 600.0, 0.0)).astype(np.float32)
    labels = (np.where(r < 10, 1002, 0) + np.where(r < 5, 4 - 1002, 0)).astype(np.int64)
    return image, labels


def brain2d_folder(tmp_path: Path, subjects: dict) -> tuple[Path, Path]:
    """A brain2d ``data`` folder (``images/``, ``labels/``: empty files, only their names are
    read) and an affine-stage ``cache`` filled with every ordered pair of ``subjects``
    (``{id: (image, labels)}``), as ``benchmarks/brain2d.py`` would have written it."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    for sub in ("images", "labels"):
        (data / sub).mkdir(parents=True)
    cache.mkdir()
    for sid in subjects:
        (data / "images" / f"{sid}_slice1.nii.gz").touch()
        (data / "labels" / f"{sid}_labels_slice1.nii.gz").touch()
    for m, (mi, ml) in subjects.items():
        for f, (fi, fl) in subjects.items():
            if m != f:
                np.savez(cache / f"{m}__to__{f}.npz", fixed=fi, moving=mi, fixed_labels=fl,
                         moving_labels=ml, seconds=np.float64(0.0))
    return data, cache
