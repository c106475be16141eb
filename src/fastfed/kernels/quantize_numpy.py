"""NumPy reference for ``cpp/quantize``: uniform quantization and bit-packing.

Quantization follows tensor_encoding's uniform quantizer: ``v = (x - min) * (2^b - 1) / (max - min)``
rounded to ``floor(v + 0.5)`` (nearest) or ``floor(v + u)`` with ``u ~ U[0, 1)`` (unbiased stochastic
rounding, Suresh et al. 2017, "Distributed Mean Estimation with Limited Communication"). The uniforms
come from the counter-based stream of :mod:`fastfed.kernels.random_numpy`.

Packing: value ``i`` occupies bits ``[i*b, (i+1)*b)`` of a little-endian, LSB-first bit stream.
"""

from __future__ import annotations

import numpy as np

from ._checks import require_bits, require_flat, require_float, require_packed
from .random_numpy import random_uniform

__all__ = [
    "min_max",
    "pack",
    "quantize",
    "quantize_pack",
    "unpack",
    "unpack_dequantize",
    "unpack_dequantize_accumulate",
]


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
