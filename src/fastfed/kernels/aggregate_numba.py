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
        for k in range(len(sources)):
            weight = weights[k]
            source = sources[k]
            for i in range(begin, end):
                acc[i - begin] += weight * np.float64(source[i])
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
