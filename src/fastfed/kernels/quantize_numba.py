"""Numba twin of ``cpp/quantize``; see :mod:`fastfed.kernels.quantize_numpy` for the definitions."""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from . import quantize_numpy as reference
from ._checks import require_bits, require_flat, require_float, require_packed
from .random_numba import random_uniform

_ONE = np.uint64(1)
_GROUP_BLOCK = 4096  # groups of 8 values per parallel task


@numba.njit(inline="always")
def _quantize_value(x, index, offset, scale, levels, stochastic, key):  # type: ignore[no-untyped-def]
    v = (np.float64(x) - offset) * scale
    dither = random_uniform(key, index) if stochastic else 0.5
    q = np.floor(v + dither)
    return np.uint64(levels) if q >= levels else np.uint64(q)


@numba.njit(parallel=True, cache=True)
def _quantize_pack(x, bits, stochastic, key, offset, scale, out):  # type: ignore[no-untyped-def]
    n = x.shape[0]
    levels = np.float64((1 << bits) - 1)
    n_groups = (n + 7) // 8
    n_blocks = (n_groups + _GROUP_BLOCK - 1) // _GROUP_BLOCK
    for block in prange(n_blocks):
        begin = block * _GROUP_BLOCK * 8
        end = min(n, begin + _GROUP_BLOCK * 8)
        byte = block * _GROUP_BLOCK * bits
        buffer = np.uint64(0)
        filled = 0
        for i in range(begin, end):
            buffer |= _quantize_value(x[i], i, offset, scale, levels, stochastic, key) << np.uint64(filled)
            filled += bits
            while filled >= 8:
                out[byte] = np.uint8(buffer & np.uint64(0xFF))
                byte += 1
                buffer >>= np.uint64(8)
                filled -= 8
        if filled > 0:
            out[byte] = np.uint8(buffer & np.uint64(0xFF))


@numba.njit(inline="always")
def _unpack_block(packed, block, n, bits, offset, step, out, weight, acc, accumulate):  # type: ignore[no-untyped-def]
    begin = block * _GROUP_BLOCK * 8
    end = min(n, begin + _GROUP_BLOCK * 8)
    mask = (np.uint64(1) << np.uint64(bits)) - _ONE
    byte = block * _GROUP_BLOCK * bits
    buffer = np.uint64(0)
    filled = 0
    for i in range(begin, end):
        while filled < bits:
            buffer |= np.uint64(packed[byte]) << np.uint64(filled)
            byte += 1
            filled += 8
        value = offset + np.float64(buffer & mask) * step
        buffer >>= np.uint64(bits)
        filled -= bits
        if accumulate:
            acc[i] += weight * np.float64(np.float32(value))
        else:
            out[i] = value


@numba.njit(parallel=True, cache=True)
def _unpack_dequantize(packed, bits, offset, step, out):  # type: ignore[no-untyped-def]
    n = out.shape[0]
    n_blocks = ((n + 7) // 8 + _GROUP_BLOCK - 1) // _GROUP_BLOCK
    for block in prange(n_blocks):
        _unpack_block(packed, block, n, bits, offset, step, out, 0.0, out, False)


@numba.njit(parallel=True, cache=True)
def _unpack_dequantize_accumulate(packed, bits, offset, step, weight, acc):  # type: ignore[no-untyped-def]
    n = acc.shape[0]
    n_blocks = ((n + 7) // 8 + _GROUP_BLOCK - 1) // _GROUP_BLOCK
    for block in prange(n_blocks):
        _unpack_block(packed, block, n, bits, offset, step, acc, weight, acc, True)


def min_max(x: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of a finite float array; NumPy's reductions are already bandwidth-bound."""
    return reference.min_max(x)


def quantize_pack(
    x: np.ndarray, bits: int, stochastic: bool, key: int, offset: float, scale: float, out: np.ndarray
) -> None:
    """``out = pack(round((x - offset) * scale))``."""
    require_bits(bits)
    require_float(x, "x")
    require_packed(out, x.shape[0], bits, "out")
    _quantize_pack(x, bits, bool(stochastic), np.uint64(key), float(offset), float(scale), out)


def unpack_dequantize(packed: np.ndarray, bits: int, offset: float, step: float, out: np.ndarray) -> None:
    """``out = offset + unpack(packed) * step``."""
    require_bits(bits)
    require_float(out, "out")
    require_packed(packed, out.shape[0], bits, "packed")
    _unpack_dequantize(packed, bits, float(offset), float(step), out)


def unpack_dequantize_accumulate(
    packed: np.ndarray, bits: int, offset: float, step: float, weight: float, acc: np.ndarray
) -> None:
    """``acc += weight * float32(offset + unpack(packed) * step)``."""
    require_bits(bits)
    require_flat(acc, "acc")
    require_packed(packed, acc.shape[0], bits, "packed")
    _unpack_dequantize_accumulate(packed, bits, float(offset), float(step), float(weight), acc)
