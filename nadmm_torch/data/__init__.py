"""Data sets and evaluation protocols: ACDC ES→ED (:mod:`.acdc`), the bundled sample, and
registration pairs as TorchIO subjects (:mod:`.pairs`, :mod:`.torchio_acdc`; need TorchIO)."""

from .acdc import (
    ACDCPair,
    acdc_evaluator,
    evaluate_pair,
    load_pair,
    load_volume,
    read_acdc_pairs,
    split,
    summarize,
)
from .sample import load_sample

__all__ = [
    "ACDCPair",
    "evaluate_pair",
    "acdc_evaluator",
    "load_pair",
    "load_volume",
    "read_acdc_pairs",
    "split",
    "summarize",
    "load_sample",
]
