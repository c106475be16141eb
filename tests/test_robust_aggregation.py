"""fastfed.median and fastfed.trimmed_mean: Flower's semantics, dtypes, non-finite policies and bad
input. The kernels behind them are checked against each other in test_aggregate_kernels.py."""

from __future__ import annotations

import numpy as np
import pytest

import fastfed


def _updates(k: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5), np.array(k * 10 + j, np.int64)]
        for j in range(k)
    ]


@pytest.mark.parametrize("k", [1, 4, 7])
def test_median_follows_numpy_and_keeps_shapes_and_dtypes(k: int) -> None:
    updates = _updates(k)
    result = fastfed.median(updates)
    for j, layer in enumerate(result):
        stacked = np.stack([u[j] for u in updates])
        assert layer.shape == updates[0][j].shape and layer.dtype == updates[0][j].dtype
        if layer.dtype.kind == "f":
            np.testing.assert_array_equal(layer, np.median(stacked, axis=0))
    # Integers stay integers: the midpoint of the middle two, rounded half to even.
    assert int(result[2]) == int(np.rint(np.median([u[2] for u in updates])))


def test_trimmed_mean_cuts_int_beta_k_from_each_end_like_flower() -> None:
    updates = [[np.array([v], np.float64)] for v in (1.0, 2.0, 3.0, 4.0, 1000.0, -1000.0, 5.0)]
    # beta = 0.2 of 7 clients cuts int(1.4) = 1 value from each end: the two outliers.
    np.testing.assert_array_equal(fastfed.trimmed_mean(updates, 0.2)[0], [3.0])
    np.testing.assert_array_equal(fastfed.trimmed_mean(updates, 0.0)[0], [15.0 / 7])
    # beta = 0.45 of 7 cuts 3 from each end: the median.
    np.testing.assert_array_equal(fastfed.trimmed_mean(updates, 0.45)[0], [3.0])
    for beta in (0.5, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"beta must be in \[0, 0.5\)"):
            fastfed.trimmed_mean(updates, beta)
    with pytest.raises(TypeError, match="beta must be a number"):
        fastfed.trimmed_mean(updates, True)


def test_robust_aggregates_ignore_a_minority_of_huge_updates() -> None:
    honest = [[np.full(4, 1.0 + 0.01 * k, np.float32)] for k in range(7)]
    attackers = [[np.full(4, 3e38, np.float32)], [np.full(4, -3e38, np.float32)]]
    median = fastfed.median(honest + attackers)[0]
    trimmed = fastfed.trimmed_mean(honest + attackers, 0.2)[0]
    assert np.all((median >= 1.0) & (median <= 1.06)) and np.all((trimmed >= 1.0) & (trimmed <= 1.06))


def test_robust_aggregates_are_exact_for_64bit_integers() -> None:
    top = 2**63 - 1
    updates = [[np.array([top - d], np.int64)] for d in (0, 2, 4, 6)]
    assert fastfed.median(updates)[0].tolist() == [top - 3]  # (top-4 + top-2)/2, exactly
    assert fastfed.trimmed_mean(updates, 0.25)[0].tolist() == [top - 3]
    unsigned = [[np.array([2**64 - 1], np.uint64)]] * 3
    assert fastfed.trimmed_mean(unsigned, 0.0)[0].tolist() == [2**64 - 1]


@pytest.mark.parametrize("aggregate", [fastfed.median, lambda u, **kw: fastfed.trimmed_mean(u, 0.2, **kw)])
def test_non_finite_policies(aggregate) -> None:  # type: ignore[no-untyped-def]
    updates = _updates(6)
    updates[4][1][2] = np.nan
    updates[1][0][0, 0] = np.inf
    with pytest.raises(ValueError, match="client 1, layer 0: holds NaN or infinity"):
        aggregate(updates)
    skipped = aggregate(updates, non_finite="skip")
    expected = aggregate([u for k, u in enumerate(updates) if k not in (1, 4)])
    for got, want in zip(skipped, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    propagated = aggregate(updates, non_finite="propagate")
    assert np.isnan(propagated[1][2]) and np.isfinite(np.delete(propagated[1], 2)).all()
    assert np.isfinite(propagated[0]).all()  # one infinity among six values is ordered, not averaged in
    with pytest.raises(ValueError, match="every client holds NaN or infinity"):
        aggregate([updates[1], updates[4]], non_finite="skip")


def test_bad_input_names_client_and_layer() -> None:
    with pytest.raises(ValueError, match=r"client 1, layer 0: shape \(2,\)"):
        fastfed.median([[np.ones(3)], [np.ones(2)]])
    with pytest.raises(TypeError, match="client 1, layer 0: masked arrays are refused"):
        fastfed.trimmed_mean([[np.ones(3)], [np.ma.masked_array(np.ones(3), mask=[0, 1, 0])]], 0.1)
    with pytest.raises(ValueError, match="at least one client update"):
        fastfed.median([])
    with pytest.raises(ValueError, match="non_finite must be one of"):
        fastfed.median([[np.ones(3)]], non_finite="drop")  # type: ignore[arg-type]
