"""Aggregation throughput: fastfed backends vs Flower's aggregate and the memory-bandwidth floor.

Run: ``pytest benchmarks/test_aggregate_bench.py --benchmark-enable``. The floor is one streaming
read of all K x P float32 inputs: a BLAS matrix-vector product of the weights with the pre-stacked
K x P matrix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import fastfed

from .conftest import peak_memory_bytes
from .workloads import CNN_SHAPES, example_counts, random_updates

flwr_aggregate = pytest.importorskip("flwr.server.strategy.aggregate")

# Module-scoped fixtures build large workloads (or a Ray cluster) once: one xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("aggregate-bench")


WORKLOADS = {
    "cnn K=100": (100, CNN_SHAPES),
    "K=1000 x 100k": (1000, [(100_000,)]),
    "K=10 x 25M": (10, [(25_000_000,)]),
}


class Workload:
    def __init__(self, name: str) -> None:
        k, shapes = WORKLOADS[name]
        self.name = name
        self.updates = random_updates(k, shapes)
        self.weights = example_counts(k)
        self.parameters = sum(math.prod(shape) for shape in shapes)
        # A float64 reference for a slice of the largest layer, to assert every result against.
        self.layer = max(range(len(shapes)), key=lambda j: math.prod(shapes[j]))
        sample = np.stack([u[self.layer].reshape(-1)[:4096].astype(np.float64) for u in self.updates])
        self.reference = self.weights @ sample / self.weights.sum()

    def check(self, result: list[np.ndarray], rtol: float = 1e-6) -> None:
        assert len(result) == len(self.updates[0])
        np.testing.assert_allclose(result[self.layer].reshape(-1)[:4096], self.reference, rtol=rtol, atol=1e-7)


@pytest.fixture(scope="module", params=list(WORKLOADS))
def workload(request: pytest.FixtureRequest) -> Workload:
    return Workload(request.param)


def _run(benchmark: Any, workload: Workload, label: str, function: Any, rtol: float = 1e-6) -> None:
    benchmark.group = f"aggregate {workload.name} ({workload.parameters:,} params)"
    benchmark.extra_info["label"] = label
    result = benchmark.pedantic(function, rounds=5, iterations=1, warmup_rounds=1)
    workload.check(result, rtol)
    benchmark.extra_info["peak_mib"] = peak_memory_bytes(function) / 2**20


@pytest.mark.parametrize("name", fastfed.available_backends())
def test_fastfed_weighted_mean(benchmark: Any, workload: Workload, name: str) -> None:
    def aggregate() -> list[np.ndarray]:
        with fastfed.use_backend(name):
            return fastfed.weighted_mean(workload.updates, workload.weights)

    _run(benchmark, workload, f"fastfed {name}", aggregate)
    if name == "native":
        # No K-sized temporaries: the native path allocates about one model-sized result.
        output_bytes = workload.parameters * 4
        assert benchmark.extra_info["peak_mib"] * 2**20 < 1.2 * output_bytes + 2**20


def test_flower_aggregate(benchmark: Any, workload: Workload) -> None:
    results = [(update, int(n)) for update, n in zip(workload.updates, workload.weights)]
    _run(benchmark, workload, "flower aggregate", lambda: flwr_aggregate.aggregate(results), rtol=1e-5)


def test_memory_floor(benchmark: Any, workload: Workload) -> None:
    stacked = np.stack([np.concatenate([layer.reshape(-1) for layer in update]) for update in workload.updates])
    weights32 = (workload.weights / workload.weights.sum()).astype(np.float32)
    offsets = np.cumsum([0] + [layer.size for layer in workload.updates[0]])
    shapes = [layer.shape for layer in workload.updates[0]]

    def floor() -> list[np.ndarray]:
        flat = weights32 @ stacked
        return [flat[offsets[j] : offsets[j + 1]].reshape(shape) for j, shape in enumerate(shapes)]

    _run(benchmark, workload, "memory floor", floor, rtol=1e-4)


def test_flower_aggregate_inplace_from_parameters(benchmark: Any, workload: Workload) -> None:
    """Flower's in-place path takes serialized Parameters; fastfed is timed on the same input."""
    if workload.name != "cnn K=100":
        pytest.skip("the Parameters comparison runs on the CNN workload only")
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    fit_results = [
        (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), int(n), {}))
        for update, n in zip(workload.updates, workload.weights)
    ]
    _run(
        benchmark,
        workload,
        "flower aggregate_inplace (bytes)",
        lambda: flwr_aggregate.aggregate_inplace(fit_results),
        rtol=1e-5,
    )


def test_fastfed_from_parameters(benchmark: Any, workload: Workload) -> None:
    if workload.name != "cnn K=100":
        pytest.skip("the Parameters comparison runs on the CNN workload only")
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    serialized = [ndarrays_to_parameters(update) for update in workload.updates]

    def aggregate() -> list[np.ndarray]:
        accumulator = fastfed.Accumulator()
        for parameters, n in zip(serialized, workload.weights):
            accumulator.add(parameters_to_ndarrays(parameters), n)
        return accumulator.result()

    _run(benchmark, workload, "fastfed native (bytes, streaming)", aggregate)
