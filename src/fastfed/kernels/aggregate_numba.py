"""Numba twin of ``cpp/aggregate``: the same tiled float64 accumulation, compiled and parallel."""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
from numba import prange
from numba.typed import List

from ._checks import check_accumulate, check_weighted_sum

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
    # Numba has no float16 arithmetic on the CPU; widening to float32 is exact, so results are unchanged.
    return source.astype(np.float32) if source.dtype == np.float16 else source


def weighted_sum_layer(sources: Sequence[np.ndarray], weights: np.ndarray, divisor: float, out: np.ndarray) -> None:
    """``out[:] = sum_k weights[k] * sources[k] / divisor``, accumulated in float64."""
    weights = check_weighted_sum(sources, weights, out)
    typed_sources = List([_compilable(source) for source in sources])
    _weighted_sum_tiled(typed_sources, weights, float(divisor), out)


def accumulate(acc: np.ndarray, source: np.ndarray, weight: float) -> None:
    """``acc += weight * source`` in float64."""
    check_accumulate(acc, source)
    _accumulate(acc, _compilable(source), float(weight))
