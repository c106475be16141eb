"""Numba twin of ``cpp/aggregate``: the same tiled float64 accumulations, compiled and parallel; see
:mod:`fastfed.kernels.aggregate_numpy` for the definitions."""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
from numba import prange
from numba.typed import List

from . import aggregate_numpy as reference
from ._checks import check_accumulate, check_weighted_sum, check_weighted_sum_quantized

TILE = 2048  # float64 accumulator tile that stays in L1 while all clients stream through it


@numba.njit(parallel=True, cache=True)
def _weighted_sum_tiled(sources, weights, divisor, out):  # type: ignore[no-untyped-def]
    n = out.shape[0]
    n_tiles = (n + TILE - 1) // TILE
    for tile in prange(n_tiles):
        begin = tile * TILE
        end = min(n, begin + TILE)
        acc = np.zeros(end - begin, dtype=np.float64)
        k = 0
        # Eight clients per sweep, in client order, as in cpp/aggregate (bit-identical sums).
        while k + 8 <= len(sources):
            s0, s1, s2, s3 = (
                sources[k][begin:end],
                sources[k + 1][begin:end],
                sources[k + 2][begin:end],
                sources[k + 3][begin:end],
            )
            s4, s5, s6, s7 = (
                sources[k + 4][begin:end],
                sources[k + 5][begin:end],
                sources[k + 6][begin:end],
                sources[k + 7][begin:end],
            )
            w0, w1, w2, w3 = weights[k], weights[k + 1], weights[k + 2], weights[k + 3]
            w4, w5, w6, w7 = weights[k + 4], weights[k + 5], weights[k + 6], weights[k + 7]
            for i in range(end - begin):
                total = acc[i]
                total += w0 * np.float64(s0[i])
                total += w1 * np.float64(s1[i])
                total += w2 * np.float64(s2[i])
                total += w3 * np.float64(s3[i])
                total += w4 * np.float64(s4[i])
                total += w5 * np.float64(s5[i])
                total += w6 * np.float64(s6[i])
                total += w7 * np.float64(s7[i])
                acc[i] = total
            k += 8
        while k < len(sources):
            weight = weights[k]
            source = sources[k]
            for i in range(begin, end):
                acc[i - begin] += weight * np.float64(source[i])
            k += 1
        for i in range(begin, end):
            out[i] = acc[i - begin] / divisor


@numba.njit(parallel=True, cache=True)
def _accumulate(acc, source, weight):  # type: ignore[no-untyped-def]
    for i in prange(acc.shape[0]):
        acc[i] += weight * np.float64(source[i])


def _compilable(source: np.ndarray) -> np.ndarray:
    """A read-only view that Numba compiles for once per dtype, readable or not; float16 widened.

    Numba types read-only and writable arrays differently, and a typed list holds one type: clients
    whose arrays differ in writability (views of payload bytes beside copies) share this one.
    """
    # Numba has no float16 arithmetic on the CPU; widening to float32 is exact, so results are unchanged.
    view = source.astype(np.float32) if source.dtype == np.float16 else source.view()
    view.flags.writeable = False
    return view


def weighted_sum_layer(sources: Sequence[np.ndarray], weights: np.ndarray, divisor: float, out: np.ndarray) -> None:
    """``out[:] = sum_k weights[k] * sources[k] / divisor``, accumulated in float64."""
    weights = check_weighted_sum(sources, weights, out)
    typed_sources = List([_compilable(source) for source in sources])
    _weighted_sum_tiled(typed_sources, weights, float(divisor), out)


def accumulate(acc: np.ndarray, source: np.ndarray, weight: float) -> None:
    """``acc += weight * source`` in float64."""
    check_accumulate(acc, source)
    _accumulate(acc, _compilable(source), float(weight))


_ONE = np.uint64(1)
_QUANTIZED_TILE = 8192  # parameters per tile, a multiple of 8 so that every tile starts on a byte
_CLIENT_BLOCK = 8


@numba.njit(parallel=True, cache=True)
def _weighted_sum_quantized(packed, bits, scales, offset, divisor, out):  # type: ignore[no-untyped-def]
    n = out.shape[0]
    n_clients = len(packed)
    mask = (np.uint64(1) << np.uint64(bits)) - _ONE
    for tile in prange((n + _QUANTIZED_TILE - 1) // _QUANTIZED_TILE):
        begin = tile * _QUANTIZED_TILE
        end = min(n, begin + _QUANTIZED_TILE)
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
    levels = List([_compilable(data) for data in packed])
    _weighted_sum_quantized(levels, bits, scales, float(offset), float(divisor), out)
