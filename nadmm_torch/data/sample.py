"""The bundled ACDC sample pair (``nadmm_torch/sample/``), already through protocol steps 1–3."""

from __future__ import annotations

import io
from importlib import resources

import numpy as np
import torch

from .acdc import ACDCPair

__all__ = ["SAMPLE_FILE", "load_sample"]

SAMPLE_FILE = "acdc_patient037.npz"


def load_sample() -> ACDCPair:
    """The bundled ES→ED pair as an :class:`ACDCPair` (``(1, 1, Z, 128, 128)`` tensors).

    Images are stored as float16 and returned as float32; labels are returned as int64.
    See ``nadmm_torch/sample/README.md`` for the source and licence.
    """
    data = resources.files("nadmm_torch").joinpath("sample", SAMPLE_FILE).read_bytes()
    with np.load(io.BytesIO(data)) as z:
        fixed = torch.from_numpy(z["fixed"].astype(np.float32))[None, None]
        moving = torch.from_numpy(z["moving"].astype(np.float32))[None, None]
        fixed_labels = torch.from_numpy(z["fixed_labels"].astype(np.int64))[None, None]
        moving_labels = torch.from_numpy(z["moving_labels"].astype(np.int64))[None, None]
        spacing = tuple(float(s) for s in z["spacing"])
        patient = str(z["patient"])
        group = str(z["group"])
    return ACDCPair(fixed, moving, fixed_labels, moving_labels, spacing, patient, group)
