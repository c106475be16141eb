"""NumPy reference for ``cpp/rotate``: the fast Walsh-Hadamard transform and randomized rotations built on it.

A randomized Hadamard rotation ``y = H D x`` (random signs ``D``, Walsh-Hadamard ``H``) spreads a
vector's energy evenly over its coordinates in O(n log n) (Ailon & Chazelle 2009, "The Fast
Johnson-Lindenstrauss Transform"); quantizing the rotated vector is far more accurate (Suresh et al.
2017, "Distributed Mean Estimation with Limited Communication", Section 4).

* :func:`rotate` / :func:`unrotate`: one orthonormal round in float64 with one signs draw per
  coordinate, as ``UniformQuantizer(rotate=True)`` has always encoded.
* :func:`rotate_blocks` / :func:`unrotate_blocks`: one or two rounds in float32, signs 64 to a
  draw, for :class:`fastfed.compression.RotatedQuantizer` (two rounds, ``H D2 H D1``, make the
  rotated coordinates close enough to Gaussian for EDEN's unbiasing to hold on sparse inputs, which
  one round does not). Each round scales by a power of two instead of ``1/sqrt(block)``, so every
  multiplication is exact: for a block of ``2^k`` values the forward rounds scale by
  ``2^-ceil(k/2)`` then ``2^-floor(k/2)``, and the inverse of a round that scaled by ``2^-e`` scales
  by ``2^-(k-e)``. Two rounds are orthonormal; one round is orthonormal times ``2^(k/2 - ceil(k/2))``.

A butterfly stage computes ``a + b`` and ``a - b`` of the same pairs whatever order the stages are
scheduled in, so a cache-blocked transform gives exactly these bits.
"""

from __future__ import annotations

import numpy as np

from ._checks import (
    require_block,
    require_flat,
    require_float,
    require_float32,
    require_rotation_shape,
    require_rounds,
)
from .random_numpy import random_signs, sign_flips

__all__ = ["hadamard", "rotate", "rotate_blocks", "rotation_exponents", "unrotate", "unrotate_blocks", "walsh_hadamard"]


def _fwht(blocks: np.ndarray) -> np.ndarray:
    """Unnormalized fast Walsh-Hadamard transform of each row (length a power of two), in the rows' dtype."""
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
    return y


def hadamard(blocks: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform of each row (length a power of two)."""
    return np.asarray(_fwht(blocks) * (1.0 / np.sqrt(float(blocks.shape[1]))))


def walsh_hadamard(x: np.ndarray, block: int) -> None:
    """In place: the unnormalized Walsh-Hadamard transform of every ``block`` consecutive values."""
    require_float(x, "x")
    if not x.flags.writeable:
        raise ValueError("x: array is read-only")
    require_rotation_shape(x.shape[0], block, x.shape[0])
    x[:] = _fwht(x.reshape(-1, block)).reshape(-1)


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


def rotation_exponents(block: int, rounds: int) -> list[int]:
    """The power-of-two scale exponents of the forward rounds: ``ceil(k/2)``, then ``floor(k/2)``."""
    k = block.bit_length() - 1
    return [(k + 1) // 2, k // 2][:rounds]


def _signed_scaled(values: np.ndarray, key: int, exponent: int) -> np.ndarray:
    scaled = values * np.float32(2.0**-exponent)
    return np.where(sign_flips(key, values.shape[0]), -scaled, scaled)


def rotate_blocks(x: np.ndarray, block: int, keys: list[int], out: np.ndarray) -> None:
    """``out = blockwise (H D_r 2^-e_r) ... (H D_1 2^-e_1) pad(x)`` in float32, one round per key."""
    require_float32(x, "x")
    require_float32(out, "out")
    require_block(block)
    require_rounds(keys)
    require_rotation_shape(x.shape[0], block, out.shape[0])
    y = np.zeros(out.shape[0], dtype=np.float32)
    y[: x.shape[0]] = x
    for key, exponent in zip(keys, rotation_exponents(block, len(keys))):
        y = _fwht(_signed_scaled(y, key, exponent).reshape(-1, block)).reshape(-1)
    out[:] = y


def unrotate_blocks(y: np.ndarray, block: int, keys: list[int], out: np.ndarray) -> None:
    """``out`` = the first ``len(out)`` values of the inverse of :func:`rotate_blocks` applied to ``y``."""
    require_float32(y, "y")
    require_float32(out, "out")
    require_block(block)
    require_rounds(keys)
    require_rotation_shape(out.shape[0], block, y.shape[0])
    k = block.bit_length() - 1
    values = y.copy()
    for key, exponent in reversed(list(zip(keys, rotation_exponents(block, len(keys))))):
        values = _signed_scaled(_fwht(values.reshape(-1, block)).reshape(-1), key, k - exponent)
    out[:] = values[: out.shape[0]]
