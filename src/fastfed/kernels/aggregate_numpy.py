"""NumPy reference for ``cpp/aggregate``: weighted sums accumulated in float64, of float buffers
or of packed quantized levels.

Every element is summed in client order, ``acc = ((0 + w0*x0) + w1*x1) + ...``, then divided once;
the native and Numba kernels follow exactly this order, so all three agree bit for bit.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from ._checks import check_accumulate, check_weighted_sum, check_weighted_sum_levels, check_weighted_sum_quantized
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
) -> None:
    """``out[i] = (sum_k scales[k, i // block] * value_k(i) + offsets[i // block, (i // 8) % P]) / divisor``
    over K packed level streams of one bit width (``offsets`` has P columns, or is ``None`` for zero),
    and the continued CRC-32s as in :func:`weighted_sum_quantized`.

    ``value_k(i)`` is ``table[(rows[k, 1] * (i // 8) + rows[k, 0]) mod H, level_k(i)]`` for an H-row table, or the
    level itself when ``table`` is ``None``. The products and their sums run in float32 over blocks
    of eight clients, in client order, each block sum added to a float64 accumulator.
    """
    scales = check_weighted_sum_levels(packed, bits, scales, block, table, rows, offsets, out, checksums)
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
