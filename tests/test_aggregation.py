"""fastfed.weighted_mean / weighted_sum / Accumulator: exactness, dtypes, layouts, bad input."""

from __future__ import annotations

import threading
from fractions import Fraction

import numpy as np
import pytest

import fastfed

pytestmark = pytest.mark.usefixtures("backend")

SHAPES = [(5, 5, 1, 32), (32,), (7, 3), (10,)]


def _updates(k: int, seed: int = 0, dtype: type = np.float32) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(shape).astype(dtype) for shape in SHAPES] for _ in range(k)]


def _reference_mean(updates: list[list[np.ndarray]], weights: np.ndarray) -> list[np.ndarray]:
    total = weights.sum()
    return [sum(w * u[j].astype(np.float64) for w, u in zip(weights, updates)) / total for j in range(len(updates[0]))]


def test_weighted_mean_matches_float64_reference_for_10000_clients() -> None:
    # Prepare: K = 10,000 float32 clients of 100 parameters with example-count weights.
    rng = np.random.default_rng(0)
    stacked = rng.standard_normal((10_000, 100)).astype(np.float32)
    weights = rng.integers(1, 1000, 10_000).astype(np.float64)
    # Execute
    (mean,) = fastfed.weighted_mean([[row] for row in stacked], weights)
    # Assert
    reference = (weights @ stacked.astype(np.float64)) / weights.sum()
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, reference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_dtypes_are_kept(dtype: type) -> None:
    updates = _updates(5, dtype=dtype)
    weights = np.arange(1.0, 6.0)
    result = fastfed.weighted_mean(updates, weights)
    for layer, expected in zip(result, _reference_mean(updates, weights)):
        assert layer.dtype == dtype
        np.testing.assert_array_equal(layer, expected.astype(dtype))


def test_integer_layers_are_averaged_and_rounded_not_zeroed() -> None:
    # Flower's in-place path multiplies an int64 layer by a fractional weight cast to int64: zeros.
    updates = [
        [np.array([10, 1, 7], np.int64), np.array(3, np.uint8)],
        [np.array([20, 2, 8], np.int64), np.array(5, np.uint8)],
    ]
    counts, scalar = fastfed.weighted_mean(updates, [3, 1])
    np.testing.assert_array_equal(counts, [12, 1, 7])  # 12.5 -> 12 (half to even), 1.25 -> 1, 7.25 -> 7
    assert counts.dtype == np.int64
    assert scalar.dtype == np.uint8 and scalar.shape == () and scalar == 4  # 3.5 -> 4
    steps = fastfed.weighted_mean([[np.array(1_000_000_007, np.int64)]] * 3, [0.1, 0.2, 0.3])
    assert steps[0] == 1_000_000_007


def test_unit_weights_by_default() -> None:
    updates = _updates(4)
    np.testing.assert_array_equal(fastfed.weighted_mean(updates)[2], fastfed.weighted_mean(updates, [2, 2, 2, 2])[2])


def test_weighted_sum_is_float64_and_unnormalised() -> None:
    updates = _updates(3)
    sums = fastfed.weighted_sum(updates, [1.0, 2.0, 3.0])
    assert all(layer.dtype == np.float64 for layer in sums)
    np.testing.assert_allclose(sums[0], sum(w * u[0].astype(np.float64) for w, u in zip([1, 2, 3], updates)))


def test_noncontiguous_readonly_and_big_endian_inputs() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((3, 40, 60)).astype(np.float32)
    strided = [base[k, ::2, ::3] for k in range(3)]  # non-contiguous views
    transposed = [base[k].T for k in range(3)]  # Fortran-ordered views
    readonly = [base[k].copy() for k in range(3)]
    for array in readonly:
        array.flags.writeable = False
    big_endian = [base[k].astype(">f4") for k in range(3)]
    weights = [1.0, 2.0, 4.0]
    for layers in (strided, transposed, readonly, big_endian):
        (mean,) = fastfed.weighted_mean([[layer] for layer in layers], weights)
        expected = sum(w * np.asarray(layer, np.float64) for w, layer in zip(weights, layers)) / 7.0
        assert mean.shape == layers[0].shape
        np.testing.assert_array_equal(mean, expected.astype(np.float32))
    assert all(not array.flags.writeable for array in readonly)


def test_concurrent_calls_from_threads_are_safe() -> None:
    updates = [[np.random.default_rng(k).standard_normal(200_000).astype(np.float32)] for k in range(16)]
    expected = fastfed.weighted_mean(updates, np.arange(1, 17))[0]
    results: list[np.ndarray] = []
    errors: list[BaseException] = []
    backend = fastfed.backend()

    def work() -> None:
        try:
            with fastfed.use_backend(backend):
                for _ in range(5):
                    results.append(fastfed.weighted_mean(updates, np.arange(1, 17))[0])
        except BaseException as error:  # pragma: no cover - surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 20
    for result in results:
        np.testing.assert_array_equal(result, expected)


def test_zero_weight_clients_do_not_contribute_even_if_non_finite() -> None:
    updates = [[np.ones(3, np.float32)], [np.full(3, np.inf, np.float32)]]
    np.testing.assert_array_equal(fastfed.weighted_mean(updates, [1.0, 0.0])[0], np.ones(3, np.float32))


@pytest.mark.parametrize(
    ("updates", "weights", "error", "message"),
    [
        ([], [], ValueError, "at least one client update"),
        ([[np.ones(2)], [np.ones(2)]], [1.0], ValueError, "2 client updates but 1 weights"),
        ([[np.ones(2)], [np.ones(2), np.ones(1)]], [1, 1], ValueError, "client 1 has 2 layers; expected 1"),
        (
            [[np.ones(2), np.ones(3)], [np.ones(2), np.ones(4)]],
            [1, 1],
            ValueError,
            r"client 1, layer 1: shape \(4,\)",
        ),
        ([[np.ones(2, np.float32)], [np.ones(2)]], [1, 1], TypeError, "client 1, layer 0: dtype float64"),
        ([[np.ones(2)], [np.ones(2)]], [1, -1], ValueError, "weight of client 1 is -1.0"),
        ([[np.ones(2)], [np.ones(2)]], [1, float("nan")], ValueError, "weight of client 1 is nan"),
        ([[np.ones(2)], [np.ones(2)]], [float("inf"), 1], ValueError, "weight of client 0 is inf"),
        ([[np.ones(2)], [np.ones(2)]], [0, 0], ValueError, "weights sum to zero"),
        ([[np.array(["a", "b"])]], [1], TypeError, "client 0, layer 0: dtype <U1 cannot be averaged"),
        ([[np.array([object(), 1])]], [1], TypeError, "client 0, layer 0: dtype object"),
        ([[np.ones(2)], [np.array([True, False])]], [1, 1], TypeError, "client 1, layer 0: dtype bool"),
        *(  # long double, where it is wider than float64
            [([[np.ones(2)], [np.ones(2, np.longdouble)]], [1, 1], TypeError, "client 1, layer 0: dtype float128")]
            if np.dtype(np.longdouble).itemsize > 8
            else []
        ),
        ([[np.ones(2)], np.ones(2)], [1, 1], TypeError, "client 1: expected a list of arrays"),
        ([[np.ones(2)]], ["heavy"], TypeError, "weight of client 0 is 'heavy'"),
    ],
)
def test_bad_input_names_client_and_layer(updates: list, weights: list, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        fastfed.weighted_mean(updates, weights)


def test_accumulator_equals_weighted_mean_bit_for_bit() -> None:
    updates = _updates(30, seed=5)
    weights = np.random.default_rng(5).integers(1, 600, 30)
    accumulator = fastfed.Accumulator()
    for update, weight in zip(updates, weights):
        accumulator.add(update, weight)
    assert accumulator.count == 30
    assert accumulator.total_weight == weights.sum()
    for streamed, batched in zip(accumulator.result(), fastfed.weighted_mean(updates, weights)):
        np.testing.assert_array_equal(streamed, batched)


def test_accumulator_merge_partial_sums_and_reset() -> None:
    updates = _updates(6, seed=8)
    left, right = fastfed.Accumulator(), fastfed.Accumulator()
    for update in updates[:2]:
        left.add(update, 2.0)
    for update in updates[2:]:
        right.add(update, 1.0)
    left.merge(right)
    assert left.count == 6 and left.total_weight == 8.0
    expected = fastfed.weighted_mean(updates, [2, 2, 1, 1, 1, 1])
    for merged, reference in zip(left.result(), expected):
        np.testing.assert_allclose(merged, reference, rtol=1e-6)
    partial = fastfed.Accumulator.from_specs(left.specs or [])
    partial.add_weighted_sum(fastfed.weighted_sum(updates, [2, 2, 1, 1, 1, 1]), 8.0, count=6)
    for merged, reference in zip(partial.result(), expected):
        np.testing.assert_allclose(merged, reference, rtol=1e-6)
    left.reset()
    assert left.count == 0 and left.total_weight == 0.0
    with pytest.raises(ValueError, match="no update"):
        left.result()


def test_accumulator_rejects_bad_update_without_losing_state() -> None:
    updates = _updates(2, seed=9)
    accumulator = fastfed.Accumulator()
    accumulator.add(updates[0], 1.0)
    before = accumulator.result()
    with pytest.raises(ValueError, match="client 1, layer 2: shape"):
        accumulator.add([updates[1][0], updates[1][1], np.ones((3, 7), np.float32), updates[1][3]], 1.0)
    with pytest.raises(ValueError, match="weight of client 1"):
        accumulator.add(updates[1], -2.0)
    assert accumulator.count == 1
    for after, expected in zip(accumulator.result(), before):
        np.testing.assert_array_equal(after, expected)


def test_out_arrays_receive_the_mean_and_are_returned() -> None:
    updates = [[*layers, np.array([k, 2 * k], np.int64)] for k, layers in enumerate(_updates(9))]
    weights = np.arange(1.0, 10.0)
    expected = fastfed.weighted_mean(updates, weights)
    out = [np.full_like(layer, 7) for layer in expected]
    result = fastfed.weighted_mean(updates, weights, out=out)
    assert all(got is destination for got, destination in zip(result, out, strict=True))
    for got, want in zip(out, expected):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    sums = [np.empty(layer.shape) for layer in expected]
    for got, want in zip(fastfed.weighted_sum(updates, weights, out=sums), fastfed.weighted_sum(updates, weights)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"out\[1\]: expected a \(32,\) float32 array, got \(32,\) float64"):
        fastfed.weighted_mean(updates, weights, out=[out[0], np.zeros(32), *out[2:]])
    with pytest.raises(ValueError, match=r"out: 2 arrays for 5 layers"):
        fastfed.weighted_mean(updates, weights, out=out[:2])
    with pytest.raises(ValueError, match=r"out\[0\]: expected a writable"):
        fastfed.weighted_mean(updates, weights, out=[np.asfortranarray(out[0]), *out[1:]])


def _rounded(value: Fraction) -> float:
    try:
        return float(value)
    except OverflowError:  # a sum beyond float64, which the float64 sum rightly gives as infinity
        return float("inf") if value > 0 else float("-inf")


def _exact_mean(values: list[float], weights: list[float]) -> float:
    """The weighted mean in exact rational arithmetic, rounded once to float64."""
    total = sum(Fraction(w) for w in weights)
    return float(sum(Fraction(w) * Fraction(v) for w, v in zip(weights, values)) / total)


@pytest.mark.parametrize(
    "weights",
    [[1e-300, 3e-300], [1e308, 1e308], [1e38, 3e38], [5e-324, 1.5e-323], [1e308, 1e-300], [1e-40, 3e-40]],
)
def test_extreme_weights_give_the_right_mean_on_every_path(weights: list[float]) -> None:
    from fastfed.compression import UniformQuantizer, encode

    low, high = np.linspace(-1, 1, 2000, dtype=np.float32), np.linspace(2, 5, 2000, dtype=np.float32)
    updates = [[low], [high]]
    exact = np.array([_exact_mean([a, b], weights) for a, b in zip(low.tolist(), high.tolist())])
    mean = fastfed.weighted_mean(updates, weights)[0]
    np.testing.assert_allclose(mean, exact, rtol=1.2e-7, atol=0)  # within float32's rounding of the exact mean
    accumulator, encoded_accumulator = fastfed.Accumulator(), fastfed.Accumulator()
    for update, weight in zip(updates, weights):
        accumulator.add(update, weight)
        encoded_accumulator.add_encoded(encode(update), weight)
    for same in (
        accumulator.result()[0],
        encoded_accumulator.result()[0],
        fastfed.weighted_mean_encoded([encode(u) for u in updates], weights)[0],
    ):
        np.testing.assert_array_equal(same, mean)
    # Quantized: within the float32 rounding of the level sums, far below a 16-bit step (5/65535).
    payloads = [encode(u, UniformQuantizer(bits=16, stochastic=False, min_size=0), seed=0) for u in updates]
    np.testing.assert_allclose(fastfed.weighted_mean_encoded(payloads, weights)[0], exact, rtol=0, atol=5e-5)
    w0, w1 = Fraction(weights[0]), Fraction(weights[1])
    exact_sums = [_rounded(w0 * Fraction(a) + w1 * Fraction(b)) for a, b in zip(low.tolist(), high.tolist())]
    np.testing.assert_allclose(fastfed.weighted_sum(updates, weights)[0], exact_sums, rtol=1e-15)


def test_64bit_integer_layers_average_exactly_at_their_limits() -> None:
    from fastfed.compression import encode

    top, bottom, utop = 2**63 - 1, -(2**63), 2**64 - 1
    cases = [
        ([top], [1.0], np.int64, top),
        ([top, top - 2], [1.0, 1.0], np.int64, top - 1),
        ([bottom, bottom + 2], [0.25, 0.25], np.int64, bottom + 1),
        ([top, bottom], [1.0, 1.0], np.int64, 0),  # -0.5, half to even
        ([utop] * 3, [0.1, 0.2, 0.3], np.uint64, utop),
        ([utop, utop - 2], [1.0, 3.0], np.uint64, utop - 1),  # 2**64 - 2.5 -> the even neighbour
        ([top, 0], [1e308, 1e-300], np.int64, top),
    ]
    for values, weights, dtype, expected in cases:
        updates = [[np.array([v], dtype), np.array(v, dtype)] for v in values]
        accumulator, encoded = fastfed.Accumulator(), fastfed.Accumulator()
        for update, weight in zip(updates, weights):
            accumulator.add(update, weight)
            encoded.add_encoded(encode(update), weight)
        merged = fastfed.Accumulator()
        merged.merge(accumulator)
        means = [
            fastfed.weighted_mean(updates, weights),
            fastfed.weighted_mean_encoded([encode(u) for u in updates], weights),
            accumulator.result(),
            encoded.result(),
            merged.result(),
        ]
        for mean in means:
            assert mean[0].dtype == dtype and mean[0].tolist() == [expected], (values, weights, mean)
            assert mean[1].shape == () and int(mean[1]) == expected
    # int32 at its limits goes through float64, which holds it exactly.
    (mean,) = fastfed.weighted_mean([[np.array([2**31 - 1], np.int32)]] * 3, [0.1, 0.2, 0.7])
    assert mean.tolist() == [2**31 - 1]
