"""FedAvg rounds: fastfed against a plain Keras per-step loop, the compiled-epoch floor, and TFF 0.87.

Run: ``pytest benchmarks/test_fedavg_bench.py --benchmark-enable -s``. With ``FASTFED_TFF_PYTHON``
set to the interpreter of the TFF 0.87 environment (../shared/peers/README.md), TFF trains the same
clients in the same run (benchmarks/tff_rounds.py): its median round time is reported beside
fastfed's, and per-round training accuracy must agree within 1.5 points. Scenarios, on the real
MNIST test set: MNIST by digit (10 clients of <= 1,000, MLP, batch 100); 20 label-skewed clients
(Dirichlet 0.5, MLP, batch 20, about 500 steps per round); the FedAvg CNN (10 clients x 400, batch
20), plain and with 8-bit uploads and broadcast (TFF's ``compression_aggregator``).

TensorFlow starts with its defaults in this process before anything is timed, so that the
baselines run as a user would run them; fastfed's rounds are timed here too, and also in a process
of their own (benchmarks/fastfed_rounds.py), as a user's script runs them and as TFF's are: there
fastfed starts TensorFlow and gives each client thread its share of the cores. The comparison with
TFF, process against process, uses that run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import fastfed
from fastfed import data
from fastfed.bench import KerasLoop

from .conftest import timing
from .workloads import FEDAVG_SCENARIOS, fedavg_model_fn, fedavg_process

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
TFF_PYTHON = os.environ.get("FASTFED_TFF_PYTHON")
pytestmark = pytest.mark.skipif(not MNIST.exists(), reason="the real MNIST test set is not next to the repository")

SCENARIOS = FEDAVG_SCENARIOS
ROUNDS = 6
REPOSITORY = Path(__file__).resolve().parents[1]


def _clients(name: str, config: pytest.Config) -> list[tuple[np.ndarray, np.ndarray]]:
    """The scenario's clients; untimed (CI), the first two with 100 examples each, which still runs
    every path (tests/ check the results of full rounds)."""
    x, y = data.load_mnist_idx(MNIST)
    if name == "mnist by digit":
        clients = data.partition_by_label(x.reshape(len(x), 784), y, per_client=1000).all()
    elif name == "20 label-skewed clients":
        clients = data.partition_dirichlet(x.reshape(len(x), 784), y, 20, alpha=0.5, seed=0).all()
    else:
        order = np.random.default_rng(0).permutation(len(x))
        clients = [(x[order[400 * k : 400 * (k + 1)]], y[order[400 * k : 400 * (k + 1)]]) for k in range(10)]
    return clients if timing(config) else [(x[:100], y[:100]) for x, y in clients[:2]]


def _process(name: str) -> fastfed.FedAvg:
    return fedavg_process(*SCENARIOS[name])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def saved_clients(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> dict[str, Path]:
    """Every scenario's clients in an .npz file, for the processes below (only when benchmarking)."""
    if not timing(request.config):
        return {}
    folder = tmp_path_factory.mktemp("clients")
    paths = {}
    for name in SCENARIOS:
        paths[name] = folder / f"{name.replace(' ', '_')}.npz"
        arrays = _clients(name, request.config)
        np.savez(
            paths[name], **{f"{axis}{k}": values for k, pair in enumerate(arrays) for axis, values in zip("xy", pair)}
        )
    return paths


def _rounds_in_a_process(command: list[str], cwd: Path) -> dict[str, Any]:
    """Per-round training accuracy and the summary printed by tff_rounds.py or fastfed_rounds.py."""
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=cwd, check=False)
    lines = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    assert lines and "median_round_seconds" in lines[-1], completed.stderr[-3000:]
    return {"accuracy": [line["accuracy"] for line in lines[:-1]], **lines[-1]}


@pytest.fixture(scope="module")
def own_process(saved_clients: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """fastfed's rounds of every scenario, each in a process of its own (only when benchmarking)."""
    return {
        name: _rounds_in_a_process(
            [sys.executable, "-m", "benchmarks.fastfed_rounds", str(path), "--scenario", name, "--rounds", str(ROUNDS)],
            REPOSITORY,
        )
        for name, path in saved_clients.items()
    }


@pytest.fixture(scope="module")
def tff(saved_clients: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """TFF's rounds on every scenario's clients (only when benchmarking and TFF is configured)."""
    if TFF_PYTHON is None:
        return {}
    found = {}
    for name, path in saved_clients.items():
        kind, batch, learning_rate, compressed = SCENARIOS[name]
        command = [TFF_PYTHON, str(Path(__file__).with_name("tff_rounds.py")), str(path), "--model", kind,
                   "--batch", str(batch), "--lr", str(learning_rate), "--rounds", str(ROUNDS), "--shuffle"]  # fmt: skip
        if compressed:
            command.append("--compression")
        found[name] = _rounds_in_a_process(command, path.parent)  # TFF starts a worker: run outside the repository
    return found


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fedavg_round(
    benchmark: Any,
    name: str,
    tff: dict[str, dict[str, Any]],
    own_process: dict[str, dict[str, Any]],
    request: pytest.FixtureRequest,
) -> None:
    clients = _clients(name, request.config)
    process = _process(name)
    state = process.initialize()
    started = time.perf_counter()
    state, metrics = process.next(state, clients)
    first = time.perf_counter() - started
    history = {"state": state, "accuracy": [metrics["train_accuracy"]]}

    def one_round() -> dict[str, float]:
        history["state"], round_metrics = process.next(history["state"], clients)
        history["accuracy"].append(round_metrics["train_accuracy"])
        return round_metrics

    benchmark.group = f"fedavg round: {name}"
    benchmark.extra_info["label"] = "fastfed round"
    metrics = benchmark.pedantic(one_round, rounds=ROUNDS - 1, iterations=1)
    assert metrics["num_examples"] == sum(len(c[1]) for c in clients) and metrics["clients_failed"] == 0
    assert process.trainer.traces == 1
    if not benchmark.disabled:
        steady = benchmark.stats.stats.median
        benchmark.extra_info["first_round_ratio"] = first / steady
        alone = own_process[name]
        benchmark.extra_info["own process: median ms"] = alone["median_round_seconds"] * 1e3
        benchmark.extra_info["own process: first/steady"] = alone["first_round_seconds"] / alone["median_round_seconds"]
        assert np.abs(np.array(alone["accuracy"]) - history["accuracy"]).max() <= 0.015
        print(f"\n{name}: fastfed in its own process {alone['median_round_seconds']:.3f}s a round (first "
              f"{alone['first_round_seconds']:.3f}s), in the benchmark's {steady:.3f}s")  # fmt: skip
        if name in tff:
            benchmark.extra_info["vs TFF 0.87 (own processes)"] = (
                alone["median_round_seconds"] / tff[name]["median_round_seconds"]
            )
            difference = np.abs(np.array(alone["accuracy"][:ROUNDS]) - tff[name]["accuracy"][:ROUNDS])
            theirs, ours = tff[name]["median_round_seconds"], alone["median_round_seconds"]
            print(f"{name}: TFF median round {theirs:.3f}s, fastfed {ours:.3f}s ({theirs / ours:.2f}x faster); "
                  f"training accuracy differs by at most {difference.max():.4f}")  # fmt: skip
            assert difference.max() <= 0.015


@pytest.mark.parametrize("name", [name for name in SCENARIOS if "8-bit" not in name])
def test_plain_keras_per_step_loop(benchmark: Any, name: str, request: pytest.FixtureRequest) -> None:
    """What a user would write without fastfed: a compiled step per batch, weights averaged by NumPy."""
    kind, batch, learning_rate, _ = SCENARIOS[name]
    clients = _clients(name, request.config)
    model = fedavg_model_fn(kind)()
    loop = KerasLoop(model, keras.optimizers.SGD(learning_rate), keras.losses.SparseCategoricalCrossentropy(), batch)
    loop.round(clients, 0)  # traced outside the measurement
    benchmark.group = f"fedavg round: {name}"
    benchmark.extra_info["label"] = "plain Keras per-step loop"
    averaged = benchmark.pedantic(loop.round, args=(clients, 1), rounds=3, iterations=1)
    assert all(np.isfinite(w).all() for w in averaged)


@pytest.mark.parametrize("name", [name for name in SCENARIOS if "8-bit" not in name])
def test_compiled_epoch_floor(benchmark: Any, name: str, request: pytest.FixtureRequest) -> None:
    """Every example in one compiled call: the round's training without any federation."""
    clients = _clients(name, request.config)
    process = _process(name)
    weights = process.initialize().weights
    trainer = process.trainer
    x, y = trainer.prepare(0, np.concatenate([c[0] for c in clients]), np.concatenate([c[1] for c in clients]))
    benchmark.group = f"fedavg round: {name}"
    benchmark.extra_info["label"] = "compiled-epoch floor"
    result = benchmark.pedantic(
        lambda: trainer.train(weights, x, y, np.random.default_rng(0)), rounds=3, iterations=1, warmup_rounds=1
    )
    assert result.num_examples == len(x) and np.isfinite(result.loss_sum)
