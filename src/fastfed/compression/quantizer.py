"""The uniform quantization codec and its per-tensor encode/decode steps.

Semantics follow tensor_encoding's uniform quantizer as used by TFF's compression tutorial: each
float tensor with at least ``min_size`` elements is mapped to ``bits``-bit levels between its min
and max, with stochastic rounding by default (unbiased, Suresh et al. 2017, "Distributed Mean
Estimation with Limited Communication"). Optionally the tensor is first rotated by a randomized
Walsh-Hadamard transform, which spreads heavy tails over all coordinates and makes low-bit
quantization far more accurate (same paper, Section 4).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._backend import kernels
from ..kernels.random_numpy import GOLDEN, MIX1, MIX2

__all__ = ["Codec", "UniformQuantizer"]

_MASK64 = (1 << 64) - 1
STREAM_ROUNDING = 0x6A09E667F3BCC909
STREAM_SIGNS = 0xBB67AE8584CAA73B


def mix64(z: int) -> int:
    """splitmix64's output function on a Python int (Steele et al. 2014)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * int(MIX1)) & _MASK64
    z = ((z ^ (z >> 27)) * int(MIX2)) & _MASK64
    return z ^ (z >> 31)


def tensor_seed(seed: int, index: int) -> int:
    """The seed of tensor ``index`` of an update encoded with ``seed``."""
    return mix64(seed + (index + 1) * int(GOLDEN))


def stream_key(seed: int, stream: int) -> int:
    return mix64(seed ^ stream)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rotation_shape(count: int, chunk: int | None) -> tuple[int, int]:
    """(block length, padded length) for rotating ``count`` values in blocks of at most ``chunk``."""
    block = next_power_of_two(count) if chunk is None else min(chunk, next_power_of_two(count))
    return block, -(-count // block) * block


@dataclass(frozen=True)
class UniformQuantizer:
    """Uniform quantization of float tensors to ``bits`` bits per value.

    Args:
      bits: bits per value, 1..16.
      stochastic: unbiased stochastic rounding (default) instead of rounding to nearest.
      min_size: tensors with fewer elements travel as raw values (TFF's tutorial uses 10,000).
      rotate: apply a seeded randomized Walsh-Hadamard rotation before quantizing.
      rotation_chunk: rotate in blocks of this many values (a power of two) so that padding costs
        at most one block; ``None`` rotates each tensor whole, padded to a power of two.
    """

    bits: int = 8
    stochastic: bool = True
    min_size: int = 10_000
    rotate: bool = False
    rotation_chunk: int | None = 65_536

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)) or not 1 <= self.bits <= 16:
            raise ValueError(f"bits must be an integer in 1..16, got {self.bits!r}")
        if not isinstance(self.min_size, (int, np.integer)) or self.min_size < 0:
            raise ValueError(f"min_size must be a non-negative integer, got {self.min_size!r}")
        chunk = self.rotation_chunk
        if chunk is not None and (not isinstance(chunk, (int, np.integer)) or chunk < 1 or chunk & (chunk - 1)):
            raise ValueError(f"rotation_chunk must be a power of two or None, got {chunk!r}")

    def applies_to(self, array: np.ndarray) -> bool:
        """Whether a tensor is quantized (float and large enough) rather than sent raw."""
        return array.dtype.kind == "f" and array.size >= max(self.min_size, 1)


#: What compresses an update's tensors; :func:`fastfed.compression.encode` takes any codec.
Codec = UniformQuantizer


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized tensor: the packed levels and what is needed to decode them."""

    packed: np.ndarray
    minimum: float
    maximum: float
    block: int  # rotation block length, 0 when not rotated
    padded: int


@functools.lru_cache(maxsize=256)  # called once per quantized tensor of every payload parsed
def decodable_limit(dtype: np.dtype[Any], block: int) -> float:
    """The largest ``|min|`` or ``|max|`` of a quantized tensor of ``dtype`` whose levels decode to
    finite values: levels decode through float32 (float16 for float16 tensors), and undoing a
    rotation of ``block`` values can grow a value by up to ``sqrt(block)``."""
    largest = float(np.finfo(np.float16 if dtype == np.float16 else np.float32).max)
    return largest / math.sqrt(block) if block else largest


def quantize_tensor(values: np.ndarray, codec: UniformQuantizer, seed: int, dtype: np.dtype[Any]) -> QuantizedTensor:
    """Quantizes a flat float32/float64 array of a ``dtype`` tensor (finite values only).

    Raises ``ValueError`` when the values reach beyond :func:`decodable_limit`, where decoding
    would give infinities.
    """
    count = values.shape[0]
    source = values
    block = padded = 0
    if codec.rotate:
        block, padded = rotation_shape(count, codec.rotation_chunk)
        source = np.empty(padded, dtype=np.float64)
        kernels().rotate.rotate(values, block, stream_key(seed, STREAM_SIGNS), source)
    quantize = kernels().quantize
    # + 0.0 turns -0.0 into +0.0: SIMD and NumPy reductions may pick either zero, the header may not.
    minimum, maximum = (value + 0.0 for value in quantize.min_max(source))
    limit = decodable_limit(dtype, block)
    if max(-minimum, maximum) > limit:
        raise ValueError(
            f"values reach {max(-minimum, maximum):.6g}, beyond the ±{limit:.6g} that quantized {dtype} values "
            "decode to; send this tensor raw (raise min_size or use no codec) or rescale it"
        )
    levels = float(2**codec.bits - 1)
    scale = levels / (maximum - minimum) if maximum > minimum else 0.0
    if not math.isfinite(scale):  # a range too narrow to divide by, far below float32 resolution
        maximum, scale = minimum, 0.0
    packed = np.empty((source.shape[0] * codec.bits + 7) // 8, dtype=np.uint8)
    quantize.quantize_pack(
        source, codec.bits, codec.stochastic, stream_key(seed, STREAM_ROUNDING), minimum, scale, packed
    )
    return QuantizedTensor(packed, minimum, maximum, block, padded)


def dequantization_step(bits: int, minimum: float, maximum: float) -> float:
    return (maximum - minimum) / float(2**bits - 1)


def dequantize_tensor(
    packed: np.ndarray, count: int, bits: int, minimum: float, maximum: float, block: int, padded: int, seed: int
) -> np.ndarray:
    """Decodes one tensor to a flat float32 array."""
    quantize = kernels().quantize
    step = dequantization_step(bits, minimum, maximum)
    out = np.empty(count, dtype=np.float32)
    if block == 0:
        quantize.unpack_dequantize(packed, bits, minimum, step, out)
        return out
    rotated = np.empty(padded, dtype=np.float64)
    quantize.unpack_dequantize(packed, bits, minimum, step, rotated)
    kernels().rotate.unrotate(rotated, block, stream_key(seed, STREAM_SIGNS), out)
    return out


def as_float_source(array: np.ndarray) -> Any:
    """A flat, contiguous float32/float64 array for the kernels (float16 widens exactly to float32)."""
    dtype = np.float64 if array.dtype == np.float64 else np.float32
    return np.require(array, dtype=dtype, requirements=("C", "A")).reshape(-1)
