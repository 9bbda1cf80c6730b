"""Data sets and evaluation protocols: ACDC ES→ED (:mod:`.acdc`) and the bundled sample."""

from .acdc import ACDCPair, evaluate_pair, load_pair, load_volume, read_pairs, split, summarize
from .sample import load_sample

__all__ = [
    "ACDCPair",
    "evaluate_pair",
    "load_pair",
    "load_volume",
    "read_pairs",
    "split",
    "summarize",
    "load_sample",
]
