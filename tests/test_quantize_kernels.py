"""The three implementations of cpp/quantize give identical bytes and values (native, Numba, NumPy)."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match="int32|float32 or float64|unsupported"):
        kernel.min_max(np.ones(4, np.int32))
