"""Robust aggregation: fastfed's coordinate-wise median and trimmed mean against Flower's FedMedian
and FedTrimmedAvg, on K=100 updates of the FedAvg CNN (1,663,370 float32 parameters each).

Run: ``pytest benchmarks/test_robust_bench.py --benchmark-enable``. Without ``--benchmark-enable``
(the test suite) the same checks run on small updates, as Flower takes seconds per CNN round.
Two levels, each in its own
group: the aggregation functions on NumPy arrays (Flower's ``aggregate_median`` and
``aggregate_trimmed_avg`` against :func:`fastfed.median` and :func:`fastfed.trimmed_mean` on every
backend), and the legacy strategies' ``aggregate_fit`` on serialized results (FedMedian and
FedTrimmedAvg against FastFedMedian and FastFedTrimmedAvg), deserialisation included. Every
result is asserted against Flower's: equal for the median, within float32 rounding for the trimmed
mean (Flower sums in float32, fastfed in float64).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import fastfed

from .conftest import timing
from .workloads import CNN_SHAPES, example_counts, random_updates

pytest.importorskip("flwr")

from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy as legacy
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

from fastfed.integrations import flower as fast_legacy

# Module-scoped fixtures build large workloads once: one xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("robust-bench")

K = 100
BETA = 0.2


SMALL_SHAPES = [(5, 5, 1, 32), (32,), (64,), (10,)]


@pytest.fixture(scope="module")
def cnn_updates(request: pytest.FixtureRequest) -> list[list[np.ndarray]]:
    logging.getLogger("flwr").setLevel(logging.ERROR)
    return random_updates(K, CNN_SHAPES if timing(request.config) else SMALL_SHAPES)


@pytest.fixture(scope="module")
def flower_results(cnn_updates: list[list[np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Flower's own answers, computed once, that every benchmark's result is checked against."""
    results = [(update, 1) for update in cnn_updates]
    return {"median": aggregate_median(results), "trimmed mean": aggregate_trimmed_avg(results, BETA)}


def _check(kind: str, result: list[np.ndarray], flower: dict[str, list[np.ndarray]]) -> None:
    assert [r.shape for r in result] == [f.shape for f in flower[kind]]
    for got, want in zip(result, flower[kind]):
        if kind == "median":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _run(benchmark: Any, group: str, label: str, function: Callable[[], list[np.ndarray]], slow: bool) -> Any:
    benchmark.group = group
    benchmark.extra_info["label"] = label
    # Flower's robust aggregation takes seconds a call: fewer rounds keep the run short.
    return benchmark.pedantic(function, rounds=3 if slow else 5, iterations=1, warmup_rounds=0 if slow else 1)


KINDS = {
    "median": (lambda updates: aggregate_median([(u, 1) for u in updates]), fastfed.median, "FedMedian"),
    "trimmed mean": (
        lambda updates: aggregate_trimmed_avg([(u, 1) for u in updates], BETA),
        lambda updates: fastfed.trimmed_mean(updates, BETA),
        "FedTrimmedAvg",
    ),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", ["flower", *fastfed.available_backends()])
def test_robust_aggregate(benchmark: Any, cnn_updates: Any, flower_results: Any, kind: str, name: str) -> None:
    flower_function, fastfed_function, strategy = KINDS[kind]
    group = f"{kind} of K={K} cnn updates (NumPy arrays)"
    if name == "flower":
        result = _run(benchmark, group, f"flower aggregate ({strategy})", lambda: flower_function(cnn_updates), True)
    else:

        def aggregate() -> list[np.ndarray]:
            with fastfed.use_backend(name):
                return fastfed_function(cnn_updates)  # type: ignore[no-any-return]

        result = _run(benchmark, group, f"fastfed {name}", aggregate, name == "numpy")
    _check(kind, result, flower_results)


STRATEGIES = {
    "median": (legacy.FedMedian, fast_legacy.FastFedMedian, "FedMedian"),
    "trimmed mean": (
        lambda: legacy.FedTrimmedAvg(beta=BETA),
        lambda: fast_legacy.FastFedTrimmedAvg(beta=BETA),
        "FedTrimmedAvg",
    ),
}


@pytest.mark.parametrize("kind", list(STRATEGIES))
@pytest.mark.parametrize("side", ["flower", "fastfed"])
def test_robust_aggregate_fit(benchmark: Any, cnn_updates: Any, flower_results: Any, kind: str, side: str) -> None:
    flower_strategy, fast_strategy, name = STRATEGIES[kind]
    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), int(n), {})) for u, n in
               zip(cnn_updates, example_counts(K))]  # fmt: skip
    strategy = (flower_strategy if side == "flower" else fast_strategy)()

    def aggregate() -> list[np.ndarray]:
        parameters, _ = strategy.aggregate_fit(1, results, [])
        return parameters_to_ndarrays(parameters)

    group = f"{kind} aggregate_fit, K={K} cnn (deserialisation included)"
    label = f"flower aggregate ({name})" if side == "flower" else f"fastfed Fast{name}"
    _check(kind, _run(benchmark, group, label, aggregate, side == "flower"), flower_results)
