"""Numba twin of ``cpp/rotate``; see :mod:`fastfed.kernels.rotate_numpy` for the definitions."""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ._checks import require_block, require_flat, require_float, require_float32, require_rotation_shape, require_rounds
from .random_numba import flips, random_sign, sign_word
from .rotate_numpy import rotation_exponents


@numba.njit(inline="always")
def fwht(y):  # type: ignore[no-untyped-def]
    """In place: the unnormalized Walsh-Hadamard transform of a power-of-two block, stage by stage."""
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


@numba.njit(inline="always")
def _hadamard_block(y):  # type: ignore[no-untyped-def]
    fwht(y)
    scale = 1.0 / np.sqrt(np.float64(y.shape[0]))
    for i in range(y.shape[0]):
        y[i] *= scale


@numba.njit(inline="always")
def signed_scaled(y, key, first_index, scale):  # type: ignore[no-untyped-def]
    """In place: ``y[i] * scale``, sign-flipped by bit ``i' % 64`` of draw ``i' // 64``, ``i' = first_index + i``."""
    word = sign_word(key, first_index)
    for i in range(y.shape[0]):
        index = first_index + i
        if index % 64 == 0:
            word = sign_word(key, index)
        value = y[i] * scale
        y[i] = -value if flips(word, index) else value


@numba.njit(inline="always")
def rotate_block(x, begin, y, keys, scales):  # type: ignore[no-untyped-def]
    """``y`` = the rounds of :func:`rotate_blocks` applied to ``x[begin : begin + len(y)]``, padded with zeros."""
    n = x.shape[0]
    for j in range(y.shape[0]):
        y[j] = x[begin + j] if begin + j < n else np.float32(0.0)
    for r in range(keys.shape[0]):
        signed_scaled(y, keys[r], begin, scales[r])
        fwht(y)


@numba.njit(inline="always")
def unrotate_block(z, begin, keys, inverse_scales):  # type: ignore[no-untyped-def]
    for r in range(keys.shape[0] - 1, -1, -1):
        fwht(z)
        signed_scaled(z, keys[r], begin, inverse_scales[r])


@numba.njit(parallel=True, cache=True)
def _walsh_hadamard(x, block):  # type: ignore[no-untyped-def]
    for b in prange(x.shape[0] // block):
        fwht(x[b * block : (b + 1) * block])


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


@numba.njit(parallel=True, cache=True)
def _rotate_blocks(x, block, keys, scales, out):  # type: ignore[no-untyped-def]
    for b in prange(out.shape[0] // block):
        rotate_block(x, b * block, out[b * block : (b + 1) * block], keys, scales)


@numba.njit(parallel=True, cache=True)
def _unrotate_blocks(y, block, keys, inverse_scales, out):  # type: ignore[no-untyped-def]
    n = out.shape[0]
    for b in prange(y.shape[0] // block):
        z = y[b * block : (b + 1) * block]
        unrotate_block(z, b * block, keys, inverse_scales)
        for j in range(min(block, max(0, n - b * block))):
            out[b * block + j] = z[j]


def round_scales(block: int, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 (forward, inverse) scales of the rounds: ``2^-e`` and ``2^-(k - e)``."""
    k = block.bit_length() - 1
    exponents = rotation_exponents(block, rounds)
    forward = np.array([2.0**-e for e in exponents], np.float32)
    return forward, np.array([2.0 ** -(k - e) for e in exponents], np.float32)


def walsh_hadamard(x: np.ndarray, block: int) -> None:
    """In place: the unnormalized Walsh-Hadamard transform of every ``block`` consecutive values."""
    require_float(x, "x")
    if not x.flags.writeable:
        raise ValueError("x: array is read-only")
    require_rotation_shape(x.shape[0], block, x.shape[0])
    _walsh_hadamard(x, block)


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


def rotate_blocks(x: np.ndarray, block: int, keys: list[int], out: np.ndarray) -> None:
    """One or two float32 rotation rounds per block; see the NumPy reference."""
    require_float32(x, "x")
    require_float32(out, "out")
    require_block(block)
    require_rounds(keys)
    require_rotation_shape(x.shape[0], block, out.shape[0])
    _rotate_blocks(x, block, np.array(keys, np.uint64), round_scales(block, len(keys))[0], out)


def unrotate_blocks(y: np.ndarray, block: int, keys: list[int], out: np.ndarray) -> None:
    """The inverse of :func:`rotate_blocks`; ``y`` is overwritten."""
    require_float32(y, "y")
    require_float32(out, "out")
    require_block(block)
    require_rounds(keys)
    require_rotation_shape(out.shape[0], block, y.shape[0])
    _unrotate_blocks(y, block, np.array(keys, np.uint64), round_scales(block, len(keys))[1], out)
