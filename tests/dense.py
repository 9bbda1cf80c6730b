"""Dense reference operators for small grids (independent of the package's spectral code)."""

from __future__ import annotations

import numpy as np


def second_difference(n: int, boundary: str) -> np.ndarray:
    """1-D ``−∂²`` as a dense matrix: periodic (circulant) or Neumann (mirrored ends)."""
    m = 2.0 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    if boundary == "periodic":
        m[0, -1] -= 1.0
        m[-1, 0] -= 1.0
    else:
        m[0, 0] = m[-1, -1] = 1.0
    return m


def laplacian(shape, spacing, boundary: str) -> np.ndarray:
    """``−Δ_h`` on a row-major flattened grid of ``shape``."""
    total = np.zeros((int(np.prod(shape)),) * 2)
    for d, (_n, h) in enumerate(zip(shape, spacing)):
        op = np.ones((1, 1))
        for e, m in enumerate(shape):
            op = np.kron(op, second_difference(m, boundary) / h**2 if e == d else np.eye(m))
        total += op
    return total


def regulariser(shape, spacing, order: int, boundary: str) -> list[np.ndarray]:
    """``h_i² (−Δ_h)^n`` for each component ``i``."""
    power = np.linalg.matrix_power(laplacian(shape, spacing, boundary), order)
    return [h**2 * power for h in spacing]
