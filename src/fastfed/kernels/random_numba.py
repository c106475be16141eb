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
def random_uniform(key, index):  # type: ignore[no-untyped-def]
    return np.float64(random_bits(key, index) >> np.uint64(11)) * 2.0**-53


@numba.njit(inline="always")
def random_sign(key, index):  # type: ignore[no-untyped-def]
    return 1.0 if (random_bits(key, index) >> np.uint64(63)) == _ONE else -1.0
