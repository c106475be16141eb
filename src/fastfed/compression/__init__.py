"""Update compression: uniform and rotated quantization, bit-packing and a safe wire format.

``encode(update, UniformQuantizer(bits=8))`` or ``encode(update, RotatedQuantizer(2))`` gives
``bytes`` that :func:`decode` turns back into the list of arrays, and that
:func:`fastfed.weighted_mean_encoded` and :meth:`fastfed.Accumulator.add_encoded` average without
materialising the float32 updates.
"""

from __future__ import annotations

from ..errors import DecodeError
from .quantizer import Codec, RotatedQuantizer, UniformQuantizer
from .wire import decode, encode, parse, raw_size_bits, size_bits

__all__ = [
    "Codec",
    "DecodeError",
    "RotatedQuantizer",
    "UniformQuantizer",
    "decode",
    "encode",
    "parse",
    "raw_size_bits",
    "size_bits",
]
