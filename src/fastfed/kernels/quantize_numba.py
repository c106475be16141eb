"""Numba twin of ``cpp/quantize``; see :mod:`fastfed.kernels.quantize_numpy` for the definitions."""

from __future__ import annotations

import numba
import numpy as np
from numba import prange
from numba.typed import List

from . import quantize_numpy as reference
from ._checks import (
    check_weighted_sum_quantized,
    require_bits,
    require_flat,
    require_float,
    require_packed,
    require_rotation_shape,
)
from .quantize_numpy import GOLDEN, MIX1, MIX2

_ONE = np.uint64(1)
_GROUP_BLOCK = 4096  # groups of 8 values per parallel task


@numba.njit(inline="always")
def _random_bits(key, index):  # type: ignore[no-untyped-def]
    z = np.uint64(key) + (np.uint64(index) + _ONE) * GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def _quantize_value(x, index, offset, scale, levels, stochastic, key):  # type: ignore[no-untyped-def]
    v = (np.float64(x) - offset) * scale
    dither = np.float64(_random_bits(key, index) >> np.uint64(11)) * 2.0**-53 if stochastic else 0.5
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


_TILE = 8192  # parameters per tile, a multiple of 8 so that every tile starts on a byte
_CLIENT_BLOCK = 8


@numba.njit(parallel=True, cache=True)
def _weighted_sum_quantized(packed, bits, scales, offset, divisor, out):  # type: ignore[no-untyped-def]
    n = out.shape[0]
    n_clients = len(packed)
    mask = (np.uint64(1) << np.uint64(bits)) - _ONE
    for tile in prange((n + _TILE - 1) // _TILE):
        begin = tile * _TILE
        end = min(n, begin + _TILE)
        block_sum = np.zeros(end - begin, dtype=np.float32)
        acc = np.zeros(end - begin, dtype=np.float64)
        for first in range(0, n_clients, _CLIENT_BLOCK):
            if bits == 8 and first + _CLIENT_BLOCK <= n_clients:
                # A full block of 8-bit clients: the block sum stays in a register (as in cpp/quantize).
                q0, q1, q2, q3 = (
                    packed[first][begin:end],
                    packed[first + 1][begin:end],
                    packed[first + 2][begin:end],
                    packed[first + 3][begin:end],
                )
                q4, q5, q6, q7 = (
                    packed[first + 4][begin:end],
                    packed[first + 5][begin:end],
                    packed[first + 6][begin:end],
                    packed[first + 7][begin:end],
                )
                s0, s1, s2, s3 = scales[first], scales[first + 1], scales[first + 2], scales[first + 3]
                s4, s5, s6, s7 = scales[first + 4], scales[first + 5], scales[first + 6], scales[first + 7]
                for i in range(end - begin):
                    total = np.float32(0.0)
                    total += s0 * np.float32(q0[i])
                    total += s1 * np.float32(q1[i])
                    total += s2 * np.float32(q2[i])
                    total += s3 * np.float32(q3[i])
                    total += s4 * np.float32(q4[i])
                    total += s5 * np.float32(q5[i])
                    total += s6 * np.float32(q6[i])
                    total += s7 * np.float32(q7[i])
                    acc[i] += np.float64(total)
                continue
            block_sum[:] = 0.0
            for k in range(first, min(n_clients, first + _CLIENT_BLOCK)):
                scale = scales[k]
                data = packed[k]
                if bits == 8:
                    levels = data[begin:end]
                    for i in range(end - begin):
                        block_sum[i] += scale * np.float32(levels[i])
                else:
                    byte = (begin // 8) * bits
                    buffer = np.uint64(0)
                    filled = 0
                    for i in range(end - begin):
                        while filled < bits:
                            buffer |= np.uint64(data[byte]) << np.uint64(filled)
                            byte += 1
                            filled += 8
                        block_sum[i] += scale * np.float32(buffer & mask)
                        buffer >>= np.uint64(bits)
                        filled -= bits
            for i in range(end - begin):
                acc[i] += np.float64(block_sum[i])
        for i in range(end - begin):
            out[begin + i] = (acc[i] + offset) / divisor


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


@numba.njit(inline="always")
def _sign(key, index):  # type: ignore[no-untyped-def]
    return 1.0 if (_random_bits(key, index) >> np.uint64(63)) == _ONE else -1.0


@numba.njit(parallel=True, cache=True)
def _rotate(x, chunk, key, out):  # type: ignore[no-untyped-def]
    n = x.shape[0]
    for block in prange(out.shape[0] // chunk):
        y = out[block * chunk : (block + 1) * chunk]
        for j in range(chunk):
            i = block * chunk + j
            y[j] = np.float64(x[i]) * _sign(key, i) if i < n else 0.0
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
                out[i] = z[j] * _sign(key, i)


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


def weighted_sum_quantized(
    packed: list[np.ndarray],
    bits: int,
    scales: np.ndarray,
    offset: float,
    divisor: float,
    out: np.ndarray,
    checksums: np.ndarray,
) -> None:
    """``out = (sum_k scales[k] * unpack(packed[k]) + offset) / divisor`` and the continued CRC-32s;
    see the NumPy reference."""
    scales = check_weighted_sum_quantized(packed, bits, scales, out, checksums)
    reference.continue_checksums(packed, checksums)
    _weighted_sum_quantized(List(packed), bits, scales, float(offset), float(divisor), out)


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
