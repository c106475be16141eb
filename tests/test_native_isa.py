"""The native kernels give identical results at every instruction-set level, and the native
CRC-32 equals zlib's."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import numpy as np
import pytest

from fastfed._backend import available_backends
from fastfed.compression.rotated import eden_codebook, shared_codebook
from fastfed.compression.tables import SUPPORT
from fastfed.kernels._checks import outlier_capacity

pytestmark = pytest.mark.skipif("native" not in available_backends(), reason="the native extension is not built")

LEVELS = ["baseline", "avx2", "avx512"]


def _core() -> ModuleType:
    from fastfed import _core

    return _core


def _supported() -> list[str]:
    return LEVELS[: LEVELS.index(_core().best_isa()) + 1] if "native" in available_backends() else []


@contextmanager
def isa(level: str) -> Iterator[None]:
    previous = _core().isa()
    _core().set_isa(level)
    try:
        yield
    finally:
        _core().set_isa(previous)


def _all_kernel_outputs() -> list[np.ndarray]:
    core = _core()
    rng = np.random.default_rng(11)
    x32 = rng.standard_normal(70_001).astype(np.float32)
    x64 = rng.standard_normal(70_001)
    outputs: list[np.ndarray] = []
    for x in (x32, x64):
        minimum, maximum = core.quantize.min_max(x)
        outputs.append(np.array([minimum, maximum]))
        for bits, stochastic in [(8, False), (8, True), (3, True), (16, False)]:
            packed = np.empty((x.size * bits + 7) // 8, np.uint8)
            core.quantize.quantize_pack(x, bits, stochastic, 5, minimum, (2**bits - 1) / (maximum - minimum), packed)
            decoded = np.empty(x.size, np.float32)
            core.quantize.unpack_dequantize(packed, bits, minimum, 0.01, decoded)
            acc = np.ones(x.size)
            core.quantize.unpack_dequantize_accumulate(packed, bits, minimum, 0.01, 0.7, acc)
            outputs += [packed, decoded, acc]
    clients = [rng.integers(0, 256, 100_003, dtype=np.uint8) for _ in range(19)]
    mean, checksums = np.empty(100_003, np.float32), np.zeros(19, np.uint32)
    core.aggregate.weighted_sum_quantized(clients, 8, rng.random(19).astype(np.float32), 0.5, 3.0, mean, checksums)
    updates = [rng.standard_normal(50_001).astype(np.float32) for _ in range(11)]
    weighted = np.empty(50_001, np.float32)
    core.aggregate.weighted_sum_layer(updates, rng.random(11), 2.0, weighted)
    return [*outputs, mean, checksums, weighted, *_rotated_kernel_outputs(rng)]


def _rotated_kernel_outputs(rng: np.random.Generator) -> list[np.ndarray]:
    """Every kernel of RotatedQuantizer, at the bit widths whose code paths differ."""
    core = _core()
    x = (rng.standard_normal(70_001) * np.exp(rng.standard_normal(70_001))).astype(np.float32)
    block, padded = 65536, 131072
    outputs: list[np.ndarray] = []
    for data in (x[:65536], rng.standard_normal(4 * 65536)):
        transformed = data.copy()
        core.rotate.walsh_hadamard(transformed, 65536)
        outputs.append(transformed)
    for bits in (1, 2, 3, 4, 5, 8):
        eden_scales, packed = np.empty(2, np.float32), np.empty(padded * bits // 8, np.uint8)
        core.quantize.encode_rotated(x, bits, block, [3, 4], *eden_codebook(bits), eden_scales, packed)
        decoded = np.empty(x.size, np.float32)
        core.quantize.decode_rotated(packed, bits, block, [3, 4], eden_codebook(bits)[1], eden_scales, decoded)
        book = shared_codebook(bits)
        sigmas, levels = np.empty(2, np.float32), np.empty(padded * bits // 8, np.uint8)
        index, value = np.empty(padded, np.uint32), np.empty(padded, np.float32)
        if book.breakpoints is not None and book.ranks is not None:
            args = (book.table, book.breakpoints, book.ranks, sigmas, levels, index, value)
            count = core.quantize.encode_shared_table(x, bits, block, [5, 6], 7, 3, *args)
        else:
            count = core.quantize.encode_shared_dither(
                x, bits, block, [5, 6], 7, 3, book.table, SUPPORT, sigmas, levels, index, value
            )
        rotated = np.empty(padded, np.float32)
        core.quantize.dequantize_shared(levels, bits, block, 7, 3, book.table, sigmas, rotated)
        mean, crcs = np.empty(padded), np.zeros(19, np.uint32)
        # Clients that differ in levels, rows and scales, so that any mix-up between them shows.
        clients = [np.roll(levels, 3 * k) for k in range(19)]
        rows = np.array([[5 + k, 2 * k + 1] for k in range(19)], np.uint32)
        scales = rng.random((19, 2)).astype(np.float32)
        core.aggregate.weighted_sum_levels(clients, bits, scales, block, book.table, rows, None, 2.0, mean, crcs)
        affine, offsets = np.empty(padded), rng.standard_normal((2, 16))
        core.aggregate.weighted_sum_levels(clients, bits, scales, block, None, rows, offsets, 2.0, affine, crcs)
        outputs += [
            eden_scales,
            packed,
            decoded,
            sigmas,
            levels,
            index[:count],
            value[:count],
            rotated,
            mean,
            affine,
            crcs,
        ]
    return outputs


@pytest.mark.parametrize("level", _supported()[1:])
def test_every_level_matches_the_baseline_bit_for_bit(level: str) -> None:
    with isa("baseline"):
        expected = _all_kernel_outputs()
    with isa(level):
        actual = _all_kernel_outputs()
    for want, got in zip(expected, actual, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("threads", [2, 8])
def test_stochastic_levels_do_not_depend_on_how_threads_split_the_values(threads: int) -> None:
    # 65,544 groups of eight split over two threads, and the 3136x512 kernel over eight, give chunks
    # that start halfway through a group of sixteen values, whose coins come from the same draws.
    from fastfed.kernels import quantize_numpy

    core = _core()
    n = 8 * 8 * 8193 if threads == 2 else 3136 * 512
    x = np.random.default_rng(threads).standard_normal(n).astype(np.float32)
    minimum, maximum = float(x.min()), float(x.max())
    want = np.empty(n, np.uint8)
    quantize_numpy.quantize_pack(x, 8, True, 1, minimum, 255 / (maximum - minimum), want)
    previous = core.num_threads()
    core.set_num_threads(threads)
    try:
        for level in _supported():
            with isa(level):
                got = np.empty(n, np.uint8)
                core.quantize.quantize_pack(x, 8, True, 1, minimum, 255 / (maximum - minimum), got)
                assert np.count_nonzero(got != want) == 0, level
    finally:
        core.set_num_threads(previous)


def _encode_shared(
    module: ModuleType,
    x: np.ndarray,
    bits: int,
    block: int,
    table: np.ndarray,
    breakpoints: np.ndarray,
    ranks: np.ndarray,
) -> list[np.ndarray]:
    """Every output of one shared-rotation encode of whole blocks (the corrections trimmed)."""
    blocks = x.size // block
    sigmas, packed = np.empty(blocks, np.float32), np.empty(x.size * bits // 8, np.uint8)
    index, value = (
        np.empty(outlier_capacity(blocks, block), np.uint32),
        np.empty(outlier_capacity(blocks, block), np.float32),
    )
    count = module.encode_shared_table(
        x, bits, block, [5, 6], 7, 3, table, breakpoints, ranks, sigmas, packed, index, value
    )
    return [sigmas, packed, index[:count], value[:count]]


def _assert_encodes_as_the_reference(
    x: np.ndarray, bits: int, block: int, table: np.ndarray, breakpoints: np.ndarray, ranks: np.ndarray
) -> list[np.ndarray]:
    """The native encode at every level equals the NumPy reference's; returns the reference's outputs."""
    from fastfed.kernels import quantize_numpy

    expected = _encode_shared(quantize_numpy, x, bits, block, table, breakpoints, ranks)
    for level in _supported():
        with isa(level):
            got = _encode_shared(_core().quantize, x, bits, block, table, breakpoints, ranks)
            for want, part in zip(expected, got, strict=True):
                np.testing.assert_array_equal(part, want, err_msg=level)
    return expected


def _coordinates(x: np.ndarray, block: int) -> np.ndarray:
    """The coordinates z a shared-rotation encode quantizes, for one block: the rotated block times
    float32(1 / sigma), sigma as an encode computes it."""
    from fastfed.kernels import quantize_numpy

    book = shared_codebook(2)
    assert book.breakpoints is not None and book.ranks is not None
    sigma = _encode_shared(quantize_numpy, x, 2, block, book.table, book.breakpoints, book.ranks)[0]
    rotated = np.empty(block, np.float32)
    _core().rotate.rotate_blocks(x, block, [5], rotated)
    return rotated * np.float32(1.0 / np.float64(sigma[0]))


def test_shared_encode_at_breakpoints_matches_the_reference_at_every_level() -> None:
    """Coordinates exactly at a staircase's breakpoints and one float below them are encoded as the
    reference encodes them at every level, as are those one float below the first (corrected) and
    exactly at the last (not corrected)."""
    block, bits = 65536, 2
    x = np.random.default_rng(5).standard_normal(block).astype(np.float32)
    book = shared_codebook(bits)
    assert book.breakpoints is not None and book.ranks is not None
    coordinates = _coordinates(x, block)
    z = np.unique(coordinates)
    # Breakpoints >= 0.012 apart (so that the native table holds them): every other one at a z, the
    # others one float above one; the first one float above a z, the last at one.
    chosen = [z[20]]
    for value in z[21:]:
        if value - chosen[-1] >= 0.012 and len(chosen) < book.breakpoints.size:
            chosen.append(value)
    assert len(chosen) == book.breakpoints.size and chosen[-1] < z[-20]
    breakpoints = np.array(chosen, np.float32)
    breakpoints[1::2] = np.nextafter(breakpoints[1::2], np.float32(np.inf))
    breakpoints[0] = np.nextafter(breakpoints[0], np.float32(np.inf))
    if breakpoints.size % 2 == 0:
        breakpoints[-1] = chosen[-1]
    assert np.isin(z, breakpoints).sum() > 100 and np.isin(np.nextafter(z, np.float32(np.inf)), breakpoints).sum() > 100
    expected = _assert_encodes_as_the_reference(x, bits, block, book.table, breakpoints, book.ranks)
    just_below_the_first = np.flatnonzero(coordinates == chosen[0])
    at_the_last = np.flatnonzero(coordinates == chosen[-1])
    assert just_below_the_first.size and np.isin(just_below_the_first, expected[2]).all()  # corrected
    assert at_the_last.size and not np.isin(at_the_last, expected[2]).any()


def test_shared_encode_with_steps_one_float_wide_at_a_support_edge() -> None:
    """Values clustered at an edge of the support, on steps one float wide there, are encoded as the
    reference encodes them (such a staircase is too narrow for the native cell table)."""
    block, bits = 4096, 1
    rng = np.random.default_rng(1)
    # Rotated values clustered at 1 (within 200 float spacings), a few well below and above it.
    wanted = (1 + rng.integers(-200, 200, block) * 2.0**-23).astype(np.float32)
    wanted[rng.choice(block, 240, replace=False)] = np.repeat(np.float32([0.9, 1.1]), 120)
    x = np.empty(block, np.float32)
    _core().rotate.unrotate_blocks(wanted, block, [5], x)
    z = np.unique(_coordinates(x, block))
    cluster = z[(z > 0.95) & (z < 1.05)]
    low, high = cluster[len(cluster) // 20], cluster[-len(cluster) // 100]
    table, ranks = np.array([[-1, 1], [-1, 1]], np.float32), np.array([[0], [0]], np.int32)
    up = np.float32(np.inf)
    for breakpoints in (
        np.array([low, np.nextafter(low, up), high + 100 * np.spacing(high)], np.float32),
        np.array([cluster[0] - 10 * np.spacing(high), high, np.nextafter(high, up)], np.float32),
    ):
        corrected = _assert_encodes_as_the_reference(x, bits, block, table, breakpoints, ranks)[2]
        assert corrected.size > 100


@pytest.mark.parametrize("breakpoints", [[0.0, 1e-39], [-1.2e38, 1.2e38]], ids=["too narrow", "beyond floats"])
def test_shared_encode_of_staircases_beyond_float_arithmetic_matches_the_reference(breakpoints: list[float]) -> None:
    """Staircases too narrow or too wide for a normal float cell scale are bisected; a block with more
    values beyond the support than a payload has room for is refused by every backend."""
    from fastfed.kernels import quantize_numpy

    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    table, ranks = np.array([[-1, 1]], np.float32), np.array([[0]], np.int32)
    points = np.array(breakpoints, np.float32)
    _assert_encodes_as_the_reference(np.zeros_like(x), 1, 4096, table, points, ranks)
    if breakpoints[1] > 1:
        _assert_encodes_as_the_reference(x, 1, 4096, table, points, ranks)
        return
    for level in _supported():
        with isa(level), pytest.raises(ValueError, match="values too large"):
            _encode_shared(_core().quantize, x, 1, 4096, table, points, ranks)
    with pytest.raises(ValueError, match="values too large"):
        _encode_shared(quantize_numpy, x, 1, 4096, table, points, ranks)


def test_shared_encode_rebuilds_its_kept_tables_for_another_codebook() -> None:
    """The native encoder keeps the last codebook's tables per bit width; other breakpoints or ranks of
    the same width, and then the first codebook again, encode as the reference does."""
    block, bits = 4096, 4
    x = np.random.default_rng(6).standard_normal(block).astype(np.float32)
    book = shared_codebook(bits)
    assert book.breakpoints is not None and book.ranks is not None
    stretched, swapped = book.breakpoints * 1.25, book.ranks[::-1].copy()
    codebooks = [
        (book.breakpoints, book.ranks),
        (stretched, book.ranks),
        (stretched, swapped),
        (book.breakpoints, book.ranks),
    ]
    outputs = [_assert_encodes_as_the_reference(x, bits, block, book.table, *codebook) for codebook in codebooks]
    assert not np.array_equal(outputs[0][1], outputs[1][1]) and not np.array_equal(outputs[1][1], outputs[2][1])


@pytest.mark.parametrize("level", _supported())
def test_crc32_equals_zlib_for_every_length_alignment_and_folding_method(level: str) -> None:
    """Every way this CPU folds at the level (not only the widest, which crc32 picks), so that the
    narrower ones, which other CPUs run, are checked here too."""
    data = np.random.default_rng(3).integers(0, 256, 5_000, dtype=np.uint8).tobytes()
    with isa(level):
        methods = _core().crc32_methods()
        assert methods[0] == "tables" and ("pclmul" in methods) == (level != "baseline")
        for length in [*range(0, 600), 1_023, 4_096, 4_999]:
            for start in (0, 1, 7):
                piece = data[start : start + length]
                assert _core().crc32(piece) == zlib.crc32(piece), (level, length, start)
                for method in methods:
                    expected = zlib.crc32(piece, 0xDEADBEEF)
                    assert _core().crc32_using(piece, 0xDEADBEEF, method) == expected, (level, method, length, start)


def test_crc32_refuses_a_folding_method_the_level_cannot_run() -> None:
    with isa("baseline"), pytest.raises(ValueError, match="method 'pclmul' is not one this CPU runs \\('tables'\\)"):
        _core().crc32_using(b"x" * 100, 0, "pclmul")


def test_crc32_of_large_buffers_is_combined_from_parallel_chunks() -> None:
    data = np.random.default_rng(4).integers(0, 256, 5 * 2**20 + 12_345, dtype=np.uint8)
    assert _core().crc32(data, 17) == zlib.crc32(data, 17)
    assert _core().crc32(memoryview(data.tobytes())[3:]) == zlib.crc32(data[3:])


def test_crc32_refuses_non_contiguous_buffers() -> None:
    with pytest.raises((BufferError, ValueError), match="contiguous"):
        _core().crc32(np.arange(10, dtype=np.uint8)[::2])


def test_set_isa_rejects_unknown_and_unsupported_levels() -> None:
    with pytest.raises(ValueError, match="expected 'baseline', 'avx2' or 'avx512'"):
        _core().set_isa("sse9")
    if _core().best_isa() != "avx512":
        with pytest.raises(ValueError, match="supports up to"):
            _core().set_isa("avx512")
    assert _core().isa() == _core().best_isa()
