"""Numba twin of ``cpp/rotate``; see :mod:`fastfed.kernels.rotate_numpy` for the definitions."""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ._checks import require_flat, require_float, require_rotation_shape
from .random_numba import random_sign


@numba.njit(inline="always")
def _hadamard_block(y):  # type: ignore[no-untyped-def]
    length = y.shape[0]
    half = 1
    while half < length:
        for start in range(0, length, 2 * half):
            for j in range(start, start + half):
                a = y[j]
                b = y[j + half]
                y[j] = a + b
                y[j + half] = a - b
        half *= 2
    scale = 1.0 / np.sqrt(np.float64(length))
    for i in range(length):
        y[i] *= scale


@numba.njit(parallel=True, cache=True)
def _rotate(x, chunk, key, out):  # type: ignore[no-untyped-def]
    n = x.shape[0]
    for block in prange(out.shape[0] // chunk):
        y = out[block * chunk : (block + 1) * chunk]
        for j in range(chunk):
            i = block * chunk + j
            y[j] = np.float64(x[i]) * random_sign(key, i) if i < n else 0.0
        _hadamard_block(y)


@numba.njit(parallel=True, cache=True)
def _unrotate(y, chunk, key, out):  # type: ignore[no-untyped-def]
    n = out.shape[0]
    for block in prange(y.shape[0] // chunk):
        z = y[block * chunk : (block + 1) * chunk]
        _hadamard_block(z)
        for j in range(chunk):
            i = block * chunk + j
            if i < n:
                out[i] = z[j] * random_sign(key, i)


def rotate(x: np.ndarray, chunk: int, key: int, out: np.ndarray) -> None:
    """``out = blockwise H D pad(x)``: randomized Walsh-Hadamard rotation."""
    require_float(x, "x")
    require_flat(out, "out")
    require_rotation_shape(x.shape[0], chunk, out.shape[0])
    _rotate(x, chunk, np.uint64(key), out)


def unrotate(y: np.ndarray, chunk: int, key: int, out: np.ndarray) -> None:
    """``out = (D H y)[:len(out)]``, the inverse of :func:`rotate`."""
    require_flat(y, "y")
    require_float(out, "out")
    require_rotation_shape(out.shape[0], chunk, y.shape[0])
    _unrotate(y, chunk, np.uint64(key), out)
