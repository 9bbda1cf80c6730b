"""Fixtures shared by the tests: the devices and floating dtypes to run on.

Synthetic data builders are plain functions in :mod:`tests.synthetic` (also imported by the
``lightning_ddp_job.py`` script, which runs outside pytest).
"""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every device here: the CPU, and the first CUDA device where there is one."""
    return torch.device(request.param)


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request) -> torch.dtype:
    """The floating dtypes computed as given (float32, float64)."""
    return request.param
