"""FedAvg round time against the compute floor measured in the same process.

Run: ``pytest benchmarks/test_fedavg_bench.py --benchmark-enable``. The compute floor is one compiled
training loop over the same examples (all clients' data as one client), same model and batch size,
with no federation: no broadcast, no per-client weight resets, no aggregation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import fastfed
from fastfed import data, models
from fastfed.compression import UniformQuantizer

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
pytestmark = pytest.mark.skipif(not MNIST.exists(), reason="the real MNIST test set is not next to the repository")


def _scenario(name: str) -> tuple[Any, list[tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    x, y = data.load_mnist_idx(MNIST)
    if name == "mnist-by-digit mlp":
        clients = data.partition_by_label(x.reshape(len(x), 784), y, per_client=1000).all()
        return (lambda: models.mlp((784,), hidden=512)), clients, {"batch_size": 100, "client_lr": 0.1}
    # The CNN scenario: 10 clients x 400 MNIST test images.
    clients = [(x[400 * k : 400 * (k + 1)], y[400 * k : 400 * (k + 1)]) for k in range(10)]
    return (lambda: models.cnn((28, 28))), clients, {"batch_size": 20, "client_lr": 0.02}


def _process(model_fn: Any, settings: dict[str, Any], codec: UniformQuantizer | None) -> fastfed.FedAvg:
    return fastfed.FedAvg(
        model_fn,
        client_optimizer=lambda: keras.optimizers.SGD(learning_rate=settings["client_lr"]),
        server_optimizer=fastfed.optimizers.SGD(learning_rate=1.0),
        aggregator=fastfed.mean_aggregator(codec=codec),
        broadcast_codec=codec,
        batch_size=settings["batch_size"],
        seed=0,
    )


SCENARIOS = ["mnist-by-digit mlp", "cnn 10x400"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_compute_floor(benchmark: Any, scenario: str) -> None:
    model_fn, clients, settings = _scenario(scenario)
    process = _process(model_fn, settings, None)
    weights = process.initialize().weights
    x = np.concatenate([c[0] for c in clients])
    y = np.concatenate([c[1] for c in clients])
    rng = np.random.default_rng(0)
    benchmark.group = f"fedavg round: {scenario}"
    benchmark.extra_info["label"] = "compute floor"
    result = benchmark.pedantic(lambda: process.trainer.train(weights, x, y, rng), rounds=5, warmup_rounds=1)
    assert result.num_examples == len(x) and np.isfinite(result.loss_sum)


@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fedavg_round(benchmark: Any, scenario: str, bits: int | None) -> None:
    model_fn, clients, settings = _scenario(scenario)
    codec = UniformQuantizer(bits=bits) if bits else None
    process = _process(model_fn, settings, codec)
    state = process.initialize()
    # Round 1 traces the training step; the ratio to a steady round is reported, not asserted.
    started = time.perf_counter()
    state, _ = process.next(state, clients)
    first_round = time.perf_counter() - started
    holder = {"state": state}

    def one_round() -> dict[str, float]:
        holder["state"], metrics = process.next(holder["state"], clients)
        return metrics

    benchmark.group = f"fedavg round: {scenario}"
    benchmark.extra_info["label"] = f"fedavg {'uncompressed' if bits is None else f'{bits}-bit up+down'}"
    metrics = benchmark.pedantic(one_round, rounds=5, iterations=1)
    steady = benchmark.stats.stats.median if benchmark.stats else metrics["round_seconds"]
    benchmark.extra_info["first_round_ratio"] = first_round / steady
    assert process.trainer.traces == 1
    assert metrics["num_examples"] == sum(len(c[1]) for c in clients)
    assert metrics["update_non_finite"] == 0 and 0.0 < metrics["train_accuracy"] <= 1.0
