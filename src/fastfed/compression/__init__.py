"""Update compression: uniform quantization, bit-packing, random rotation and a safe wire format.

``encode(update, UniformQuantizer(bits=8))`` gives ``bytes`` that :func:`decode` turns back into the
list of arrays, and that :meth:`fastfed.Accumulator.add_encoded` averages without materialising
the float32 update.
"""

from __future__ import annotations

from ..errors import DecodeError
from .quantizer import Codec, UniformQuantizer
from .wire import decode, encode, parse, raw_size_bits, size_bits

__all__ = ["Codec", "DecodeError", "UniformQuantizer", "decode", "encode", "parse", "raw_size_bits", "size_bits"]
