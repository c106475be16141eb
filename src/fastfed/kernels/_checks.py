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
