"""The three implementations of cpp/aggregate agree bit for bit (native, Numba, NumPy reference)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import fastfed
from fastfed._backend import _require
from fastfed.compression.rotated import shared_codebook

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


@pytest.mark.parametrize("dtype", ["int8", "float16", "float32", "float64"])
def test_weighted_sum_layer_for_every_count_of_clients(backend: str, dtype: str) -> None:
    # The native kernel sums clients in blocks of up to eight over tiles of 2048 elements, prefetching
    # the next block's lines (the rest of the tile's clients, then the next tile's first ones).
    rng = np.random.default_rng(7)
    n = 3 * 2048 + 100
    pool = [_random(rng, n, dtype) for _ in range(17)]
    for clients in range(1, 18):
        sources, weights = pool[:clients], rng.uniform(0.0, 5.0, clients)
        out_dtype = np.float32 if dtype == "float32" else np.float64
        expected, actual = np.empty(n, out_dtype), np.empty(n, out_dtype)
        _require("numpy").aggregate.weighted_sum_layer(sources, weights, 2.0, expected)
        _require(backend).aggregate.weighted_sum_layer(sources, weights, 2.0, actual)
        np.testing.assert_array_equal(actual, expected, err_msg=f"{clients} clients")


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
    _require("numpy").aggregate.weighted_sum_quantized(packed, bits, scales, 0.25, 3.0, expected, want_checksums)
    _require(backend).aggregate.weighted_sum_quantized(packed, bits, scales, 0.25, 3.0, actual, got_checksums)
    np.testing.assert_array_equal(actual, expected)
    continued = [zlib.crc32(data, int(start)) for data, start in zip(packed, initial)]
    assert got_checksums.tolist() == want_checksums.tolist() == continued
    # The reference is the float64 weighted sum of the unpacked levels, up to float32 block rounding.
    exact = np.zeros(n)
    for data, scale in zip(packed, scales):
        unpacked = np.empty(n)
        _require("numpy").quantize.unpack_dequantize(data, bits, 0.0, 1.0, unpacked)
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
    _require("numpy").aggregate.weighted_sum_quantized(packed, 8, scales, 0.0, 1.0, expected, want)
    _require(backend).aggregate.weighted_sum_quantized(packed, 8, scales, 0.0, 1.0, actual, got)
    np.testing.assert_array_equal(actual, expected)
    assert got.tolist() == want.tolist() == [zlib.crc32(data) for data in packed]


@pytest.mark.parametrize("checksums", [np.zeros(2, np.int64), np.zeros(3, np.uint32), np.zeros(2, np.uint32)[::-1]])
def test_weighted_sum_quantized_rejects_bad_checksum_arrays(backend: str, checksums: np.ndarray) -> None:
    packed = [np.zeros(4, np.uint8), np.zeros(4, np.uint8)]
    out = np.empty(4, np.float32)
    with pytest.raises(ValueError, match="checksums"):
        _require(backend).aggregate.weighted_sum_quantized(packed, 8, np.ones(2, np.float32), 0.0, 1.0, out, checksums)


def test_numba_kernels_read_every_kind_of_array_at_its_address() -> None:
    numba_arrays = pytest.importorskip("fastfed.kernels.numba_arrays")
    base = np.arange(40, dtype=np.float64)
    arrays = [base, base[3:], base[::-1], base.reshape(5, 8).T, np.frombuffer(bytes(16), np.uint8), np.float32(2.0) * 1]
    arrays = [np.asarray(array) for array in arrays]
    assert numba_arrays.data_addresses(arrays).tolist() == [a.__array_interface__["data"][0] for a in arrays]


def _robust_sources(rng: np.random.Generator, k: int, n: int, dtype: str) -> list[np.ndarray]:
    """Sources with many ties (few distinct values) and, for integers, values at the dtype's limits."""
    kind = np.dtype(dtype).kind
    if kind == "f":
        pool = np.array([-np.inf, -3.5, -1.0, -0.0, 0.0, 0.25, 1.0, 7.0, np.inf], dtype)
        pool = np.concatenate([pool, (rng.standard_normal(20) * 100).astype(dtype)])
    else:
        info = np.iinfo(dtype)
        pool = np.array([info.min, info.min + 1, -1 if kind == "i" else 2, 0, 1, 3, info.max - 1, info.max], dtype)
        pool = np.concatenate([pool, rng.integers(info.min, info.max, 20, dtype=dtype, endpoint=True)])
    return [rng.choice(pool, n) for _ in range(k)]


def _robust_out(sources: list[np.ndarray]) -> np.ndarray:
    return np.empty(sources[0].shape[0], np.float64 if sources[0].dtype.kind == "f" else sources[0].dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 8, 101])
def test_median_and_trimmed_mean_match_reference(backend: str, dtype: str, k: int) -> None:
    rng = np.random.default_rng(k)
    n = 700  # three tiles, the last one partial
    sources = _robust_sources(rng, k, n, dtype)
    if np.dtype(dtype).kind == "f" and k > 2:
        sources[1][5] = np.nan  # one NaN coordinate: NaN out, and client 1 flagged
    expected_flags = np.array([int(not np.isfinite(s).all()) if s.dtype.kind == "f" else 0 for s in sources], np.uint8)
    for cut in sorted({0, (k - 1) // 2, k // 5}):
        runs = []
        for name in ("numpy", backend):
            out, flags = _robust_out(sources), np.zeros(k, np.uint8)
            if cut == 0:
                _require(name).aggregate.median(sources, out, flags)
            else:
                _require(name).aggregate.trimmed_mean(sources, cut, out, flags)
            runs.append((out, flags))
        (expected, want_flags), (actual, got_flags) = runs
        assert actual.tobytes() == expected.tobytes(), (cut, np.flatnonzero(actual != expected)[:5])
        assert got_flags.tolist() == want_flags.tolist() == expected_flags.tolist()


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_median_and_trimmed_mean_follow_numpy_and_flower(backend: str, dtype: str) -> None:
    rng = np.random.default_rng(3)
    for k in (1, 2, 9, 10, 100):
        sources = [(rng.standard_normal(3000) * 10).astype(dtype) for _ in range(k)]
        stacked = np.stack(sources)
        out, flags = _robust_out(sources), np.zeros(k, np.uint8)
        _require(backend).aggregate.median(sources, out, flags)
        np.testing.assert_array_equal(out.astype(dtype), np.median(stacked, axis=0))  # even k: mean of the middle two
        for beta in (0.0, 0.1, 0.2, 0.45):
            cut = int(beta * k)  # Flower's (and SciPy's) count of values cut from each end
            _require(backend).aggregate.trimmed_mean(sources, cut, out, flags)
            flower = np.mean(np.sort(stacked.astype(np.float64), axis=0)[cut : k - cut], axis=0)  # Flower's _trim_mean
            np.testing.assert_allclose(out, flower, rtol=1e-12, atol=1e-12)
        assert not flags.any()


def test_robust_kernels_are_exact_at_integer_limits(backend: str) -> None:
    kernel = _require(backend).aggregate
    top, bottom = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    cases = [
        ([top, top - 2], np.int64, top - 1),
        ([bottom, bottom + 1], np.int64, bottom),  # -2**63 + 0.5 -> the even neighbour
        ([top, bottom], np.int64, 0),  # -0.5 -> 0
        ([2**64 - 1, 2**64 - 4], np.uint64, 2**64 - 2),  # 2**64 - 2.5 -> the even neighbour
        ([top] * 5, np.int64, top),
        ([bottom, bottom, top, top, top], np.int64, top),
        ([2**64 - 1, 0, 7, 2**64 - 2], np.uint64, 2**63 + 2),  # (7 + 2**64 - 2) / 2, half to even
    ]
    for values, dtype, median in cases:
        sources = [np.array([v], dtype) for v in values]
        out, flags = np.empty(1, dtype), np.zeros(len(values), np.uint8)
        kernel.median(sources, out, flags)
        assert out.tolist() == [median], values
        kernel.trimmed_mean(sources, 0, out, flags)
        quotient, remainder = divmod(sum(values), len(values))  # the exact mean, rounded half to even
        assert out.tolist() == [
            quotient + (2 * remainder > len(values) or (2 * remainder == len(values) and quotient % 2))
        ]


def test_robust_kernel_boundary_rejects_bad_buffers(backend: str) -> None:
    kernel = _require(backend).aggregate
    sources = [np.ones(4), np.ones(4), np.ones(4)]
    flags = np.zeros(3, np.uint8)
    with pytest.raises(ValueError, match="sources"):
        kernel.median([], np.empty(4), np.zeros(0, np.uint8))
    with pytest.raises(ValueError, match=r"sources\[1\]"):
        kernel.median([np.ones(4), np.ones(5)], np.empty(4), np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="out: dtype"):
        kernel.median(sources, np.empty(4, np.float32), flags)
    with pytest.raises(ValueError, match="out: dtype"):
        kernel.median([np.ones(4, np.int32)] * 3, np.empty(4), flags)
    with pytest.raises(ValueError, match="non_finite"):
        kernel.median(sources, np.empty(4), np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="cut: expected fewer than half of the 3 sources, got 2"):
        kernel.trimmed_mean(sources, 2, np.empty(4), flags)


@pytest.mark.parametrize("dtype", ["float32", "int64"])
def test_robust_kernels_past_the_sorting_network_limit(backend: str, dtype: str) -> None:
    # Beyond 4096 clients each coordinate is sorted on its own: the same definition, other code.
    rng = np.random.default_rng(11)
    sources = _robust_sources(rng, 4097, 40, dtype)
    for cut in (0, 1000):
        runs = []
        for name in ("numpy", backend):
            out, flags = _robust_out(sources), np.zeros(4097, np.uint8)
            if cut:
                _require(name).aggregate.trimmed_mean(sources, cut, out, flags)
            else:
                _require(name).aggregate.median(sources, out, flags)
            runs.append(out)
        assert runs[0].tobytes() == runs[1].tobytes()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("with_table", [True, False])
def test_weighted_sum_levels_matches_reference(backend: str, bits: int, with_table: bool) -> None:
    rng = np.random.default_rng(bits)
    clients, block = 11, 4096
    n = 5 * block  # blocks cross the kernel's tiles
    packed = [rng.integers(0, 256, n * bits // 8, dtype=np.uint8) for _ in range(clients)]
    scales = rng.random((clients, n // block)).astype(np.float32)
    rows = np.stack([rng.integers(0, 2**32, clients), rng.integers(0, 128, clients) * 2 + 1], axis=1).astype(np.uint32)
    table = shared_codebook(bits).table if with_table else None
    offsets = None if with_table else rng.standard_normal((n // block, 16))
    results = []
    for name in ("numpy", backend):
        out, checksums = np.empty(n), np.full(clients, 9, np.uint32)
        _require(name).aggregate.weighted_sum_levels(
            packed, bits, scales, block, table, rows, offsets, 3.0, out, checksums
        )
        results.append((out, checksums))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_array_equal(results[1][1], results[0][1])
    assert results[0][1][0] == zlib.crc32(packed[0], 9)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_weighted_sum_levels_with_few_table_rows(backend: str, bits: int, rows: int) -> None:
    # Vector kernels that read two groups' rows at once must still see one row repeat every group.
    rng = np.random.default_rng(rows * 10 + bits)
    clients, block, n = 9, 512, 2048
    packed = [rng.integers(0, 256, n * bits // 8, dtype=np.uint8) for _ in range(clients)]
    scales = rng.random((clients, n // block)).astype(np.float32)
    table = rng.standard_normal((rows, 2**bits)).astype(np.float32)
    row_parameters = np.stack([rng.integers(0, 2**32, clients), rng.integers(0, 8, clients) * 2 + 1], axis=1).astype(
        np.uint32
    )
    results = []
    for name in ("numpy", backend):
        out, checksums = np.empty(n), np.zeros(clients, np.uint32)
        _require(name).aggregate.weighted_sum_levels(
            packed, bits, scales, block, table, row_parameters, None, 2.0, out, checksums
        )
        results.append(out)
    np.testing.assert_array_equal(results[1], results[0])


def _corrections(positions: list[int], values: list[float]) -> np.ndarray:
    """A payload's corrections as bytes: the positions (uint32), then the values (float32)."""
    return np.concatenate([np.array(positions, "<u4").view(np.uint8), np.array(values, "<f4").view(np.uint8)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weighted_sum_levels_adds_corrections_as_the_reference(backend: str, dtype: type) -> None:
    # Eight tiles of the native kernel, each correction added in client order once its tile is summed:
    # clients share positions (the order of their additions shows), some sit on tile edges.
    rng = np.random.default_rng(5)
    clients, bits, block, n = 7, 4, 16384, 8 * 16384
    packed = [rng.integers(0, 256, n * bits // 8, dtype=np.uint8) for _ in range(clients)]
    scales = rng.random((clients, n // block)).astype(np.float32)
    rows = np.stack([rng.integers(0, 2**32, clients), rng.integers(0, 128, clients) * 2 + 1], axis=1).astype(np.uint32)
    edges = np.array([0, 16383, 16384, 3 * 16384 - 1, n - 1])
    sources = []
    for k in range(clients):
        count = int(rng.integers(0, 3000)) if k != 3 else 0
        positions = np.union1d(rng.choice(n, count, replace=False), edges if k % 2 else [])
        sources.append(_corrections(positions.tolist(), (rng.standard_normal(positions.size) * 10.0**k).tolist()))
    shares = rng.random(clients).astype(np.float32)
    results = []
    for name in ("numpy", backend):
        for corrections in (None, sources):
            out, checksums = np.empty(n, dtype), np.zeros(clients, np.uint32)
            invalid = _require(name).aggregate.weighted_sum_levels(
                packed, bits, scales, block, shared_codebook(bits).table, rows, None, 2.0, out, checksums,
                corrections, None if corrections is None else shares, 2.0**100,
            )  # fmt: skip
            assert invalid == -1
            results.append(out)
    np.testing.assert_array_equal(results[2], results[0])
    np.testing.assert_array_equal(results[3], results[1])
    assert not np.array_equal(results[1], results[0])


@pytest.mark.parametrize(
    ("positions", "values"),
    [([3, 3], [1.0, 1.0]), ([4, 2], [1.0, 1.0]), ([1, 64], [1.0, 1.0]), ([1], [float("nan")]), ([1], [2.0**101])],
)
def test_weighted_sum_levels_reports_the_first_client_of_bad_corrections(
    backend: str, positions: list[int], values: list[float]
) -> None:
    # Out of order, repeated, beyond the tensor (64 values), not finite or too large: client 1 is named.
    sources = [_corrections([0, 63], [1.0, -1.0]), _corrections(positions, values), _corrections([], [])]
    packed, scales, shares = [np.zeros(32, np.uint8)] * 3, np.ones((3, 1), np.float32), np.ones(3, np.float32)
    rows, out, checksums = np.ones((3, 2), np.uint32), np.zeros(64, np.float32), np.zeros(3, np.uint32)
    kernel = _require(backend).aggregate.weighted_sum_levels
    table = shared_codebook(4).table
    assert kernel(packed, 4, scales, 64, table, rows, None, 1.0, out, checksums, sources, shares, 2.0**100) == 1
    one = ([np.zeros(32, np.uint8)], 4, scales[:1], 64, table, rows[:1], None, 1.0, out, checksums[:1])
    with pytest.raises(ValueError, match="8 bytes per correction"):
        kernel(*one, [np.zeros(5, np.uint8)], np.ones(1, np.float32), 1.0)
    with pytest.raises(ValueError, match=r"corrections\[0\]: expected a (contiguous|uint8) array"):
        kernel(*one, [np.zeros(32, np.uint8)[::2]], np.ones(1, np.float32), 1.0)
    with pytest.raises(ValueError, match="shares: expected a float32 array of shape"):
        kernel(*one, [np.zeros(8, np.uint8)], None, 1.0)
    with pytest.raises(ValueError, match=r"corrections: expected one array per packed array \(1\), got 2"):
        kernel(*one, [np.zeros(8, np.uint8)] * 2, np.ones(2, np.float32), 1.0)
