"""The three implementations of cpp/aggregate agree bit for bit (native, Numba, NumPy reference)."""

from __future__ import annotations

import numpy as np
import pytest

import fastfed
from fastfed._backend import _require

DTYPES = [
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
]


def _random(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(n) * 10).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -(2**40)), min(info.max, 2**40), n, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 2048, 2049, 70_001])
def test_weighted_sum_layer_matches_reference(backend: str, dtype: str, n: int) -> None:
    rng = np.random.default_rng(n)
    sources = [_random(rng, n, dtype) for _ in range(13)]
    weights = rng.uniform(0.0, 5.0, 13)
    out_dtype = np.float32 if dtype == "float32" else np.float64
    expected = np.empty(n, out_dtype)
    _require("numpy").aggregate.weighted_sum_layer(sources, weights, 3.0, expected)
    actual = np.empty(n, out_dtype)
    _require(backend).aggregate.weighted_sum_layer(sources, weights, 3.0, actual)
    np.testing.assert_array_equal(actual, expected)
    # The reference itself is a float64 weighted sum.
    exact = sum(w * s.astype(np.float64) for w, s in zip(weights, sources)) / 3.0
    np.testing.assert_allclose(expected, exact.astype(out_dtype), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_matches_reference(backend: str, dtype: str) -> None:
    rng = np.random.default_rng(1)
    source = _random(rng, 300_001, dtype)
    start = rng.standard_normal(300_001)
    expected, actual = start.copy(), start.copy()
    _require("numpy").aggregate.accumulate(expected, source, 0.37)
    _require(backend).aggregate.accumulate(actual, source, 0.37)
    np.testing.assert_array_equal(actual, expected)


def test_kernel_boundary_rejects_bad_buffers(backend: str) -> None:
    kernel = _require(backend).aggregate
    out = np.empty(4, np.float64)
    with pytest.raises(ValueError, match="sources"):
        kernel.weighted_sum_layer([], np.ones(0), 1.0, out)
    with pytest.raises(ValueError, match="weights"):
        kernel.weighted_sum_layer([np.ones(4)], np.ones(2), 1.0, out)
    with pytest.raises(ValueError, match=r"sources\[1\]"):
        kernel.weighted_sum_layer([np.ones(4), np.ones(5)], np.ones(2), 1.0, out)
    with pytest.raises(ValueError, match=r"sources\[1\]"):
        kernel.weighted_sum_layer([np.ones(4), np.ones(4, np.float32)], np.ones(2), 1.0, out)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.weighted_sum_layer([np.ones(8)[::2]], np.ones(1), 1.0, out)
    with pytest.raises(ValueError, match="out"):
        kernel.weighted_sum_layer([np.ones(4, np.int32)], np.ones(1), 1.0, np.empty(4, np.int32))
    with pytest.raises(ValueError, match="source"):
        kernel.accumulate(np.zeros(4), np.ones(3), 1.0)


def _unaligned(values: np.ndarray) -> np.ndarray:
    raw = np.zeros(values.nbytes + 1, np.uint8)
    view = raw[1:].view(values.dtype)
    view[:] = values
    assert not view.flags.aligned
    return view


def test_kernels_refuse_unaligned_arrays(backend: str) -> None:
    # A typed load from a misaligned address is undefined behaviour in the native kernels.
    kernel = _require(backend).aggregate
    sources = [_unaligned(np.arange(5, dtype=np.int64)), np.arange(5, dtype=np.int64)]
    with pytest.raises(ValueError, match=r"sources\[0\]: expected an aligned array"):
        kernel.weighted_sum_layer(sources, np.ones(2), 1.0, np.empty(5))


def test_weighted_mean_aligns_unaligned_client_arrays(backend: str) -> None:
    aligned = [np.arange(7, dtype=np.int64), np.linspace(0, 1, 9, dtype=np.float32)]
    unaligned = [_unaligned(layer) for layer in aligned]
    for got, want in zip(fastfed.weighted_mean([unaligned, aligned], [1, 3]), aligned, strict=True):
        np.testing.assert_array_equal(got, want)
