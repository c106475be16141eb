"""NumPy reference for ``cpp/quantize``: uniform quantization, bit-packing, Hadamard rotation.

Quantization follows tensor_encoding's uniform quantizer: ``v = (x - min) * (2^b - 1) / (max - min)``
rounded to ``floor(v + 0.5)`` (nearest) or ``floor(v + u)`` with ``u ~ U[0, 1)`` (unbiased stochastic
rounding, Suresh et al. 2017, "Distributed Mean Estimation with Limited Communication"). The uniforms
and rotation signs come from splitmix64 (Steele et al. 2014) applied to ``key + (index + 1) * golden``,
a counter-based stream that every backend reproduces exactly.

Packing: value ``i`` occupies bits ``[i*b, (i+1)*b)`` of a little-endian, LSB-first bit stream.
"""

from __future__ import annotations

import zlib

import numpy as np

from ._checks import (
    check_weighted_sum_quantized,
    require_bits,
    require_flat,
    require_float,
    require_packed,
    require_rotation_shape,
)

__all__ = [
    "min_max",
    "quantize_pack",
    "random_bits",
    "rotate",
    "unpack_dequantize",
    "unpack_dequantize_accumulate",
    "unrotate",
    "weighted_sum_quantized",
]

# splitmix64's increment and multipliers (Steele et al. 2014); every backend and the seed
# derivation in fastfed.compression use these.
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return np.asarray(z ^ (z >> np.uint64(31)))


def random_bits(key: int, start: int, count: int) -> np.ndarray:
    """splitmix64 outputs for indices ``start .. start+count-1`` of the stream ``key``."""
    index = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    return _mix64(np.uint64(key) + index * GOLDEN)


def random_uniform(key: int, count: int) -> np.ndarray:
    return (random_bits(key, 0, count) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def random_signs(key: int, count: int) -> np.ndarray:
    return np.where(random_bits(key, 0, count) >> np.uint64(63) == 1, 1.0, -1.0)


def min_max(x: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of a finite float array; ``ValueError`` on NaN or infinity."""
    require_float(x, "x")
    if x.shape[0] == 0:
        raise ValueError("x: expected at least one element")
    if not np.isfinite(x).all():
        raise ValueError("x: contains NaN or infinite values")
    return float(x.min()), float(x.max())


def quantize(x: np.ndarray, bits: int, stochastic: bool, key: int, offset: float, scale: float) -> np.ndarray:
    """The quantized levels ``q`` as uint32, before packing."""
    levels = float(2**bits - 1)
    v = (x.astype(np.float64) - offset) * scale
    dither = random_uniform(key, x.shape[0]) if stochastic else 0.5
    return np.minimum(np.floor(v + dither), levels).astype(np.uint32)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Packs levels of ``bits`` bits each, LSB first, into ``ceil(n*bits/8)`` bytes."""
    stream = ((q[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    stream = np.unpackbits(packed, count=n * bits, bitorder="little").reshape(n, bits).astype(np.uint32)
    return np.asarray((stream << np.arange(bits, dtype=np.uint32)).sum(axis=1, dtype=np.uint32))


def quantize_pack(
    x: np.ndarray, bits: int, stochastic: bool, key: int, offset: float, scale: float, out: np.ndarray
) -> None:
    """``out = pack(round((x - offset) * scale))``."""
    require_bits(bits)
    require_float(x, "x")
    require_packed(out, x.shape[0], bits, "out")
    out[:] = pack(quantize(x, bits, stochastic, key, offset, scale), bits)


def unpack_dequantize(packed: np.ndarray, bits: int, offset: float, step: float, out: np.ndarray) -> None:
    """``out = offset + unpack(packed) * step``."""
    require_bits(bits)
    require_float(out, "out")
    require_packed(packed, out.shape[0], bits, "packed")
    out[:] = offset + unpack(packed, out.shape[0], bits).astype(np.float64) * step


def unpack_dequantize_accumulate(
    packed: np.ndarray, bits: int, offset: float, step: float, weight: float, acc: np.ndarray
) -> None:
    """``acc += weight * float32(offset + unpack(packed) * step)``."""
    require_bits(bits)
    require_flat(acc, "acc")
    require_packed(packed, acc.shape[0], bits, "packed")
    decoded = (offset + unpack(packed, acc.shape[0], bits).astype(np.float64) * step).astype(np.float32)
    acc += weight * decoded.astype(np.float64)


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


def hadamard(blocks: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform of each row (length a power of two)."""
    rows, length = blocks.shape
    y = blocks.copy()
    half = 1
    while half < length:
        pairs = y.reshape(rows, length // (2 * half), 2, half)
        a = pairs[:, :, 0, :].copy()
        b = pairs[:, :, 1, :]
        pairs[:, :, 0, :] = a + b
        pairs[:, :, 1, :] = a - b
        half *= 2
    return np.asarray(y * (1.0 / np.sqrt(float(length))))


def rotate(x: np.ndarray, chunk: int, key: int, out: np.ndarray) -> None:
    """``out = blockwise H D pad(x)``: randomized Walsh-Hadamard rotation."""
    require_float(x, "x")
    require_flat(out, "out")
    n, padded = x.shape[0], out.shape[0]
    require_rotation_shape(n, chunk, padded)
    signed = np.zeros(padded, dtype=np.float64)
    signed[:n] = x.astype(np.float64) * random_signs(key, n)
    out[:] = hadamard(signed.reshape(-1, chunk)).reshape(-1)


def unrotate(y: np.ndarray, chunk: int, key: int, out: np.ndarray) -> None:
    """``out = (D H y)[:len(out)]``, the inverse of :func:`rotate`."""
    require_flat(y, "y")
    require_float(out, "out")
    n, padded = out.shape[0], y.shape[0]
    require_rotation_shape(n, chunk, padded)
    restored = hadamard(y.reshape(-1, chunk)).reshape(-1)[:n]
    out[:] = restored * random_signs(key, n)
