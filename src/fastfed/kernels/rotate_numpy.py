"""NumPy reference for ``cpp/rotate``: randomized Walsh-Hadamard rotation, ``y = H D x`` blockwise
(Suresh et al. 2017, "Distributed Mean Estimation with Limited Communication", Section 4)."""

from __future__ import annotations

import numpy as np

from ._checks import require_flat, require_float, require_rotation_shape
from .random_numpy import random_signs

__all__ = ["hadamard", "rotate", "unrotate"]


def hadamard(blocks: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform of each row (length a power of two)."""
    rows, length = blocks.shape
    y = blocks.copy()
    half = 1
    while half < length:
        pairs = y.reshape(rows, length // (2 * half), 2, half)
        a = pairs[:, :, 0, :].copy()
        b = pairs[:, :, 1, :]
        pairs[:, :, 0, :] = a + b
        pairs[:, :, 1, :] = a - b
        half *= 2
    return np.asarray(y * (1.0 / np.sqrt(float(length))))


def rotate(x: np.ndarray, chunk: int, key: int, out: np.ndarray) -> None:
    """``out = blockwise H D pad(x)``: randomized Walsh-Hadamard rotation."""
    require_float(x, "x")
    require_flat(out, "out")
    n, padded = x.shape[0], out.shape[0]
    require_rotation_shape(n, chunk, padded)
    signed = np.zeros(padded, dtype=np.float64)
    signed[:n] = x.astype(np.float64) * random_signs(key, n)
    out[:] = hadamard(signed.reshape(-1, chunk)).reshape(-1)


def unrotate(y: np.ndarray, chunk: int, key: int, out: np.ndarray) -> None:
    """``out = (D H y)[:len(out)]``, the inverse of :func:`rotate`."""
    require_flat(y, "y")
    require_float(out, "out")
    n, padded = out.shape[0], y.shape[0]
    require_rotation_shape(n, chunk, padded)
    restored = hadamard(y.reshape(-1, chunk)).reshape(-1)[:n]
    out[:] = restored * random_signs(key, n)
