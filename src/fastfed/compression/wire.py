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
    ROTATED_BLOCKS,
    Codec,
    RotatedQuantizer,
    as_float_source,
    decodable_limit,
    dequantize_tensor,
    quantize_tensor,
    rotation_shape,
    tensor_seed,
)
from .rotated import decode_rotated, quantize_rotated, rotated_shape

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
# Version 2 adds the rotated codecs. A payload is written with the lowest version that holds it, so
# payloads without rotated tensors stay version 1, byte for byte as before, for older readers.
VERSIONS = (1, 2)
CODEC_RAW = 0
CODEC_UNIFORM = 1
CODEC_ROTATED = 2  # RotatedQuantizer, independent rotation (version 2)
CODEC_ROTATED_SHARED = 3  # RotatedQuantizer(shared_rotation=True) (version 2)
ROTATED_CODECS = (CODEC_ROTATED, CODEC_ROTATED_SHARED)
FLAG_STOCHASTIC = 1
FLAG_ROTATED = 2
MAX_RANK = 32
MAX_ELEMENTS = 1 << 40  # far above any model tensor, far below integer overflow anywhere
MAX_TENSORS = 1 << 16  # far above any model's layer count; bounds the work a hostile table can ask for
MAX_ROTATED_ELEMENTS = 1 << 32  # positions of corrections are u32
VALUE_LIMIT = 2.0**100  # largest rotated block scale or correction: every decode stays finite

try:  # the native CRC-32 folds with carry-less multiplication on all cores: 10x zlib's speed
    from .._core import crc32 as crc32
except ImportError:  # pragma: no cover - exercised where the extension did not build
    from zlib import crc32 as crc32

HEADER = struct.Struct("<4sHHIQ")  # magic, version, flags, tensor count, total length
ENTRY = struct.Struct("<BBBBB3x")  # codec, bits, flags, dtype code, rank
ENTRY_TAIL = struct.Struct("<QII16sQQ")  # count, block, reserved, codec parameters, seed, payload length
RANGE = struct.Struct("<dd")  # the codec parameters of raw and uniform tensors: min, max
ROTATION = struct.Struct("<QQ")  # ... of rotated tensors: shared rotation seed, count of corrections
CHECKSUM = struct.Struct("<I")  # CRC-32 of every byte before it
NO_PARAMETERS = bytes(RANGE.size)

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
    rotation_seed: int = 0  # rotated tensors: the shared rotation's seed (0 for an independent rotation)
    outliers: int = 0  # shared-rotation tensors: how many values beyond the support carry a correction

    def raw_values(self) -> np.ndarray:
        """A raw tensor's flat values in native byte order: a read-only view, or a copy where the
        payload places them at an address that is not a multiple of the item size."""
        return raw_view(self.data, self.dtype)

    @property
    def scale_bytes(self) -> int:
        """Rotated tensors: the bytes of the float32 block scales that open the payload."""
        return 4 * (self.padded // self.block)

    def scales(self) -> np.ndarray:
        """A rotated tensor's float32 block scales."""
        return raw_view(self.data[: self.scale_bytes], np.dtype(np.float32))

    def levels(self) -> np.ndarray:
        """A quantized tensor's packed levels (uint8)."""
        if self.codec in ROTATED_CODECS:
            return self.data[self.scale_bytes : self.scale_bytes + (self.padded * self.bits + 7) // 8]
        return self.data

    def corrections(self) -> tuple[np.ndarray, np.ndarray]:
        """A shared-rotation tensor's corrections: (uint32 positions in the rotated tensor, float32 corrections)."""
        start = self.data.shape[0] - 8 * self.outliers
        positions = raw_view(self.data[start : start + 4 * self.outliers], np.dtype(np.uint32))
        return positions, raw_view(self.data[start + 4 * self.outliers :], np.dtype(np.float32))

    def check_values(self) -> str | None:
        """What is wrong with a rotated tensor's scales or corrections, or ``None``; the decoder relies
        on these bounds to stay in range and finite."""
        if self.codec not in ROTATED_CODECS:
            return None
        if not scales_valid(self.scales()):
            return SCALES_PROBLEM
        return corrections_problem(*self.corrections(), self.padded)

    def decode(self) -> np.ndarray:
        if self.codec == CODEC_RAW:
            return self.raw_values().reshape(self.shape).copy()
        if self.codec in ROTATED_CODECS:
            shared = self.rotation_seed if self.codec == CODEC_ROTATED_SHARED else None
            flat = decode_rotated(
                self.bits, self.count, self.block, self.seed, shared, self.scales(), self.levels(), self.corrections()
            )
            if self.dtype == np.float16:
                saturate_float16(flat)
        else:
            flat = dequantize_tensor(
                self.data, self.count, self.bits, self.minimum, self.maximum, self.block, self.padded, self.seed
            )
        return flat.astype(self.dtype, copy=False).reshape(self.shape)


SCALES_PROBLEM = "block scales must be finite, non-negative and at most 2^100"


def saturate_float16(values: np.ndarray) -> np.ndarray:
    """Clips finite ``values`` to float16's range, in place, before they become float16: quantization
    error can carry values near the range's edge past it (a decoded rotated tensor, weights rebuilt
    from a decoded delta), and the cast would round them to infinity."""
    largest = float(np.finfo(np.float16).max)
    np.clip(values, -largest, largest, out=values, where=np.isfinite(values))
    return values


def scales_valid(scales: np.ndarray) -> np.ndarray:
    """Whether a rotated tensor's block scales (the last axis) are finite, non-negative and at most 2^100."""
    with np.errstate(invalid="ignore"):
        return np.asarray((np.isfinite(scales) & (scales >= 0) & (scales <= VALUE_LIMIT)).all(axis=-1))


def corrections_problem(positions: np.ndarray, corrections: np.ndarray, padded: int) -> str | None:
    """What is wrong with a shared-rotation tensor's corrections (positions in the padded tensor), or ``None``."""
    if positions.size and (positions[-1] >= padded or (positions[1:] <= positions[:-1]).any()):
        return f"positions of corrections must increase and stay below {padded}"
    if not (np.isfinite(corrections).all() and (np.abs(corrections) <= VALUE_LIMIT).all()):
        return "corrections must be finite and at most 2^100 in magnitude"
    return None


def raw_view(data: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """``data`` (uint8) read as little-endian ``dtype`` values in native order, aligned for the kernels:
    tensors follow each other with no padding, so a payload may place one at any byte offset."""
    stored = dtype if np.little_endian else dtype.newbyteorder("<")
    values = data.view(stored).astype(dtype, copy=False)
    return values if values.flags.aligned else values.copy()


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little")


def _check_seed(name: str, seed: object) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def encode(
    update: Sequence[Any], codec: Codec | None = None, *, seed: int | None = None, rotation_seed: int | None = None
) -> bytes:
    """Encodes a model update (a list of arrays) into one self-describing payload.

    Args:
      update: the tensors, e.g. Keras ``get_weights()`` or a model delta.
      codec: the quantizer; ``None`` sends every tensor raw (lossless).
      seed: drives stochastic rounding, rotation and shared randomness; the same input and seeds
        give the same bytes on every backend. ``None`` draws a fresh seed from the OS. Each client
        needs its own.
      rotation_seed: the round's rotation, which every client of a round must share, for
        ``RotatedQuantizer(shared_rotation=True)`` (the server chooses it: :class:`fastfed.FedAvg`
        uses its round seed, the Flower strategies send it in the fit config). Other codecs ignore it.
    """
    candidate: object = update  # checked as whatever the caller passed, not as annotated
    if isinstance(candidate, np.ndarray) or not isinstance(candidate, Sequence):
        raise TypeError(f"update: expected a list of arrays, got {type(candidate).__name__}")
    seed = _check_seed("seed", _random_seed() if seed is None else seed)
    shared = isinstance(codec, RotatedQuantizer) and codec.shared_rotation
    if shared and rotation_seed is None:
        raise ValueError(
            "RotatedQuantizer(shared_rotation=True) needs rotation_seed: the round's seed, the same for "
            "every client of the round, which the server chooses"
        )
    round_seed = _check_seed("rotation_seed", rotation_seed) if shared and rotation_seed is not None else 0
    if len(update) > MAX_TENSORS:
        raise ValueError(f"update has {len(update)} tensors; the wire format holds at most {MAX_TENSORS}")
    version = 1
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
        own_seed = tensor_seed(seed, index)
        if codec is not None and codec.applies_to(array):
            try:
                head, block, parameters, pieces = _quantized(
                    array, dtype, codec, own_seed, tensor_seed(round_seed, index)
                )
            except ValueError as error:
                raise ValueError(f"layer {index}: cannot quantize ({error})") from None
            version = max(version, 2 if head[0] in ROTATED_CODECS else 1)
        else:
            raw = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
            head, block, parameters, pieces = (CODEC_RAW, 0, 0), 0, NO_PARAMETERS, [memoryview(raw)]
        table.append(
            ENTRY.pack(*head, DTYPE_CODES[dtype], array.ndim)
            + struct.pack(f"<{array.ndim}Q", *array.shape)
            + ENTRY_TAIL.pack(array.size, block, 0, parameters, own_seed, sum(piece.nbytes for piece in pieces))
        )
        payloads.extend(pieces)
    body_length = HEADER.size + sum(map(len, table)) + sum(p.nbytes for p in payloads)
    header = HEADER.pack(MAGIC, version, 0, len(table), body_length + CHECKSUM.size)
    parts: list[bytes | memoryview] = [header, *table, *payloads]
    checksum = 0
    for part in parts:  # continued part by part: the body is copied once, by the join
        checksum = crc32(part, checksum)
    return b"".join([*parts, CHECKSUM.pack(checksum)])


def _quantized(
    array: np.ndarray, dtype: np.dtype[Any], codec: Codec, seed: int, rotation_seed: int
) -> tuple[tuple[int, int, int], int, bytes, list[memoryview]]:
    """A quantized tensor's (codec, bits, flags), rotation block, codec parameters and payload pieces."""
    if isinstance(codec, RotatedQuantizer):
        if array.size > MAX_ROTATED_ELEMENTS:
            raise ValueError(f"{array.size} elements; RotatedQuantizer takes at most 2^32")
        rotated = quantize_rotated(as_float_source(array), codec, seed, rotation_seed)
        head = (CODEC_ROTATED_SHARED if codec.shared_rotation else CODEC_ROTATED, codec.bits, 0)
        parameters = ROTATION.pack(rotated.rotation_seed, rotated.outlier_index.shape[0])
        return head, rotated.block, parameters, rotated.pieces()
    quantized = quantize_tensor(as_float_source(array), codec, seed, dtype)
    flags = (FLAG_STOCHASTIC if codec.stochastic else 0) | (FLAG_ROTATED if codec.rotate else 0)
    parameters = RANGE.pack(quantized.minimum, quantized.maximum)
    return (CODEC_UNIFORM, codec.bits, flags), quantized.block, parameters, [quantized.packed.data]  # no copy


def _fail(message: str) -> DecodeError:
    return DecodeError(f"invalid fastfed payload: {message}")


def parse(payload: bytes | bytearray | memoryview) -> list[Entry]:
    """Validates a payload completely and returns its entries (zero-copy views)."""
    buffer = _as_buffer(payload)
    entries = parse_structure(buffer)
    if crc32(buffer[: buffer.nbytes - CHECKSUM.size]) != stored_checksum(buffer):
        raise _fail("checksum mismatch (corrupted in transit?)")
    check_values(entries)
    return entries


def check_values(entries: list[Entry]) -> None:
    """Validates what lies inside rotated tensors' payloads (block scales, corrections), which the
    structure alone does not bound; ``DecodeError`` names the tensor."""
    for index, entry in enumerate(entries):
        problem = entry.check_values()
        if problem is not None:
            raise _fail(f"tensor {index}: {problem}")


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
    if version not in VERSIONS:
        raise _fail(f"format version {version} is not supported (this fastfed reads versions 1 and 2)")
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
        count, block, reserved, parameters, seed, length = ENTRY_TAIL.unpack_from(buffer, offset)
        offset += ENTRY_TAIL.size
        heads.append(
            (index, codec, bits, entry_flags, dtype_code, shape, count, block, reserved, parameters, seed, length)
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
        parameters,
        seed,
        length,
    ) in heads:
        minimum, maximum = RANGE.unpack(parameters)
        rotation_seed = outliers = 0
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
            if bits or entry_flags or block or parameters != NO_PARAMETERS:
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
        elif codec in ROTATED_CODECS and version >= 2:
            minimum = maximum = 0.0
            rotation_seed, outliers = ROTATION.unpack(parameters)
            if not 1 <= bits <= 8:
                raise _fail(f"tensor {index}: {bits} bits is outside 1..8 for a rotated tensor")
            if dtype.kind != "f":
                raise _fail(f"tensor {index}: quantized tensor of non-float dtype {dtype}")
            if entry_flags != 0:
                raise _fail(f"tensor {index}: unknown flags {entry_flags:#x}")
            if not 1 <= count <= MAX_ROTATED_ELEMENTS:
                raise _fail(f"tensor {index}: a rotated tensor holds 1 to 2^32 elements, not {count}")
            low, high = ROTATED_BLOCKS
            if not low <= block <= high or block & (block - 1) or rotated_shape(count, block)[0] != block:
                raise _fail(f"tensor {index}: rotation block {block} is inconsistent with {count} elements")
            padded = rotated_shape(count, block)[1]
            if codec == CODEC_ROTATED and (rotation_seed or outliers):
                raise _fail(f"tensor {index}: independent rotation with shared-rotation fields set")
            if outliers > padded:
                raise _fail(f"tensor {index}: {outliers} corrections for {padded} rotated values")
            expected = 4 * (padded // block) + (padded * bits + 7) // 8 + 8 * outliers
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
                rotation_seed,
                outliers,
            )
        )
    if offset != body_end:
        raise _fail(f"{body_end - offset} unexpected bytes after the last tensor")
    return entries


@dataclass(frozen=True)
class TableLayout:
    """The header and table of payloads laid out like one template, as a NumPy byte mask.

    Payloads of one model encoded with one codec differ in their tables only in each tensor's seed
    and, for uniform tensors, its range, and for shared-rotation tensors, the count of corrections
    and so the payload length. A payload whose other header and table bytes equal the template's,
    and whose lengths agree with its counts, passes every structural check the template passed, so
    only its checksum, ranges and values are left to verify; :func:`fastfed.weighted_mean_encoded`
    compares K tables at once this way.
    """

    size: int  # the template's payload bytes
    table_end: int  # where the first tensor's data starts
    varying: np.ndarray  # bool (table_end,): bytes that may differ between payloads of this layout
    tails: np.ndarray  # intp (tensors,): where each entry's ENTRY_TAIL starts
    codecs: np.ndarray  # uint8 (tensors,)
    limits: np.ndarray  # float64 (tensors,): the decodable_limit of each uniform tensor's range

    def field(self, tables: np.ndarray, offset: int, dtype: str) -> np.ndarray:
        """An 8-byte field at ``offset`` in every entry's tail, for each payload: (payloads, tensors),
        from the table bytes (uint8, one row of ``table_end`` bytes per payload)."""
        columns = self.tails[:, None] + offset + np.arange(8)
        values = np.ascontiguousarray(tables[:, columns]).view(dtype).reshape(len(tables), -1)
        return values.astype(np.dtype(dtype).newbyteorder("="))

    def totals(self, tables: np.ndarray) -> np.ndarray:
        """Each payload's total length, as its header states it."""
        return (
            np.ascontiguousarray(tables[:, _HEADER_TOTAL : _HEADER_TOTAL + 8]).view("<u8").reshape(-1).astype(np.uint64)
        )

    def ranges(self, tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each payload's (min, max) per tensor, float64 (payloads, tensors)."""
        return self.field(tables, _TAIL_MINIMUM, "<f8"), self.field(tables, _TAIL_MAXIMUM, "<f8")

    def seeds(self, tables: np.ndarray) -> np.ndarray:
        """Each payload's seed per tensor, uint64 (payloads, tensors)."""
        return self.field(tables, _TAIL_SEED, "<u8")

    def correction_counts(self, tables: np.ndarray) -> np.ndarray:
        """Each payload's count of corrections per shared-rotation tensor, uint64 (payloads, tensors);
        meaningless for other tensors."""
        return self.field(tables, _TAIL_OUTLIERS, "<u8")

    def payload_lengths(self, tables: np.ndarray) -> np.ndarray:
        """Each payload's data length per tensor, uint64 (payloads, tensors)."""
        return self.field(tables, _TAIL_LENGTH, "<u8")


_HEADER_TOTAL = 12  # where the header's total length sits

# Offsets of a table entry's fields from the start of its ENTRY_TAIL; a rotated tensor's count of
# corrections sits where a uniform tensor's max does.
_TAIL_MINIMUM, _TAIL_MAXIMUM, _TAIL_SEED, _TAIL_LENGTH = 16, 24, 32, 40
_TAIL_OUTLIERS = _TAIL_MAXIMUM


def table_layout(template: list[Entry], size: int) -> TableLayout:
    """The :class:`TableLayout` of a validated payload of ``size`` bytes with these entries."""
    table_end = template[0].offset if template else HEADER.size
    varying = np.zeros(table_end, dtype=bool)
    if any(entry.codec == CODEC_ROTATED_SHARED for entry in template):
        varying[_HEADER_TOTAL : _HEADER_TOTAL + 8] = True  # the payload length follows the counts of corrections
    tails: list[int] = []
    tail = HEADER.size
    for entry in template:
        tail += ENTRY.size + 8 * len(entry.shape)
        tails.append(tail)
        varying[tail + _TAIL_SEED : tail + _TAIL_SEED + 8] = True
        if entry.codec == CODEC_UNIFORM:
            varying[tail + _TAIL_MINIMUM : tail + _TAIL_MAXIMUM + 8] = True
        if entry.codec == CODEC_ROTATED_SHARED:
            varying[tail + _TAIL_OUTLIERS : tail + _TAIL_OUTLIERS + 8] = True
            varying[tail + _TAIL_LENGTH : tail + _TAIL_LENGTH + 8] = True
        tail += ENTRY_TAIL.size
    codecs = np.array([entry.codec for entry in template], dtype=np.uint8)
    limits = np.array([decodable_limit(entry.dtype, entry.block) for entry in template], dtype=np.float64)
    return TableLayout(size, table_end, varying, np.array(tails, dtype=np.intp), codecs, limits)


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
