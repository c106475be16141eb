"""What the aggregation API does with hostile or unusual input: non-finite values, masked arrays,
and one Accumulator shared by several threads. These run above the kernels, once."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastfed
from fastfed.compression import UniformQuantizer, encode


def _updates(poisoned: dict[int, float]) -> list[list[np.ndarray]]:
    """Four clients of two layers; client k's layer 1 holds ``poisoned[k]`` at one position."""
    updates = [[np.linspace(0, k, 10, dtype=np.float32), np.arange(5, dtype=np.float64) + k] for k in range(4)]
    for k, value in poisoned.items():
        updates[k][1][2] = value
    return updates


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_clients_raise_by_default_and_can_be_skipped_or_propagated(value: float) -> None:
    updates = _updates({2: value})
    weights = [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="client 2, layer 1: holds NaN or infinity; pass non_finite='skip'"):
        fastfed.weighted_mean(updates, weights)
    with pytest.raises(ValueError, match="client 2, layer 1"):
        fastfed.weighted_sum(updates, weights)
    skipped = fastfed.weighted_mean(updates, weights, non_finite="skip")
    without = fastfed.weighted_mean([updates[k] for k in (0, 1, 3)], [1.0, 2.0, 4.0])
    for got, want in zip(skipped, without, strict=True):
        np.testing.assert_array_equal(got, want)
    propagated = fastfed.weighted_mean(updates, weights, non_finite="propagate")
    assert not np.isfinite(propagated[1][2]) and np.isfinite(propagated[1][[0, 1, 3, 4]]).all()
    with pytest.raises(ValueError, match="every client with a positive weight holds NaN or infinity"):
        fastfed.weighted_mean(_updates({0: value, 1: value}), [1, 1, 0, 0], non_finite="skip")
    with pytest.raises(ValueError, match="non_finite must be one of 'raise', 'skip', 'propagate'"):
        fastfed.weighted_mean(updates, non_finite="ignore")  # type: ignore[arg-type]


def test_screened_mean_reports_the_skipped_clients() -> None:
    from fastfed.aggregation.mean import screened_mean

    screened = screened_mean(_updates({1: np.nan, 3: np.inf}), [1, 1, 1, 1])
    assert screened.skipped == [1, 3]
    np.testing.assert_array_equal(screened.layers[0], np.linspace(0, 1, 10, dtype=np.float32))  # clients 0, 2


def test_non_finite_raw_tensors_in_encoded_updates() -> None:
    updates = _updates({1: np.nan})
    codec = UniformQuantizer(bits=8, min_size=6)  # layer 0 quantized (finite by construction), layer 1 raw
    payloads = [encode(u, codec, seed=k) for k, u in enumerate(updates)]
    with pytest.raises(ValueError, match="client 1, layer 1: holds NaN or infinity"):
        fastfed.weighted_mean_encoded(payloads)
    skipped = fastfed.weighted_mean_encoded(payloads, non_finite="skip")
    expected = fastfed.weighted_mean_encoded([payloads[k] for k in (0, 2, 3)])
    for got, want in zip(skipped, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.isnan(fastfed.weighted_mean_encoded(payloads, non_finite="propagate")[1][2])
    accumulator = fastfed.Accumulator(non_finite="skip")
    for payload in payloads:
        accumulator.add_encoded(payload)
    assert accumulator.count == 3 and accumulator.skipped == [1]
    strict = fastfed.Accumulator()
    strict.add_encoded(payloads[0])
    with pytest.raises(ValueError, match="client 1, layer 1: holds NaN"):
        strict.add_encoded(payloads[1])
    assert strict.count == 1


def test_accumulator_non_finite_policies() -> None:
    updates = _updates({2: np.inf})
    strict = fastfed.Accumulator()
    for update in updates[:2]:
        strict.add(update)
    before = strict.result()
    with pytest.raises(ValueError, match="client 2, layer 1: holds NaN or infinity"):
        strict.add(updates[2])
    assert strict.count == 2
    for after, expected in zip(strict.result(), before, strict=True):
        np.testing.assert_array_equal(after, expected)
    lenient = fastfed.Accumulator(non_finite="skip")
    for update in updates:
        lenient.add(update, 2.0)
    assert lenient.count == 3 and lenient.skipped == [2] and lenient.total_weight == 6.0
    propagating = fastfed.Accumulator(non_finite="propagate")
    for update in updates:
        propagating.add(update)
    assert np.isinf(propagating.result()[1][2])


def test_masked_arrays_are_refused_everywhere_an_update_is_accepted() -> None:
    masked = np.ma.masked_array(np.ones(3, np.float32), mask=[False, True, False])
    plain = np.ones(3, np.float32)
    with pytest.raises(TypeError, match="client 1, layer 0: masked arrays are refused"):
        fastfed.weighted_mean([[plain], [masked]])
    with pytest.raises(TypeError, match="client 1, layer 0: masked arrays are refused"):
        fastfed.weighted_sum([[plain], [masked]])
    with pytest.raises(TypeError, match="weights: masked arrays are refused"):
        fastfed.weighted_mean([[plain], [plain]], np.ma.masked_array([1.0, 2.0], mask=[False, True]))
    with pytest.raises(TypeError, match="weights: masked arrays are refused"):
        fastfed.weighted_mean_encoded([encode([plain])], np.ma.masked_array([1.0], mask=[True]))
    with pytest.raises(TypeError, match="weight of client 0: masked arrays are refused"):
        fastfed.weighted_mean([[plain]], [np.ma.masked])
    accumulator = fastfed.Accumulator()
    with pytest.raises(TypeError, match="client 0, layer 0: masked arrays are refused"):
        accumulator.add([masked])
    accumulator.add([plain])
    with pytest.raises(TypeError, match="partial sum, layer 0: masked arrays are refused"):
        accumulator.add_weighted_sum([masked], 1.0)
    with pytest.raises(TypeError, match="layer 0: masked arrays are refused"):
        encode([masked])
    assert accumulator.count == 1


def test_one_accumulator_shared_by_threads_loses_nothing() -> None:
    # Integer-valued floats: every sum is exact, so any order of additions gives the same bits.
    rng = np.random.default_rng(0)
    updates = [[rng.integers(-100, 100, 100_000).astype(np.float32), np.array([k], np.int64)] for k in range(64)]
    payloads = [encode(update) for update in updates]
    shared, merged_into = fastfed.Accumulator(), fastfed.Accumulator()
    barrier = threading.Barrier(8)

    def work(part: int) -> None:
        barrier.wait()
        own = fastfed.Accumulator()
        for k in range(part, 64, 8):
            if k % 2:
                shared.add(updates[k], 1.0)
            else:
                shared.add_encoded(payloads[k], 1.0)
            own.add(updates[k], 1.0)
        merged_into.merge(own)

    threads = [threading.Thread(target=work, args=(part,)) for part in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = fastfed.weighted_mean(updates)
    for accumulator in (shared, merged_into):
        assert accumulator.count == 64 and accumulator.total_weight == 64.0
        for got, want in zip(accumulator.result(), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_out_arrays_are_left_as_they_were_when_non_finite_values_raise() -> None:
    updates = _updates({2: np.nan})
    global_model = [np.full(10, 7.0, np.float32), np.full(5, 7.0)]
    with pytest.raises(ValueError, match="client 2, layer 1"):
        fastfed.weighted_mean(updates, out=global_model)
    assert all((layer == 7.0).all() for layer in global_model)
    with pytest.raises(ValueError, match="every client with a positive weight"):
        fastfed.weighted_mean([updates[2]], out=global_model, non_finite="skip")
    assert all((layer == 7.0).all() for layer in global_model)
    skipped = fastfed.weighted_mean(updates, out=global_model, non_finite="skip")
    assert all(got is want for got, want in zip(skipped, global_model, strict=True))
    np.testing.assert_array_equal(global_model[1], fastfed.weighted_mean([updates[k] for k in (0, 1, 3)])[1])
