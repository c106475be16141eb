"""Flower's aggregation step with and without fastfed, K=100 clients of the FedAvg CNN.

Run: ``pytest benchmarks/test_flower_bench.py --benchmark-enable``. Updates arrive serialized, as
Flower delivers them (legacy ``Parameters``, Message-API ``ArrayRecord``), so deserialisation is
part of every measurement. Flower's FedAvg aggregates in place by default (``inplace=True``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy as legacy
from flwr.serverapp import strategy as message_api

from fastfed.integrations import flower as fast_legacy
from fastfed.integrations.flower import serverapp as fast_message

from .conftest import peak_memory_bytes
from .workloads import CNN_SHAPES, example_counts, random_updates

# Module-scoped fixtures build large workloads (or a Ray cluster) once: one xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("flower-bench")


K = 100


@pytest.fixture(scope="module")
def cnn_updates() -> tuple[list[list[np.ndarray]], np.ndarray, list[np.ndarray]]:
    logging.getLogger("flwr").setLevel(logging.ERROR)
    updates = random_updates(K, CNN_SHAPES)
    weights = example_counts(K)
    exact = [sum(w * u[j].astype(np.float64) for w, u in zip(weights, updates)) / weights.sum() for j in range(8)]
    return updates, weights, exact


def _check(result: list[np.ndarray], exact: list[np.ndarray]) -> None:
    assert [r.shape for r in result] == [e.shape for e in exact]
    for r, e in zip(result, exact):
        np.testing.assert_allclose(r, e, rtol=1e-4, atol=1e-6)


LEGACY = {
    "flower aggregate (inplace, default)": lambda: legacy.FedAvg(),
    "flower aggregate (inplace=False)": lambda: legacy.FedAvg(inplace=False),
    "fastfed FastFedAvg": lambda: fast_legacy.FastFedAvg(),
}


@pytest.mark.parametrize("label", list(LEGACY))
def test_legacy_aggregate_fit(benchmark: Any, cnn_updates: Any, label: str) -> None:
    updates, weights, exact = cnn_updates
    results = [
        (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), int(n), {})) for u, n in zip(updates, weights)
    ]
    strategy = LEGACY[label]()

    def aggregate() -> list[np.ndarray]:
        parameters, _ = strategy.aggregate_fit(1, results, [])
        return parameters_to_ndarrays(parameters)

    benchmark.group = f"flower aggregate_fit, K={K} cnn (deserialisation included)"
    benchmark.extra_info["label"] = (
        label if "fastfed" in label else label.replace("flower FedAvg", "flower aggregate", 1)
    )
    _check(benchmark.pedantic(aggregate, rounds=5, iterations=1, warmup_rounds=1), exact)
    benchmark.extra_info["peak_mib"] = peak_memory_bytes(aggregate) / 2**20


MESSAGE = {"flower aggregate (FedAvg)": message_api.FedAvg, "fastfed FastFedAvg": fast_message.FastFedAvg}


@pytest.mark.parametrize("label", list(MESSAGE))
def test_message_api_aggregate_train(benchmark: Any, cnn_updates: Any, label: str) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    updates, weights, exact = cnn_updates
    # Messages are created inside a run; a ServerApp would have set this identity.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    replies = [
        Message(
            content=RecordDict({"arrays": ArrayRecord(u), "metrics": MetricRecord({"num-examples": int(n)})}),
            dst_node_id=0,
            message_type="train",
        )
        for u, n in zip(updates, weights)
    ]
    strategy = MESSAGE[label]()

    def aggregate() -> list[np.ndarray]:
        arrays, _ = strategy.aggregate_train(1, replies)
        return arrays.to_numpy_ndarrays()

    benchmark.group = f"flower aggregate_train (Message API), K={K} cnn (deserialisation included)"
    benchmark.extra_info["label"] = label
    _check(benchmark.pedantic(aggregate, rounds=5, iterations=1, warmup_rounds=1), exact)
    benchmark.extra_info["peak_mib"] = peak_memory_bytes(aggregate) / 2**20
    assert math.isfinite(benchmark.extra_info["peak_mib"])
