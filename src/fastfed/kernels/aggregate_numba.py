"""Numba twin of ``cpp/aggregate``: the same tiled float64 accumulations and robust aggregates,
compiled and parallel; see :mod:`fastfed.kernels.aggregate_numpy` for the definitions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np
from numba import prange

from . import aggregate_numpy as reference
from ._checks import (
    check_accumulate,
    check_corrections,
    check_cut,
    check_robust,
    check_weighted_sum,
    check_weighted_sum_levels,
    check_weighted_sum_quantized,
)
from .numba_arrays import client_view, data_addresses

TILE = 2048  # float64 accumulator tile that stays in L1 while all clients stream through it


@numba.njit(inline="always")
def _chunk_of_tiles(chunk, n_chunks, n_tiles):  # type: ignore[no-untyped-def]
    """The tiles [first, last) of one parallel task: tasks take contiguous runs of tiles, so each
    allocates its accumulator once (allocation per tile contends on the heap at many threads)."""
    return chunk * n_tiles // n_chunks, (chunk + 1) * n_tiles // n_chunks


@numba.njit(inline="always")
def _sum_tile(addresses, example, weights, divisor, out, begin, end, acc):  # type: ignore[no-untyped-def]
    """out[begin:end] = (sum_k weights[k] * client_k[begin:end]) / divisor, with acc as the tile."""
    acc[:] = 0.0
    k = 0
    # Eight clients per sweep, in client order, as in cpp/aggregate (bit-identical sums).
    while k + 8 <= len(addresses):
        s0, s1, s2, s3 = (
            client_view(addresses, k, example, begin, end),
            client_view(addresses, k + 1, example, begin, end),
            client_view(addresses, k + 2, example, begin, end),
            client_view(addresses, k + 3, example, begin, end),
        )
        s4, s5, s6, s7 = (
            client_view(addresses, k + 4, example, begin, end),
            client_view(addresses, k + 5, example, begin, end),
            client_view(addresses, k + 6, example, begin, end),
            client_view(addresses, k + 7, example, begin, end),
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
    while k < len(addresses):
        weight = weights[k]
        source = client_view(addresses, k, example, begin, end)
        for i in range(end - begin):
            acc[i] += weight * np.float64(source[i])
        k += 1
    for i in range(begin, end):
        out[i] = acc[i - begin] / divisor


@numba.njit(parallel=True, cache=True)
def _weighted_sum_tiled(addresses, example, weights, divisor, out, n_chunks):  # type: ignore[no-untyped-def]
    n = out.shape[0]
    n_tiles = (n + TILE - 1) // TILE
    for chunk in prange(n_chunks):
        first_tile, last_tile = _chunk_of_tiles(chunk, n_chunks, n_tiles)
        tile_acc = np.empty(TILE, dtype=np.float64)
        for tile in range(first_tile, last_tile):
            begin = tile * TILE
            end = min(n, begin + TILE)
            _sum_tile(addresses, example, weights, divisor, out, begin, end, tile_acc[: end - begin])


@numba.njit(parallel=True, cache=True)
def _accumulate(acc, source, weight):  # type: ignore[no-untyped-def]
    for i in prange(acc.shape[0]):
        acc[i] += weight * np.float64(source[i])


def _tasks(n: int, tile: int) -> int:
    """Parallel tasks for n elements in tiles: about eight per thread, for balance."""
    threads: int = numba.get_num_threads()
    return max(1, min(-(-n // tile), 8 * threads))


def _compilable(source: np.ndarray) -> np.ndarray:
    # Numba has no float16 arithmetic on the CPU; widening to float32 is exact, so results are unchanged.
    return source.astype(np.float32) if source.dtype == np.float16 else source


def weighted_sum_layer(sources: Sequence[np.ndarray], weights: np.ndarray, divisor: float, out: np.ndarray) -> None:
    """``out[:] = sum_k weights[k] * sources[k] / divisor``, accumulated in float64."""
    weights = check_weighted_sum(sources, weights, out)
    arrays = [_compilable(source) for source in sources]
    example = arrays[0][:0]
    _weighted_sum_tiled(data_addresses(arrays), example, weights, float(divisor), out, _tasks(out.shape[0], TILE))


def accumulate(acc: np.ndarray, source: np.ndarray, weight: float) -> None:
    """``acc += weight * source`` in float64."""
    check_accumulate(acc, source)
    _accumulate(acc, _compilable(source), float(weight))


_ONE = np.uint64(1)
_QUANTIZED_TILE = 8192  # parameters per tile, a multiple of 8 so that every tile starts on a byte
_CLIENT_BLOCK = 8


@numba.njit(inline="always")
def _sum_quantized_tile(packed, example, bits, scales, offset, divisor, out, begin, end, mask, block_sum, acc):  # type: ignore[no-untyped-def]
    """One tile of _weighted_sum_quantized: float32 block sums of eight clients into the float64 acc."""
    n_clients = len(packed)
    first_byte = (begin // 8) * bits
    last_byte = (end * bits + 7) // 8
    acc[:] = 0.0
    for first in range(0, n_clients, _CLIENT_BLOCK):
        if bits == 8 and first + _CLIENT_BLOCK <= n_clients:
            # A full block of 8-bit clients: the block sum stays in a register (as in cpp/quantize).
            q0, q1, q2, q3 = (
                client_view(packed, first, example, begin, end),
                client_view(packed, first + 1, example, begin, end),
                client_view(packed, first + 2, example, begin, end),
                client_view(packed, first + 3, example, begin, end),
            )
            q4, q5, q6, q7 = (
                client_view(packed, first + 4, example, begin, end),
                client_view(packed, first + 5, example, begin, end),
                client_view(packed, first + 6, example, begin, end),
                client_view(packed, first + 7, example, begin, end),
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
            data = client_view(packed, k, example, first_byte, last_byte)
            if bits == 8:
                for i in range(end - begin):
                    block_sum[i] += scale * np.float32(data[i])
            else:
                byte = 0
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


@numba.njit(parallel=True, cache=True)
def _weighted_sum_quantized(packed, example, bits, scales, offset, divisor, out, n_chunks):  # type: ignore[no-untyped-def]
    n = out.shape[0]
    mask = (np.uint64(1) << np.uint64(bits)) - _ONE
    n_tiles = (n + _QUANTIZED_TILE - 1) // _QUANTIZED_TILE
    for chunk in prange(n_chunks):
        first_tile, last_tile = _chunk_of_tiles(chunk, n_chunks, n_tiles)
        block_storage = np.empty(_QUANTIZED_TILE, dtype=np.float32)
        acc_storage = np.empty(_QUANTIZED_TILE, dtype=np.float64)
        for tile in range(first_tile, last_tile):
            begin = tile * _QUANTIZED_TILE
            end = min(n, begin + _QUANTIZED_TILE)
            _sum_quantized_tile(packed, example, bits, scales, offset, divisor, out, begin, end, mask,
                                block_storage[: end - begin], acc_storage[: end - begin])  # fmt: skip


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
    tasks = _tasks(out.shape[0], _QUANTIZED_TILE)
    example = np.empty(0, np.uint8)
    _weighted_sum_quantized(data_addresses(packed), example, bits, scales, float(offset), float(divisor), out, tasks)


@numba.njit(cache=True)
def _float_midpoint(lower, upper):  # type: ignore[no-untyped-def]
    lower, upper = np.float64(lower), np.float64(upper)
    total = lower + upper
    return total * 0.5 if np.isfinite(total) else lower * 0.5 + upper * 0.5


@numba.njit(cache=True)
def _integer_midpoint(a, b):  # type: ignore[no-untyped-def]
    floor_half = (a >> 1) + (b >> 1) + (a & b & 1)
    if (a ^ b) & 1:
        floor_half += floor_half & 1
    return floor_half


@numba.njit(cache=True)
def _integer_mean(high_sum, low_sum, count):  # type: ignore[no-untyped-def]
    high_quotient = high_sum // count  # floor division: the remainder is non-negative
    rest = (high_sum - high_quotient * count) * (1 << 32) + low_sum
    low_quotient = rest // count
    remainder = rest - low_quotient * count
    quotient = high_quotient * (1 << 32) + low_quotient
    if 2 * remainder > count or (2 * remainder == count and quotient & 1):
        quotient += 1
    return quotient


_LANES = 32  # coordinates sorted together by one pass of the network
_NETWORK_LIMIT = 4096  # more clients: each coordinate is sorted on its own, as in cpp/aggregate


def sorting_network(k: int) -> np.ndarray:
    """Batcher's odd-even merge sort for the next power of two >= k, as (i, j) rows with i < j;
    pairs reaching past k are left out (see ``cpp/aggregate/robust.hpp``)."""
    n = 1 << max(0, (k - 1).bit_length())
    pairs = []
    p = 1
    while p < n:
        q = p
        while q >= 1:
            for j in range(q % p, n - q, 2 * q):
                for i in range(min(q, n - j - q)):
                    if (i + j) // (2 * p) == (i + j + q) // (2 * p) and i + j + q < k:
                        pairs.append((i + j, i + j + q))
            q >>= 1
        p <<= 1
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


@numba.njit(parallel=True, cache=True)
def _robust_grouped(addresses, example, cut, out, flags, pairs, reduce):  # type: ignore[no-untyped-def]
    """out[i] = reduce(sorted values of coordinate i, cut), NaN where a coordinate holds one;
    flags[group, k] = 1 where client k holds NaN or infinity in that group of coordinates.

    Each group's K x _LANES block is sorted column-wise by the network ``pairs`` (branch-free
    min/max over whole rows), or, without pairs, one coordinate at a time."""
    n_sources = len(addresses)
    n = out.shape[0]
    for group in prange((n + _LANES - 1) // _LANES):
        begin = group * _LANES
        end = min(n, begin + _LANES)
        rows = np.zeros((n_sources, _LANES), dtype=example.dtype)
        for k in range(n_sources):
            source = client_view(addresses, k, example, begin, end)
            bad = False
            for lane in range(end - begin):
                value = source[lane]
                rows[k, lane] = value
                bad |= not np.isfinite(value)
            if bad:
                flags[group, k] = 1
        maybe_nan = flags[group].any()
        nan_lane = np.zeros(_LANES, dtype=np.bool_)
        if maybe_nan:
            for k in range(n_sources):
                for lane in range(_LANES):
                    nan_lane[lane] |= rows[k, lane] != rows[k, lane]
        if pairs.shape[0] or n_sources == 1:
            for p in range(pairs.shape[0]):
                low, high = rows[pairs[p, 0]], rows[pairs[p, 1]]
                for lane in range(_LANES):
                    x, y = low[lane], high[lane]
                    low[lane] = y if y < x else x
                    high[lane] = x if y < x else y
        else:
            for lane in range(_LANES):
                rows[:, lane] = np.sort(rows[:, lane])
        for lane in range(end - begin):
            if nan_lane[lane]:  # (never for integers: as one expression, the result would go through float64)
                out[begin + lane] = np.nan
            else:
                out[begin + lane] = reduce(rows[:, lane], cut)


@numba.njit(cache=True)
def _float_median(ordered, cut):  # type: ignore[no-untyped-def]
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return np.float64(ordered[middle])
    return _float_midpoint(ordered[middle - 1], ordered[middle])


@numba.njit(cache=True)
def _integer_median(ordered, cut):  # type: ignore[no-untyped-def]
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return _integer_midpoint(ordered[middle - 1], ordered[middle])


@numba.njit(cache=True)
def _float_trimmed_mean(ordered, cut):  # type: ignore[no-untyped-def]
    count = len(ordered)
    headroom = 1.0
    while headroom < count:
        headroom *= 2.0
    total = 0.0
    for r in range(cut, count - cut):
        total += np.float64(ordered[r]) / headroom
    return total / (count - 2 * cut) * headroom


@numba.njit(cache=True)
def _integer_trimmed_mean(ordered, cut):  # type: ignore[no-untyped-def]
    high_sum = low_sum = np.int64(0)
    for r in range(cut, len(ordered) - cut):
        high_sum += ordered[r] >> 32
        low_sum += ordered[r] & 0xFFFFFFFF
    return _integer_mean(high_sum, low_sum, np.int64(len(ordered) - 2 * cut))


def _robust(sources: Sequence[np.ndarray], cut: int, out: np.ndarray, non_finite: np.ndarray, median: bool) -> None:
    """Runs the tiled kernel on the values of :func:`fastfed.kernels.aggregate_numpy.robust_values`
    (float16 widened, integers as int64), into an int64 buffer for integers."""
    dtype = sources[0].dtype
    is_float = dtype.kind == "f"
    # Float16 widened and integers mapped onto int64 (a copy); float32 and float64 read in place.
    arrays = list(sources) if is_float and dtype != np.float16 else list(reference.robust_values(sources))
    n_groups = (out.shape[0] + _LANES - 1) // _LANES
    flags = np.zeros((n_groups, len(sources)), dtype=np.uint8)
    result = out if is_float else np.empty(out.shape[0], dtype=np.int64)
    if median:
        reduce = _float_median if is_float else _integer_median
    else:
        reduce = _float_trimmed_mean if is_float else _integer_trimmed_mean
    pairs = sorting_network(len(sources)) if len(sources) <= _NETWORK_LIMIT else np.zeros((0, 2), np.int64)
    _robust_grouped(data_addresses(arrays), arrays[0][:0], int(cut), result, flags, pairs, reduce)
    if n_groups:
        non_finite |= flags.max(axis=0)
    if is_float:
        out += 0.0  # -0.0 becomes +0.0, as in every backend
    else:
        out[:] = reference.robust_result(result, dtype)


def median(sources: Sequence[np.ndarray], out: np.ndarray, non_finite: np.ndarray) -> None:
    """The coordinate-wise median; see :func:`fastfed.kernels.aggregate_numpy.median`."""
    check_robust(sources, out, non_finite)
    _robust(sources, 0, out, non_finite, median=True)


def trimmed_mean(sources: Sequence[np.ndarray], cut: int, out: np.ndarray, non_finite: np.ndarray) -> None:
    """The coordinate-wise trimmed mean; see :func:`fastfed.kernels.aggregate_numpy.trimmed_mean`."""
    check_robust(sources, out, non_finite)
    check_cut(cut, len(sources))
    _robust(sources, cut, out, non_finite, median=False)


@numba.njit(inline="always")
def _sum_levels_tile(packed, example, bits, scales, block, table, rows, offsets, divisor, out, begin, end, mask,  # type: ignore[no-untyped-def]
                     block_sum, acc):  # fmt: skip
    """One tile of _weighted_sum_levels: float32 block sums of eight clients into the float64 acc."""
    n_clients = len(packed)
    first_byte = (begin // 8) * bits
    last_byte = (end * bits + 7) // 8
    n_rows = table.shape[0]
    acc[:] = 0.0
    for first in range(0, n_clients, _CLIENT_BLOCK):
        block_sum[:] = 0.0
        for k in range(first, min(n_clients, first + _CLIENT_BLOCK)):
            data = client_view(packed, k, example, first_byte, last_byte)
            offset, stride = np.int64(rows[k, 0]), np.int64(rows[k, 1])
            byte = 0
            buffer = np.uint64(0)
            filled = 0
            for i in range(end - begin):
                while filled < bits:
                    buffer |= np.uint64(data[byte]) << np.uint64(filled)
                    byte += 1
                    filled += 8
                level = buffer & mask
                buffer >>= np.uint64(bits)
                filled -= bits
                position = begin + i
                scale = scales[k, position // block]
                if n_rows == 0:
                    block_sum[i] += scale * np.float32(level)
                else:
                    row = ((position >> 3) * stride + offset) & (n_rows - 1)
                    block_sum[i] += scale * table[row, level]
        for i in range(end - begin):
            acc[i] += np.float64(block_sum[i])
    period = offsets.shape[1]
    for i in range(end - begin):
        position = begin + i
        out[position] = (acc[i] + offsets[position // block, (position >> 3) & (period - 1)]) / divisor


@numba.njit(parallel=True, cache=True)
def _weighted_sum_levels(packed, example, bits, scales, block, table, rows, offsets, divisor, out, n_chunks):  # type: ignore[no-untyped-def]
    n = out.shape[0]
    mask = (np.uint64(1) << np.uint64(bits)) - _ONE
    n_tiles = (n + _QUANTIZED_TILE - 1) // _QUANTIZED_TILE
    for chunk in prange(n_chunks):
        first_tile, last_tile = _chunk_of_tiles(chunk, n_chunks, n_tiles)
        block_storage = np.empty(_QUANTIZED_TILE, dtype=np.float32)
        acc_storage = np.empty(_QUANTIZED_TILE, dtype=np.float64)
        for tile in range(first_tile, last_tile):
            begin = tile * _QUANTIZED_TILE
            end = min(n, begin + _QUANTIZED_TILE)
            _sum_levels_tile(packed, example, bits, scales, block, table, rows, offsets, divisor, out, begin, end, mask,
                             block_storage[: end - begin], acc_storage[: end - begin])  # fmt: skip


def weighted_sum_levels(
    packed: list[np.ndarray],
    bits: int,
    scales: np.ndarray,
    block: int,
    table: np.ndarray | None,
    rows: np.ndarray,
    offsets: np.ndarray | None,
    divisor: float,
    out: np.ndarray,
    checksums: np.ndarray,
    corrections: Sequence[np.ndarray] | None = None,
    shares: np.ndarray | None = None,
    limit: float = math.inf,
) -> int:
    """Weighted sums of table values (or levels) with per-block scales, then the corrections; see the
    NumPy reference."""
    scales = check_weighted_sum_levels(packed, bits, scales, block, table, rows, offsets, out, checksums)
    shares = check_corrections(corrections, shares, len(packed))
    invalid = reference.first_invalid_corrections(
        [reference.split_corrections(source) for source in corrections or []], limit, out.shape[0]
    )
    if invalid >= 0:
        return invalid
    reference.continue_checksums(packed, checksums)
    values = np.zeros((0, 2**bits), np.float32) if table is None else table
    added = np.zeros((out.shape[0] // block, 1)) if offsets is None else offsets
    tasks = _tasks(out.shape[0], _QUANTIZED_TILE)
    example = np.empty(0, np.uint8)
    _weighted_sum_levels(
        data_addresses(packed), example, bits, scales, block, values, rows, added, float(divisor), out, tasks
    )  # fmt: skip
    if corrections:
        sizes = np.array([source.shape[0] for source in corrections], dtype=np.int64)
        _add_corrections(data_addresses(corrections), example, sizes, shares, out)
    return -1


@numba.njit(inline="always")
def _word(data, at):  # type: ignore[no-untyped-def]
    """The little-endian uint32 at byte ``at``."""
    return (
        np.uint32(data[at])
        | (np.uint32(data[at + 1]) << np.uint32(8))
        | (np.uint32(data[at + 2]) << np.uint32(16))
        | (np.uint32(data[at + 3]) << np.uint32(24))
    )


@numba.njit(cache=True)
def _add_corrections(sources, example, sizes, shares, out):  # type: ignore[no-untyped-def]
    """out[p] += shares[k] * c for each (validated) correction, in client order."""
    words = np.empty(1, np.uint32)
    as_float = words.view(np.float32)
    for k in range(sizes.shape[0]):
        count = sizes[k] // 8
        data = client_view(sources, k, example, 0, sizes[k])
        for i in range(count):
            words[0] = _word(data, 4 * (count + i))
            out[np.int64(_word(data, 4 * i))] += shares[k] * as_float[0]
