"""fastfed's wire format for model updates: versioned, little-endian, checksummed, never pickle.

See ``docs/wire-format.md`` for the byte layout. :func:`parse` validates every field, every length
and the checksum before any payload byte is interpreted, and raises :class:`fastfed.DecodeError`.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DecodeError
from .quantizer import (
    Codec,
    as_float_source,
    decodable_limit,
    dequantize_tensor,
    quantize_tensor,
    rotation_shape,
    tensor_seed,
)

__all__ = [
    "Entry",
    "TableLayout",
    "checksummed_length",
    "decode",
    "encode",
    "parse",
    "parse_structure",
    "raw_size_bits",
    "raw_view",
    "size_bits",
    "stored_checksum",
    "table_layout",
]

MAGIC = b"FFUP"
VERSION = 1
CODEC_RAW = 0
CODEC_UNIFORM = 1
FLAG_STOCHASTIC = 1
FLAG_ROTATED = 2
MAX_RANK = 32
MAX_ELEMENTS = 1 << 40  # far above any model tensor, far below integer overflow anywhere
MAX_TENSORS = 1 << 16  # far above any model's layer count; bounds the work a hostile table can ask for

try:  # the native CRC-32 folds with carry-less multiplication on all cores: 10x zlib's speed
    from .._core import crc32 as crc32
except ImportError:  # pragma: no cover - exercised where the extension did not build
    from zlib import crc32 as crc32

HEADER = struct.Struct("<4sHHIQ")  # magic, version, flags, tensor count, total length
ENTRY = struct.Struct("<BBBBB3x")  # codec, bits, flags, dtype code, rank
ENTRY_TAIL = struct.Struct("<QIIddQQ")  # count, block, reserved, min, max, seed, payload length
CHECKSUM = struct.Struct("<I")  # CRC-32 of every byte before it

DTYPE_CODES = {
    np.dtype(name): code
    for code, name in enumerate(
        ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"],
        start=1,
    )
}
DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs several times more per tensor
class Entry:
    """One validated tensor of a payload; ``data`` is a zero-copy view of its bytes."""

    codec: int
    bits: int
    stochastic: bool
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    count: int
    block: int
    padded: int
    minimum: float
    maximum: float
    seed: int
    data: np.ndarray  # uint8 view of the payload bytes
    offset: int  # where data starts in the payload

    def raw_values(self) -> np.ndarray:
        """A raw tensor's flat values in native byte order: a read-only view, or a copy where the
        payload places them at an address that is not a multiple of the item size."""
        return raw_view(self.data, self.dtype)

    def decode(self) -> np.ndarray:
        if self.codec == CODEC_RAW:
            return self.raw_values().reshape(self.shape).copy()
        flat = dequantize_tensor(
            self.data, self.count, self.bits, self.minimum, self.maximum, self.block, self.padded, self.seed
        )
        return flat.astype(self.dtype, copy=False).reshape(self.shape)


def raw_view(data: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """``data`` (uint8) read as little-endian ``dtype`` values in native order, aligned for the kernels:
    tensors follow each other with no padding, so a payload may place one at any byte offset."""
    stored = dtype if np.little_endian else dtype.newbyteorder("<")
    values = data.view(stored).astype(dtype, copy=False)
    return values if values.flags.aligned else values.copy()


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little")


def encode(update: Sequence[Any], codec: Codec | None = None, *, seed: int | None = None) -> bytes:
    """Encodes a model update (a list of arrays) into one self-describing payload.

    Args:
      update: the tensors, e.g. Keras ``get_weights()`` or a model delta.
      codec: the quantizer; ``None`` sends every tensor raw (lossless).
      seed: drives stochastic rounding and rotation; the same input and seed give the same bytes on
        every backend. ``None`` draws a fresh seed from the OS.
    """
    candidate: object = update  # checked as whatever the caller passed, not as annotated
    if isinstance(candidate, np.ndarray) or not isinstance(candidate, Sequence):
        raise TypeError(f"update: expected a list of arrays, got {type(candidate).__name__}")
    if seed is None:
        seed = _random_seed()
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if len(update) > MAX_TENSORS:
        raise ValueError(f"update has {len(update)} tensors; the wire format holds at most {MAX_TENSORS}")
    table: list[bytes] = []
    payloads: list[memoryview] = []
    for index, layer in enumerate(update):
        if isinstance(layer, np.ma.MaskedArray):
            raise TypeError(f"layer {index}: masked arrays are refused, their masks would be lost; fill them first")
        array = np.asarray(layer)
        dtype = array.dtype.newbyteorder("=")
        if dtype not in DTYPE_CODES:
            raise TypeError(f"layer {index}: dtype {array.dtype} cannot be encoded; expected a float or integer array")
        if array.ndim > MAX_RANK:
            raise ValueError(f"layer {index}: rank {array.ndim} exceeds {MAX_RANK}")
        own_seed = tensor_seed(int(seed), index)
        if codec is not None and codec.applies_to(array):
            try:
                quantized = quantize_tensor(as_float_source(array), codec, own_seed, dtype)
            except ValueError as error:
                raise ValueError(f"layer {index}: cannot quantize ({error})") from None
            flags = (FLAG_STOCHASTIC if codec.stochastic else 0) | (FLAG_ROTATED if codec.rotate else 0)
            head = (CODEC_UNIFORM, codec.bits, flags)
            tail = (quantized.block, quantized.minimum, quantized.maximum, quantized.packed.nbytes)
            data = quantized.packed.data  # the array's own memoryview: no copy
        else:
            raw = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
            head, tail, data = (CODEC_RAW, 0, 0), (0, 0.0, 0.0, len(raw)), memoryview(raw)
        block, minimum, maximum, length = tail
        table.append(
            ENTRY.pack(*head, DTYPE_CODES[dtype], array.ndim)
            + struct.pack(f"<{array.ndim}Q", *array.shape)
            + ENTRY_TAIL.pack(array.size, block, 0, minimum, maximum, own_seed, length)
        )
        payloads.append(data)
    body_length = HEADER.size + sum(map(len, table)) + sum(p.nbytes for p in payloads)
    header = HEADER.pack(MAGIC, VERSION, 0, len(table), body_length + CHECKSUM.size)
    pieces: list[bytes | memoryview] = [header, *table, *payloads]
    checksum = 0
    for piece in pieces:  # continued piece by piece: the body is copied once, by the join
        checksum = crc32(piece, checksum)
    return b"".join([*pieces, CHECKSUM.pack(checksum)])


def _fail(message: str) -> DecodeError:
    return DecodeError(f"invalid fastfed payload: {message}")


def parse(payload: bytes | bytearray | memoryview) -> list[Entry]:
    """Validates a payload completely and returns its entries (zero-copy views)."""
    buffer = _as_buffer(payload)
    entries = parse_structure(buffer)
    if crc32(buffer[: buffer.nbytes - CHECKSUM.size]) != stored_checksum(buffer):
        raise _fail("checksum mismatch (corrupted in transit?)")
    return entries


def _as_buffer(payload: bytes | bytearray | memoryview) -> memoryview:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload: expected bytes, got {type(payload).__name__}")
    return memoryview(payload).cast("B")


def stored_checksum(buffer: memoryview) -> int:
    """The CRC-32 a structurally valid payload carries in its last four bytes."""
    return int(CHECKSUM.unpack_from(buffer, buffer.nbytes - CHECKSUM.size)[0])


def parse_structure(payload: bytes | bytearray | memoryview) -> list[Entry]:
    """Validates everything but the checksum, for callers that verify it while reading the data
    (:func:`fastfed.weighted_mean_encoded`); every length is still checked before use."""
    buffer = _as_buffer(payload)
    size = buffer.nbytes
    if size < HEADER.size + CHECKSUM.size:
        raise _fail(f"{size} bytes is shorter than the {HEADER.size + CHECKSUM.size}-byte minimum")
    magic, version, flags, n_tensors, total = HEADER.unpack_from(buffer, 0)
    if magic != MAGIC:
        raise _fail(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise _fail(f"format version {version} is not supported (this fastfed reads version {VERSION})")
    if flags != 0:
        raise _fail(f"unknown container flags {flags:#x}")
    if total != size:
        raise _fail(f"header says {total} bytes but {size} were given (truncated or extended)")
    if n_tensors > MAX_TENSORS:
        raise _fail(f"{n_tensors} tensors exceed the limit of {MAX_TENSORS}")
    body_end = size - CHECKSUM.size
    # Table first, so every length is known and checked before any payload is interpreted.
    heads = []
    offset = HEADER.size
    for index in range(n_tensors):
        if offset + ENTRY.size > body_end:
            raise _fail(f"tensor {index}: table runs past the end of the payload")
        codec, bits, entry_flags, dtype_code, rank = ENTRY.unpack_from(buffer, offset)
        offset += ENTRY.size
        if rank > MAX_RANK:
            raise _fail(f"tensor {index}: rank {rank} exceeds {MAX_RANK}")
        if offset + 8 * rank + ENTRY_TAIL.size > body_end:
            raise _fail(f"tensor {index}: table runs past the end of the payload")
        shape = struct.unpack_from(f"<{rank}Q", buffer, offset)
        offset += 8 * rank
        count, block, reserved, minimum, maximum, seed, length = ENTRY_TAIL.unpack_from(buffer, offset)
        offset += ENTRY_TAIL.size
        heads.append(
            (index, codec, bits, entry_flags, dtype_code, shape, count, block, reserved, minimum, maximum, seed, length)
        )
    whole = np.frombuffer(buffer, dtype=np.uint8)  # sliced per tensor: a slice is far cheaper than a new view
    entries = []
    for (
        index,
        codec,
        bits,
        entry_flags,
        dtype_code,
        shape,
        count,
        block,
        reserved,
        minimum,
        maximum,
        seed,
        length,
    ) in heads:
        if dtype_code not in DTYPES_BY_CODE:
            raise _fail(f"tensor {index}: unknown dtype code {dtype_code}")
        dtype = DTYPES_BY_CODE[dtype_code]
        if math.prod(dim for dim in shape if dim) > MAX_ELEMENTS:  # empty tensors included: NumPy cannot
            raise _fail(f"tensor {index}: shape {shape} exceeds {MAX_ELEMENTS} elements")  # hold such a shape either
        if math.prod(shape) != count:
            raise _fail(f"tensor {index}: shape {shape} does not hold {count} elements")
        if reserved != 0:
            raise _fail(f"tensor {index}: reserved field is {reserved}, expected 0")
        padded = 0
        if codec == CODEC_RAW:
            if bits or entry_flags or block or minimum or maximum:
                raise _fail(f"tensor {index}: raw tensor with quantization fields set")
            expected = count * dtype.itemsize
        elif codec == CODEC_UNIFORM:
            if not 1 <= bits <= 16:
                raise _fail(f"tensor {index}: {bits} bits is outside 1..16")
            if dtype.kind != "f":
                raise _fail(f"tensor {index}: quantized tensor of non-float dtype {dtype}")
            if entry_flags & ~(FLAG_STOCHASTIC | FLAG_ROTATED):
                raise _fail(f"tensor {index}: unknown flags {entry_flags:#x}")
            if not (math.isfinite(minimum) and math.isfinite(maximum) and minimum <= maximum):
                raise _fail(f"tensor {index}: bad range [{minimum}, {maximum}]")
            if count == 0:
                raise _fail(f"tensor {index}: quantized tensor with no elements")
            values = count
            if entry_flags & FLAG_ROTATED:
                if block == 0 or block & (block - 1) or block > MAX_ELEMENTS:
                    raise _fail(f"tensor {index}: rotation block {block} is not a power of two")
                if rotation_shape(count, block)[0] != block:
                    raise _fail(f"tensor {index}: rotation block {block} is inconsistent with {count} elements")
                block, padded = rotation_shape(count, block)
                values = padded
            elif block != 0:
                raise _fail(f"tensor {index}: rotation block set on an unrotated tensor")
            limit = decodable_limit(dtype, block)
            if max(-minimum, maximum) > limit:
                raise _fail(f"tensor {index}: range [{minimum}, {maximum}] exceeds ±{limit:.6g} (decodes to infinity)")
            expected = (values * bits + 7) // 8
        else:
            raise _fail(f"tensor {index}: unknown codec {codec}")
        if length != expected:
            raise _fail(f"tensor {index}: payload is {length} bytes, expected {expected}")
        if offset + length > body_end:
            raise _fail(f"tensor {index}: payload runs past the end of the buffer")
        data = whole[offset : offset + length]
        offset += length
        entries.append(
            Entry(
                codec,
                bits,
                bool(entry_flags & FLAG_STOCHASTIC),
                dtype,
                tuple(shape),
                count,
                block,
                padded,
                minimum,
                maximum,
                seed,
                data,
                offset - length,
            )
        )
    if offset != body_end:
        raise _fail(f"{body_end - offset} unexpected bytes after the last tensor")
    return entries


@dataclass(frozen=True)
class TableLayout:
    """The header and table of payloads laid out like one template, as a NumPy byte mask.

    Payloads of one model encoded with one codec differ in their tables only in each tensor's seed
    and, for quantized tensors, its range. A payload whose other header and table bytes equal the
    template's passes every structural check the template passed, so only its checksum and its
    ranges are left to verify; :func:`fastfed.weighted_mean_encoded` compares K tables at once this way.
    """

    size: int  # payload bytes
    table_end: int  # where the first tensor's data starts
    varying: np.ndarray  # bool (table_end,): bytes that may differ between payloads of this layout
    range_bytes: np.ndarray  # intp (tensors, 16): the bytes of each entry's float64 min, then max
    quantized: np.ndarray  # bool (tensors,)
    limits: np.ndarray  # float64 (tensors,): the decodable_limit of each quantized tensor's range

    def ranges(self, tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each payload's (min, max) per tensor, float64 (payloads, tensors), from its table bytes
        (uint8, one row of ``table_end`` bytes per payload)."""
        values = np.ascontiguousarray(tables[:, self.range_bytes]).view("<f8").astype(np.float64)
        pairs = values.reshape(len(tables), -1, 2)
        return pairs[:, :, 0], pairs[:, :, 1]


# Offsets of a table entry's min, max and seed fields from the start of its ENTRY_TAIL.
_TAIL_MINIMUM, _TAIL_MAXIMUM, _TAIL_SEED = 16, 24, 32


def table_layout(template: list[Entry], size: int) -> TableLayout:
    """The :class:`TableLayout` of a validated payload of ``size`` bytes with these entries."""
    table_end = template[0].offset if template else HEADER.size
    varying = np.zeros(table_end, dtype=bool)
    minimum_at: list[int] = []
    tail = HEADER.size
    for entry in template:
        tail += ENTRY.size + 8 * len(entry.shape)
        minimum_at.append(tail + _TAIL_MINIMUM)
        varying[tail + _TAIL_SEED : tail + _TAIL_SEED + 8] = True
        if entry.codec == CODEC_UNIFORM:
            varying[tail + _TAIL_MINIMUM : tail + _TAIL_MAXIMUM + 8] = True
        tail += ENTRY_TAIL.size
    range_bytes = np.array(minimum_at, dtype=np.intp).reshape(-1, 1) + np.arange(16)
    quantized = np.array([entry.codec == CODEC_UNIFORM for entry in template], dtype=bool)
    limits = np.array([decodable_limit(entry.dtype, entry.block) for entry in template], dtype=np.float64)
    return TableLayout(size, table_end, varying, range_bytes, quantized, limits)


def checksummed_length(size: int) -> int:
    """How many leading bytes of a ``size``-byte payload its CRC-32 covers: all but the checksum."""
    return size - CHECKSUM.size


def decode(payload: bytes | bytearray | memoryview) -> list[np.ndarray]:
    """Decodes a payload from :func:`encode` into the list of arrays (shapes and dtypes restored)."""
    return [entry.decode() for entry in parse(payload)]


def raw_size_bits(update: Sequence[Any]) -> int:
    """``size_bits(encode(update))`` for an uncompressed update, computed without encoding it."""
    arrays = [np.asarray(layer) for layer in update]
    table = sum(ENTRY.size + 8 * array.ndim + ENTRY_TAIL.size for array in arrays)
    return 8 * (HEADER.size + table + sum(array.nbytes for array in arrays) + CHECKSUM.size)


def size_bits(payload: bytes | bytearray | memoryview) -> int:
    """The exact number of bits the payload takes on the wire, header and checksum included."""
    return memoryview(payload).nbytes * 8
