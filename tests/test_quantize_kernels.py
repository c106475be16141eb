"""The three implementations of cpp/quantize give identical bytes and values (native, Numba, NumPy)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from fastfed._backend import _require

BITS = [1, 2, 3, 4, 5, 7, 8, 11, 12, 16]


def _reference():  # type: ignore[no-untyped-def]
    return _require("numpy").quantize


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("n", [1, 9, 32_771])
def test_quantize_pack_and_unpack_match_reference(backend: str, bits: int, stochastic: bool, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    x = rng.standard_normal(n).astype(np.float32)
    kernel = _require(backend).quantize
    minimum, maximum = kernel.min_max(x)
    assert (minimum, maximum) == _reference().min_max(x) == (float(x.min()), float(x.max()))
    levels = 2**bits - 1
    scale = levels / (maximum - minimum) if maximum > minimum else 0.0
    expected = np.empty((n * bits + 7) // 8, np.uint8)
    actual = np.empty_like(expected)
    _reference().quantize_pack(x, bits, stochastic, 77, minimum, scale, expected)
    kernel.quantize_pack(x, bits, stochastic, 77, minimum, scale, actual)
    np.testing.assert_array_equal(actual, expected)
    step = (maximum - minimum) / levels
    for dtype in (np.float32, np.float64):
        want, got = np.empty(n, dtype), np.empty(n, dtype)
        _reference().unpack_dequantize(expected, bits, minimum, step, want)
        kernel.unpack_dequantize(expected, bits, minimum, step, got)
        np.testing.assert_array_equal(got, want)
    start = rng.standard_normal(n)
    want_acc, got_acc = start.copy(), start.copy()
    _reference().unpack_dequantize_accumulate(expected, bits, minimum, step, 0.3, want_acc)
    kernel.unpack_dequantize_accumulate(expected, bits, minimum, step, 0.3, got_acc)
    np.testing.assert_array_equal(got_acc, want_acc)


def test_packing_is_lsb_first_little_endian(backend: str) -> None:
    # Levels 1, 2, 3 at 2 bits: stream bits 10 01 11 (LSB first) -> byte 0b00111001.
    x = np.array([1.0, 2.0, 3.0, 0.0], np.float32)
    out = np.empty(1, np.uint8)
    _require(backend).quantize.quantize_pack(x, 2, False, 0, 0.0, 1.0, out)
    assert out[0] == 0b00_11_10_01


@pytest.mark.parametrize("n", [5, 1000, 70_000])
@pytest.mark.parametrize("block", [1, 8, 1024])
def test_rotation_matches_reference_and_inverts(backend: str, n: int, block: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    padded = -(-n // block) * block
    want, got = np.empty(padded), np.empty(padded)
    _reference().rotate(x, block, 5, want)
    kernel = _require(backend).quantize
    kernel.rotate(x, block, 5, got)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(x.astype(np.float64)), rtol=1e-12)
    restored = np.empty(n, np.float32)
    kernel.unrotate(got.copy(), block, 5, restored)
    np.testing.assert_allclose(restored, x, atol=1e-6)


def test_kernel_boundary_rejects_bad_arguments(backend: str) -> None:
    kernel = _require(backend).quantize
    x = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="bits"):
        kernel.quantize_pack(x, 17, False, 0, 0.0, 1.0, np.empty(22, np.uint8))
    with pytest.raises(ValueError, match="bytes"):
        kernel.quantize_pack(x, 8, False, 0, 0.0, 1.0, np.empty(9, np.uint8))
    with pytest.raises(ValueError, match="packed"):
        kernel.unpack_dequantize(np.empty(3, np.uint8), 4, 0.0, 1.0, np.empty(10, np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        kernel.min_max(np.array([1.0, np.nan, 2.0], np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        kernel.min_max(np.array([1.0, -np.inf], np.float64))
    with pytest.raises(ValueError, match="power of two"):
        kernel.rotate(x, 3, 0, np.empty(12))
    with pytest.raises(ValueError, match="int32|float32 or float64|unsupported"):
        kernel.min_max(np.ones(4, np.int32))


@pytest.mark.parametrize("bits", [1, 3, 8, 16])
@pytest.mark.parametrize("clients", [1, 8, 19])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float64])
def test_weighted_sum_quantized_matches_reference(backend: str, bits: int, clients: int, out_dtype: type) -> None:
    rng = np.random.default_rng(bits * 100 + clients)
    n = 20_001
    packed = [rng.integers(0, 256, (n * bits + 7) // 8, dtype=np.uint8) for _ in range(clients)]
    scales = rng.uniform(-1, 1, clients).astype(np.float32)
    expected, actual = np.empty(n, out_dtype), np.empty(n, out_dtype)
    initial = rng.integers(0, 2**32, clients, dtype=np.uint64).astype(np.uint32)
    want_checksums, got_checksums = initial.copy(), initial.copy()
    _reference().weighted_sum_quantized(packed, bits, scales, 0.25, 3.0, expected, want_checksums)
    _require(backend).quantize.weighted_sum_quantized(packed, bits, scales, 0.25, 3.0, actual, got_checksums)
    np.testing.assert_array_equal(actual, expected)
    continued = [zlib.crc32(data, int(start)) for data, start in zip(packed, initial)]
    assert got_checksums.tolist() == want_checksums.tolist() == continued
    # The reference is the float64 weighted sum of the unpacked levels, up to float32 block rounding.
    exact = np.zeros(n)
    for data, scale in zip(packed, scales):
        unpacked = np.empty(n)
        _reference().unpack_dequantize(data, bits, 0.0, 1.0, unpacked)
        exact += float(scale) * unpacked
    bound = 1e-6 * (2**bits) * clients
    np.testing.assert_allclose(expected, ((exact + 0.25) / 3.0).astype(out_dtype), rtol=0, atol=bound)


def test_weighted_sum_quantized_checksums_span_many_tiles(backend: str) -> None:
    # 62 tiles: the native kernel checksums runs of tiles on separate threads and combines them.
    rng = np.random.default_rng(5)
    n, clients = 1_000_003, 11
    packed = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(clients)]
    scales = rng.uniform(0, 1, clients).astype(np.float32)
    expected, actual = np.empty(n, np.float32), np.empty(n, np.float32)
    want, got = np.zeros(clients, np.uint32), np.zeros(clients, np.uint32)
    _reference().weighted_sum_quantized(packed, 8, scales, 0.0, 1.0, expected, want)
    _require(backend).quantize.weighted_sum_quantized(packed, 8, scales, 0.0, 1.0, actual, got)
    np.testing.assert_array_equal(actual, expected)
    assert got.tolist() == want.tolist() == [zlib.crc32(data) for data in packed]


@pytest.mark.parametrize("checksums", [np.zeros(2, np.int64), np.zeros(3, np.uint32), np.zeros(2, np.uint32)[::-1]])
def test_weighted_sum_quantized_rejects_bad_checksum_arrays(backend: str, checksums: np.ndarray) -> None:
    packed = [np.zeros(4, np.uint8), np.zeros(4, np.uint8)]
    out = np.empty(4, np.float32)
    with pytest.raises(ValueError, match="checksums"):
        _require(backend).quantize.weighted_sum_quantized(packed, 8, np.ones(2, np.float32), 0.0, 1.0, out, checksums)
