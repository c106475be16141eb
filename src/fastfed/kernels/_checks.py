"""Argument checks shared by the Python kernel twins, matching the native boundary's checks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_FLOAT_OUT = (np.dtype(np.float32), np.dtype(np.float64))


def require_flat(array: np.ndarray, name: str) -> None:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array")
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got {array.ndim}-D")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array")
    if not array.flags.aligned:
        raise ValueError(f"{name}: expected an aligned array (its address is not a multiple of the item size)")
    if array.dtype.byteorder == ">":
        raise ValueError(f"{name}: big-endian arrays must be converted by the caller")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{name}: unsupported dtype {array.dtype}")


def _check_sources_and_out(sources: Sequence[np.ndarray], out: np.ndarray) -> None:
    """Flat, aligned arrays: a writeable ``out``, and sources of its length and of one dtype."""
    require_flat(out, "out")
    if not out.flags.writeable:
        raise ValueError("out: array is read-only")
    for k, source in enumerate(sources):
        require_flat(source, f"sources[{k}]")
        if source.shape != out.shape:
            raise ValueError(f"sources[{k}]: expected {out.shape[0]} elements, got {source.shape[0]}")
        if source.dtype != sources[0].dtype:
            raise ValueError(f"sources[{k}]: dtype differs from sources[0]")


def check_weighted_sum(sources: Sequence[np.ndarray], weights: np.ndarray, out: np.ndarray) -> np.ndarray:
    if len(sources) == 0:
        raise ValueError("sources: expected at least one array")
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if weights.shape != (len(sources),):
        raise ValueError(f"weights: expected shape ({len(sources)},)")
    _check_sources_and_out(sources, out)
    if out.dtype not in _FLOAT_OUT or (out.dtype != np.float64 and out.dtype != sources[0].dtype):
        raise ValueError("out: dtype must be float64, or float32 for float32 sources")
    return weights


def check_accumulate(acc: np.ndarray, source: np.ndarray) -> None:
    require_flat(acc, "acc")
    require_flat(source, "source")
    if acc.dtype != np.float64:
        raise ValueError("acc: expected float64")
    if acc.shape != source.shape:
        raise ValueError(f"source: expected {acc.shape[0]} elements, got {source.shape[0]}")


def packed_bytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def require_bits(bits: int) -> None:
    if not 1 <= bits <= 16:
        raise ValueError(f"bits: expected 1..16, got {bits}")


def require_float(array: np.ndarray, name: str) -> None:
    require_flat(array, name)
    if array.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}: expected float32 or float64")


def require_float32(array: np.ndarray, name: str) -> None:
    require_flat(array, name)
    if array.dtype != np.float32:
        raise ValueError(f"{name}: expected float32")


def require_packed(packed: np.ndarray, n: int, bits: int, name: str) -> None:
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D uint8 array")
    if packed.shape[0] != packed_bytes(n, bits):
        raise ValueError(
            f"{name}: expected {packed_bytes(n, bits)} bytes for {n} values of {bits} bits, got {packed.shape[0]}"
        )


def require_rotation_shape(n: int, chunk: int, padded: int) -> None:
    if chunk <= 0 or chunk & (chunk - 1):
        raise ValueError(f"chunk: expected a power of two, got {chunk}")
    if padded % chunk or padded < n or padded - n >= chunk:
        raise ValueError(f"padded length {padded} does not fit {n} values in chunks of {chunk}")


MIN_ROTATED_BLOCK = 64  # whole groups of eight levels, and sixteen-lane sums, in every block


def require_block(block: int) -> None:
    if block < MIN_ROTATED_BLOCK or block & (block - 1):
        raise ValueError(f"block: expected a power of two >= {MIN_ROTATED_BLOCK}, got {block}")


def require_rounds(keys: Sequence[int]) -> None:
    if len(keys) not in (1, 2):
        raise ValueError(f"keys: expected one or two rotation keys (one per round), got {len(keys)}")


def check_weighted_sum_quantized(
    packed: Sequence[np.ndarray], bits: int, scales: np.ndarray, out: np.ndarray, checksums: np.ndarray
) -> np.ndarray:
    """Checks the arguments of ``weighted_sum_quantized``; returns the scales as float32."""
    require_bits(bits)
    require_float(out, "out")
    if len(packed) == 0:
        raise ValueError("packed: expected at least one array")
    scales = np.ascontiguousarray(scales, dtype=np.float32)
    if scales.shape != (len(packed),):
        raise ValueError(f"scales: expected shape ({len(packed)},)")
    if (
        not isinstance(checksums, np.ndarray)
        or checksums.dtype != np.uint32
        or checksums.shape != (len(packed),)
        or not checksums.flags.writeable
        or not checksums.flags.c_contiguous
    ):
        raise ValueError(f"checksums: expected a writable, contiguous uint32 array of shape ({len(packed)},)")
    for k, data in enumerate(packed):
        require_packed(data, out.shape[0], bits, f"packed[{k}]")
    return scales


def check_robust(sources: Sequence[np.ndarray], out: np.ndarray, non_finite: np.ndarray) -> None:
    """Checks the arguments of ``median`` and ``trimmed_mean``."""
    if len(sources) == 0:
        raise ValueError("sources: expected at least one array")
    _check_sources_and_out(sources, out)
    expected = np.dtype(np.float64) if sources[0].dtype.kind == "f" else sources[0].dtype
    if out.dtype != expected:
        raise ValueError("out: dtype must be float64 for float sources, or the sources' integer dtype")
    if (
        not isinstance(non_finite, np.ndarray)
        or non_finite.dtype != np.uint8
        or non_finite.shape != (len(sources),)
        or not non_finite.flags.writeable
        or not non_finite.flags.c_contiguous
    ):
        raise ValueError(f"non_finite: expected a writable, contiguous uint8 array of shape ({len(sources)},)")


def check_cut(cut: int, count: int) -> None:
    if not 0 <= 2 * cut < count:
        raise ValueError(f"cut: expected fewer than half of the {count} sources, got {cut}")


def check_weighted_sum_levels(
    packed: Sequence[np.ndarray],
    bits: int,
    scales: np.ndarray,
    block: int,
    table: np.ndarray | None,
    rows: np.ndarray,
    offsets: np.ndarray | None,
    out: np.ndarray,
    checksums: np.ndarray,
) -> np.ndarray:
    """Checks the arguments of ``weighted_sum_levels``; returns the scales as float32 (clients, blocks)."""
    require_block(block)
    if out.ndim != 1 or out.shape[0] % block:
        raise ValueError(f"out: expected a multiple of {block} values")
    scales = np.ascontiguousarray(scales, dtype=np.float32)
    if scales.shape != (len(packed), out.shape[0] // block):
        raise ValueError(f"scales: expected shape ({len(packed)}, {out.shape[0] // block})")
    check_weighted_sum_quantized(packed, bits, scales[:, 0], out, checksums)
    if table is not None:
        require_rotated_bits(bits)
        require_table(table, bits)
    if not isinstance(rows, np.ndarray) or rows.dtype != np.uint32 or rows.shape != (len(packed), 2):
        raise ValueError(
            f"rows: expected a uint32 array of shape ({len(packed)}, 2): each client's row offset and stride"
        )
    if offsets is not None and (
        not isinstance(offsets, np.ndarray)
        or offsets.dtype != np.float64
        or offsets.ndim != 2
        or offsets.shape[0] != out.shape[0] // block
        or offsets.shape[1] < 1
        or offsets.shape[1] & (offsets.shape[1] - 1)
    ):
        raise ValueError(
            f"offsets: expected a float64 array of {out.shape[0] // block} rows and a power of two columns"
        )
    return scales


def require_rotated_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits: expected 1..8, got {bits}")


def require_scales(scales: np.ndarray, name: str) -> None:
    require_flat(scales, name)
    if scales.dtype != np.float32:
        raise ValueError(f"{name}: expected float32")


def require_codebook(boundaries: np.ndarray, magnitudes: np.ndarray, bits: int) -> None:
    half = 2 ** (bits - 1)
    for array, name, size in ((boundaries, "boundaries", half - 1), (magnitudes, "magnitudes", half)):
        if not isinstance(array, np.ndarray) or array.dtype != np.float32 or array.shape != (size,):
            raise ValueError(f"{name}: expected {size} float32 values for {bits} bits")


def outlier_capacity(blocks: int, block: int) -> int:
    """Room for the corrections of a shared-rotation encode: a block's squared coordinates (relative
    to its RMS) sum to its length, so fewer than one in nine can exceed the support (3.097)."""
    return blocks * (block // 9)


def require_outlier_capacity(index: np.ndarray, value: np.ndarray, blocks: int, block: int) -> None:
    capacity = outlier_capacity(blocks, block)
    for array, name, dtype in ((index, "outlier_index", np.uint32), (value, "outlier_value", np.float32)):
        require_flat(array, name)
        if array.dtype != dtype or array.shape[0] < capacity or not array.flags.writeable:
            raise ValueError(f"{name}: expected a writable {np.dtype(dtype)} array of at least {capacity} values")


def _require_rows(rows: int) -> None:
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows: expected a power of two, got {rows}")


def require_staircase(breakpoints: np.ndarray, ranks: np.ndarray, bits: int) -> None:
    if not isinstance(ranks, np.ndarray) or ranks.dtype != np.int32 or ranks.ndim != 2 or not ranks.flags.c_contiguous:
        raise ValueError("ranks: expected a C-contiguous 2-D int32 array")
    _require_rows(ranks.shape[0])
    if ranks.shape[1] != 2**bits - 1:
        raise ValueError(f"ranks: expected {2**bits - 1} columns for {bits} bits")
    steps = ranks.shape[0] * ranks.shape[1]
    require_flat(breakpoints, "breakpoints")
    if breakpoints.dtype != np.float32 or breakpoints.shape[0] != steps + 1:
        raise ValueError(f"breakpoints: expected {steps + 1} float32 values")
    if not (np.isfinite(breakpoints).all() and (np.diff(breakpoints) > 0).all()):
        raise ValueError("breakpoints: expected finite, strictly increasing values")


def require_dither(rows: int, support: float) -> None:
    _require_rows(rows)
    if not (support > 0 and np.isfinite(support)):
        raise ValueError(f"support: expected a positive finite number, got {support}")


def require_table(table: np.ndarray, bits: int) -> None:
    if (
        not isinstance(table, np.ndarray)
        or table.dtype != np.float32
        or table.ndim != 2
        or not table.flags.c_contiguous
    ):
        raise ValueError("table: expected a C-contiguous 2-D float32 array")
    _require_rows(table.shape[0])
    if table.shape[1] != 2**bits:
        raise ValueError(f"table: expected {2**bits} columns for {bits} bits")


def check_corrections(corrections: Sequence[np.ndarray] | None, shares: np.ndarray | None, clients: int) -> np.ndarray:
    """Checks the corrections of ``weighted_sum_levels`` (one array per packed array of ``clients``);
    returns the shares as float32 (none without corrections)."""
    if corrections is None:
        if shares is not None:
            raise ValueError("shares: expected None without corrections")
        return np.zeros(0, np.float32)
    if len(corrections) != clients:
        raise ValueError(f"corrections: expected one array per packed array ({clients}), got {len(corrections)}")
    if shares is None or np.shape(shares) != (len(corrections),):
        raise ValueError(f"shares: expected a float32 array of shape ({len(corrections)},)")
    for k, source in enumerate(corrections):
        if not isinstance(source, np.ndarray) or source.dtype != np.uint8 or source.ndim != 1:
            raise ValueError(f"corrections[{k}]: expected a uint8 array")
        if not source.flags.c_contiguous:
            raise ValueError(f"corrections[{k}]: expected a contiguous array")
        if source.shape[0] % 8:
            raise ValueError(f"corrections[{k}]: expected 8 bytes per correction, got {source.shape[0]} bytes")
    return np.ascontiguousarray(shares, dtype=np.float32)
