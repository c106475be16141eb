"""The codecs (uniform and rotated quantization) and the uniform codec's per-tensor encode/decode steps.

Semantics follow tensor_encoding's uniform quantizer as used by TFF's compression tutorial: each
float tensor with at least ``min_size`` elements is mapped to ``bits``-bit levels between its min
and max, with stochastic rounding by default (unbiased, Suresh et al. 2017, "Distributed Mean
Estimation with Limited Communication"). Optionally the tensor is first rotated by a randomized
Walsh-Hadamard transform, which spreads heavy tails over all coordinates and makes low-bit
quantization far more accurate (same paper, Section 4). :class:`RotatedQuantizer` reaches the
error of the best published methods at the same bits (see :mod:`fastfed.compression.rotated`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

from .._backend import kernels
from ..kernels.random_numpy import GOLDEN, MIX1, MIX2

__all__ = ["Codec", "RotatedQuantizer", "UniformQuantizer"]

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
        _check_bits(self.bits, 16)
        _check_min_size(self.min_size)
        chunk = self.rotation_chunk
        if chunk is not None and (not _is_integer(chunk) or chunk < 1 or chunk & (chunk - 1)):
            raise ValueError(f"rotation_chunk must be a power of two or None, got {chunk!r}")

    def applies_to(self, array: np.ndarray) -> bool:
        """Whether a tensor is quantized (float and large enough) rather than sent raw."""
        return _quantizes(array, self.min_size)


#: The rotation blocks RotatedQuantizer accepts: from 64 values (whole groups of eight levels sharing
#: a row of the shared-rotation table) to 2^20 (a block stays in a core's cache while it is transformed).
ROTATED_BLOCKS = (64, 1 << 20)


@dataclass(frozen=True)
class RotatedQuantizer:
    """Rotated quantization with unbiased estimates at the error of the best published methods.

    Each float tensor with at least ``min_size`` elements is rotated in blocks by randomized
    Walsh-Hadamard transforms, after which its coordinates are close to Gaussian, and quantized per
    block with a codebook designed for N(0, 1):

    * ``shared_rotation=False`` (default): every client rotates with its own seed, two rounds
      ``H D2 H D1``, and rounds each coordinate to the nearest Lloyd-Max centroid; one float per
      block, EDEN's unbiasing scale ``<y, y> / <y, q>``, makes the estimate unbiased (Vargaftik et
      al., ICML 2022, "EDEN: Communication-Efficient and Robust Distributed Mean Estimation for
      Federated Learning"; one round after DRIVE, NeurIPS 2021). A server must invert every
      client's rotation.
    * ``shared_rotation=True``: every client of a round uses the round's rotation, given by the
      server as :func:`~fastfed.compression.encode`'s ``rotation_seed``, and quantizes with shared
      randomness so that each coordinate is unbiased on its own (Ben Basat et al., ICML 2024,
      "Accelerating Federated Learning with Quick Distributed Mean Estimation", QUIC-FL): the
      server sums the levels in the rotated domain in one pass and inverts one rotation per round.
      The 1 coordinate in 512 beyond the quantizer's support also carries a correction (8 bytes).

    Args:
      bits: bits per value, 1..8.
      shared_rotation: use the round's shared rotation (see above).
      min_size: tensors with fewer elements travel as raw values.
      rotation_chunk: the rotation block (a power of two from 64 to 2^20); a tensor smaller than a
        block is padded to the next power of two (at least 64).
    """

    bits: int
    shared_rotation: bool = False
    min_size: int = 10_000
    rotation_chunk: int = 65_536

    def __post_init__(self) -> None:
        _check_bits(self.bits, 8)
        _check_min_size(self.min_size)
        chunk = self.rotation_chunk
        low, high = ROTATED_BLOCKS
        if not _is_integer(chunk) or not low <= chunk <= high or chunk & (chunk - 1):
            raise ValueError(f"rotation_chunk must be a power of two from {low} to {high}, got {chunk!r}")
        if not isinstance(self.shared_rotation, (bool, np.bool_)):
            raise TypeError(f"shared_rotation must be a bool, got {self.shared_rotation!r}")

    def applies_to(self, array: np.ndarray) -> bool:
        """Whether a tensor is quantized (float and large enough) rather than sent raw."""
        return _quantizes(array, self.min_size)


#: What compresses an update's tensors; :func:`fastfed.compression.encode` takes any codec.
Codec = UniformQuantizer | RotatedQuantizer


def _is_integer(value: object) -> TypeGuard[int]:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_bits(bits: object, most: int) -> None:
    if not _is_integer(bits) or not 1 <= bits <= most:
        raise ValueError(f"bits must be an integer in 1..{most}, got {bits!r}")


def _check_min_size(min_size: object) -> None:
    if not _is_integer(min_size) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative integer, got {min_size!r}")


def _quantizes(array: np.ndarray, min_size: int) -> bool:
    return array.dtype.kind == "f" and array.size >= max(min_size, 1)


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
