"""Numba twin of ``cpp/common/random.hpp``; see :mod:`fastfed.kernels.random_numpy` for the definitions.

Per-element functions, inlined into the kernels that draw random numbers.
"""

from __future__ import annotations

import numba
import numpy as np

from .random_numpy import GOLDEN, MIX1, MIX2

_ONE = np.uint64(1)


@numba.njit(inline="always")
def random_bits(key, index):  # type: ignore[no-untyped-def]
    z = np.uint64(key) + (np.uint64(index) + _ONE) * GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def random_sign(key, index):  # type: ignore[no-untyped-def]
    return 1.0 if (random_bits(key, index) >> np.uint64(63)) == _ONE else -1.0


@numba.njit(inline="always")
def sign_word(key, index):  # type: ignore[no-untyped-def]
    """The draw whose bit ``index % 64`` flips the sign of value ``index``."""
    return random_bits(key, np.uint64(index) >> np.uint64(6))


@numba.njit(inline="always")
def flips(word, index):  # type: ignore[no-untyped-def]
    return (word >> np.uint64(index & 63)) & _ONE == _ONE


@numba.njit(inline="always")
def random_coin(key, index):  # type: ignore[no-untyped-def]
    """The 32-bit coin of value ``index`` as a double in [0, 1)."""
    draw = random_bits(key, np.uint64(index) >> _ONE)
    half = (draw >> np.uint64(32 * (index & 1))) & np.uint64(0xFFFFFFFF)
    return np.float64(half) * 2.0**-32


@numba.njit(inline="always")
def random_quarter(key, index):  # type: ignore[no-untyped-def]
    """The 16-bit coin of value ``index`` (:func:`fastfed.kernels.random_numpy.random_quarters`)."""
    word = np.uint64(8 * (index // 16) + index % 8)
    draw = random_bits(key, word >> _ONE)
    shift = np.uint64(32) * (word & _ONE) + np.uint64(16 * ((index // 8) & 1))
    return (draw >> shift) & np.uint64(0xFFFF)
