"""NumPy reference for ``cpp/aggregate``: weighted sums accumulated in float64, of float buffers
or of packed quantized levels, and the coordinate-wise median and trimmed mean.

Every element is summed in client order, ``acc = ((0 + w0*x0) + w1*x1) + ...``, then divided once;
the native and Numba kernels follow exactly this order, so all three agree bit for bit. The robust
aggregates are defined in ``cpp/aggregate/robust.hpp``; :func:`median` and :func:`trimmed_mean`
spell that definition out.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

from ._checks import (
    check_accumulate,
    check_corrections,
    check_cut,
    check_robust,
    check_weighted_sum,
    check_weighted_sum_levels,
    check_weighted_sum_quantized,
)
from .quantize_numpy import unpack


def weighted_sum_layer(sources: Sequence[np.ndarray], weights: np.ndarray, divisor: float, out: np.ndarray) -> None:
    """``out[:] = sum_k weights[k] * sources[k] / divisor``, accumulated in float64."""
    weights = check_weighted_sum(sources, weights, out)
    acc = np.zeros(out.shape[0], dtype=np.float64)
    for source, weight in zip(sources, weights):
        acc += weight * source.astype(np.float64)
    out[:] = acc / divisor


def accumulate(acc: np.ndarray, source: np.ndarray, weight: float) -> None:
    """``acc += weight * source`` in float64."""
    check_accumulate(acc, source)
    acc += weight * source.astype(np.float64)


CLIENT_BLOCK = 8


def continue_checksums(packed: list[np.ndarray], checksums: np.ndarray) -> None:
    """``checksums[k] = crc32(packed[k], checksums[k])``: zlib's CRC-32, continued (zlib releases the GIL)."""
    for k, data in enumerate(packed):
        checksums[k] = zlib.crc32(data.data, int(checksums[k]))


def weighted_sum_quantized(
    packed: list[np.ndarray],
    bits: int,
    scales: np.ndarray,
    offset: float,
    divisor: float,
    out: np.ndarray,
    checksums: np.ndarray,
) -> None:
    """``out = (sum_k scales[k] * unpack(packed[k]) + offset) / divisor``, and
    ``checksums[k] = crc32(packed[k], checksums[k])`` (zlib's CRC-32, continued).

    The level sums run in float32 over blocks of eight clients, in client order, each block sum
    added to a float64 accumulator that starts at zero; ``offset`` is added last.
    """
    scales = check_weighted_sum_quantized(packed, bits, scales, out, checksums)
    continue_checksums(packed, checksums)
    n = out.shape[0]
    acc = np.zeros(n, dtype=np.float64)
    for first in range(0, len(packed), CLIENT_BLOCK):
        block_sum = np.zeros(n, dtype=np.float32)
        for k in range(first, min(len(packed), first + CLIENT_BLOCK)):
            block_sum += scales[k] * unpack(packed[k], n, bits).astype(np.float32)
        acc += block_sum.astype(np.float64)
    out[:] = (acc + offset) / divisor


_TOP_BIT = np.uint64(1 << 63)


def robust_values(sources: Sequence[np.ndarray]) -> np.ndarray:
    """The (K, n) values the robust aggregates compare: float16 widened to float32 (exact), integers
    mapped order-preservingly onto int64 (uint64 by flipping the top bit, i.e. subtracting 2**63)."""
    dtype = sources[0].dtype
    if dtype == np.float16:
        return np.stack([source.astype(np.float32) for source in sources])
    if dtype.kind == "f":
        return np.stack(sources)
    if dtype == np.uint64:
        return np.stack([(source ^ _TOP_BIT).view(np.int64) for source in sources])
    return np.stack([source.astype(np.int64) for source in sources])


def robust_result(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float results as float64 with -0.0 made +0.0; integers mapped back to their dtype."""
    if dtype.kind == "f":
        return values.astype(np.float64) + 0.0
    if dtype == np.uint64:
        return values.view(np.uint64) ^ _TOP_BIT
    return values.astype(dtype)


def flag_non_finite(values: np.ndarray, non_finite: np.ndarray) -> None:
    if values.dtype.kind == "f":
        non_finite |= (~np.isfinite(values)).any(axis=1).astype(np.uint8)


def float_midpoint(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """``(lower + upper) * 0.5`` in float64, or ``lower * 0.5 + upper * 0.5`` where the sum overflows."""
    lower, upper = lower.astype(np.float64), upper.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        total = lower + upper
        return np.where(np.isfinite(total), total * 0.5, lower * 0.5 + upper * 0.5)


def integer_midpoint(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a + b) / 2`` of int64 arrays, exactly, rounded half to even."""
    floor_half = (a >> 1) + (b >> 1) + (a & b & 1)
    rounded: np.ndarray = floor_half + (((a ^ b) & 1) & floor_half)
    return rounded


def integer_mean(high_sum: np.ndarray, low_sum: np.ndarray, count: int) -> np.ndarray:
    """The mean of ``count`` int64 values given as ``sum(x >> 32)`` and ``sum(x & 0xffffffff)``,
    rounded half to even (exact: the 96-bit sum is divided in two steps)."""
    high_quotient, high_remainder = np.divmod(high_sum, count)  # floor division, remainder >= 0
    low_quotient, remainder = np.divmod(high_remainder * (1 << 32) + low_sum, count)
    quotient = high_quotient * (1 << 32) + low_quotient
    rounded: np.ndarray = quotient + ((2 * remainder > count) | ((2 * remainder == count) & (quotient & 1 == 1)))
    return rounded


def sum_headroom(count: int) -> float:
    """2**s with 2**s >= count: sums of count values divided by it cannot overflow."""
    return float(1 << max(0, (count - 1).bit_length()))


def median(sources: Sequence[np.ndarray], out: np.ndarray, non_finite: np.ndarray) -> None:
    """``out`` = the coordinate-wise median (even K: the midpoint of the middle two values); NaN
    where a coordinate holds one. ``non_finite[k] = 1`` where ``sources[k]`` holds NaN or infinity."""
    check_robust(sources, out, non_finite)
    values = robust_values(sources)
    flag_non_finite(values, non_finite)
    ordered = np.sort(values, axis=0)
    middle = len(sources) // 2
    upper = ordered[middle]
    if len(sources) % 2:
        result = upper
    elif values.dtype.kind == "f":
        result = float_midpoint(ordered[middle - 1], upper)
    else:
        result = integer_midpoint(ordered[middle - 1], upper)
    if values.dtype.kind == "f":
        result = np.where(np.isnan(values).any(axis=0), np.nan, result)
    out[:] = robust_result(result, sources[0].dtype)


def trimmed_mean(sources: Sequence[np.ndarray], cut: int, out: np.ndarray, non_finite: np.ndarray) -> None:
    """``out`` = the coordinate-wise mean without the ``cut`` smallest and ``cut`` largest values;
    NaN where a coordinate holds one. ``non_finite`` as for :func:`median`.

    The kept values are summed in ascending order, each divided by :func:`sum_headroom` (so that no
    sum overflows); the sum is divided by their count and multiplied back. Integers: exact.
    """
    check_robust(sources, out, non_finite)
    check_cut(cut, len(sources))
    values = robust_values(sources)
    flag_non_finite(values, non_finite)
    count = len(sources)
    kept = np.sort(values, axis=0)[cut : count - cut]
    if values.dtype.kind == "f":
        headroom = sum_headroom(count)
        total = np.zeros(values.shape[1], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            for row in kept:  # one row at a time: the sum runs in ascending order, as in every backend
                total += row.astype(np.float64) / headroom
        result = np.where(np.isnan(values).any(axis=0), np.nan, total / len(kept) * headroom)
    else:
        result = integer_mean((kept >> 32).sum(axis=0), (kept & 0xFFFFFFFF).sum(axis=0), len(kept))
    out[:] = robust_result(result, sources[0].dtype)


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
    """``out[i] = (sum_k scales[k, i // block] * value_k(i) + offsets[i // block, (i // 8) % P]) / divisor``
    over K packed level streams of one bit width (``offsets`` has P columns, or is ``None`` for zero),
    and the continued CRC-32s as in :func:`weighted_sum_quantized`.

    ``value_k(i)`` is ``table[(rows[k, 1] * (i // 8) + rows[k, 0]) mod H, level_k(i)]`` for an H-row table, or the
    level itself when ``table`` is ``None``. The products and their sums run in float32 over blocks
    of eight clients, in client order, each block sum added to a float64 accumulator.

    Then ``out[p] += shares[k] * c`` (a float32 product) for each correction ``(p, c)`` of each client
    ``k``, in client order: ``corrections[k]`` holds its positions (little-endian uint32), then as many
    corrections (little-endian float32). Returns the first client whose positions do not increase or
    stay below ``len(out)``, or whose corrections are not finite or exceed ``limit`` in magnitude
    (``out`` and ``checksums`` are then unspecified), else -1.
    """
    scales = check_weighted_sum_levels(packed, bits, scales, block, table, rows, offsets, out, checksums)
    shares = check_corrections(corrections, shares, len(packed))
    sources = [split_corrections(source) for source in corrections or []]
    invalid = first_invalid_corrections(sources, limit, out.shape[0])
    if invalid >= 0:
        return invalid
    continue_checksums(packed, checksums)
    n = out.shape[0]
    group = np.arange(n, dtype=np.int64) >> 3
    acc = np.zeros(n, dtype=np.float64)
    for first in range(0, len(packed), CLIENT_BLOCK):
        block_sum = np.zeros(n, dtype=np.float32)
        for k in range(first, min(len(packed), first + CLIENT_BLOCK)):
            levels = unpack(packed[k], n, bits)
            if table is None:
                values = levels.astype(np.float32)
            else:
                values = table[(group * int(rows[k, 1]) + int(rows[k, 0])) & (table.shape[0] - 1), levels]
            block_sum += np.repeat(scales[k], block) * values
        acc += block_sum.astype(np.float64)
    added = np.zeros((n // block, 1)) if offsets is None else offsets
    out[:] = (acc + added[np.arange(n) // block, group & (added.shape[1] - 1)]) / divisor
    for (positions, values), share in zip(sources, shares):
        np.add.at(out, positions, share * values)
    return -1


def split_corrections(source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A client's correction bytes as its positions (int64) and corrections (float32)."""
    count = source.shape[0] // 8
    return source[: 4 * count].view("<u4").astype(np.int64), source[4 * count :].view("<f4").astype(np.float32)


def first_invalid_corrections(sources: list[tuple[np.ndarray, np.ndarray]], limit: float, n: int) -> int:
    """The first client whose positions do not increase or stay below ``n``, or whose corrections are
    not finite or exceed ``limit`` in magnitude, else -1."""
    for k, (positions, values) in enumerate(sources):
        with np.errstate(invalid="ignore"):
            finite = np.abs(values.astype(np.float64)) <= limit
        if not ((positions[1:] > positions[:-1]).all() and finite.all() and (positions < n).all()):
            return k
    return -1
