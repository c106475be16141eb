"""The Ray executor on a real two-node Ray cluster on 127.0.0.1: equality with local execution,
actor failure mid-round, client timeouts."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

ray = pytest.importorskip("ray")
keras = pytest.importorskip("keras")

import fastfed
from fastfed import data, models
from fastfed.compression import UniformQuantizer
from fastfed.executors import RayExecutor

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ray(*arguments: str) -> None:
    completed = subprocess.run(["ray", *arguments], capture_output=True, text=True, timeout=180, check=False)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head node and a second node joining it, both on 127.0.0.1; stopped afterwards."""
    address = f"127.0.0.1:{_free_port()}"
    common = ("--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats")
    _ray("start", "--head", f"--port={address.split(':')[1]}", "--include-dashboard=false", *common)
    try:
        _ray("start", f"--address={address}", *common)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120, check=False)


def _clients(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    (x, y), _ = data.load_digits(seed=0)
    return data.partition_iid(x, y, count, seed=0).all()


def _process(executor: object = None, **options: object) -> fastfed.FedAvg:
    # Factories are partials of importable functions, so Ray workers can unpickle them.
    settings: dict[str, object] = {
        "client_optimizer": functools.partial(keras.optimizers.SGD, learning_rate=0.1),
        "batch_size": 20,
        "seed": 5,
        "clients_per_partial_sum": 3,
        "deterministic": True,
        "executor": executor,
    }
    settings.update(options)
    return fastfed.FedAvg(functools.partial(models.mlp, (64,), hidden=16), **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [None, 8])
def test_ray_rounds_equal_local_rounds_bit_for_bit(cluster: str, bits: int | None) -> None:
    clients = _clients(8)
    codec = UniformQuantizer(bits=bits, min_size=100) if bits else None
    runs = {}
    executor = RayExecutor(cluster, num_actors=2)
    for name, process in (("local", _process(aggregator=fastfed.mean(compression=codec))),
                          ("ray", _process(executor, aggregator=fastfed.mean(compression=codec)))):  # fmt: skip
        state = process.initialize()
        history = []
        for _ in range(3):
            state, metrics = process.next(state, clients)
            history.append((metrics["train_loss"], metrics["train_accuracy"], metrics["aggregate_bits"]))
        runs[name] = (state.weights, history)
    executor.shutdown()
    assert runs["ray"][1] == runs["local"][1]
    for ray_weights, local_weights in zip(runs["ray"][0], runs["local"][0]):
        np.testing.assert_array_equal(ray_weights, local_weights)


def test_killed_actor_fails_its_clients_and_is_replaced(cluster: str) -> None:
    clients = _clients(12)
    executor = RayExecutor(cluster, num_actors=2)
    process = _process(executor, local_epochs=100, clients_per_partial_sum=None)  # a round of seconds
    state, _ = process.next(process.initialize(), clients)  # warm up: actors built and traced
    victim = executor.actor_pids()[0]

    def kill_soon() -> None:
        time.sleep(0.5)  # well inside the round
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    state, metrics = process.next(state, clients)
    killer.join()
    assert metrics["clients_failed"] == 6  # actor 0's share: one group of 6 clients
    assert metrics["num_clients"] == 12 and metrics["num_examples"] > 0
    assert executor.actors_replaced == 1 and victim not in executor.actor_pids()
    state, metrics = process.next(state, clients)
    assert metrics["clients_failed"] == 0 and state.round == 3
    executor.shutdown()


def test_client_timeout_fails_the_share_and_keeps_the_state(cluster: str) -> None:
    clients = _clients(4)
    executor = RayExecutor(cluster, num_actors=2, client_timeout=1e-3)
    process = _process(executor)
    state = process.initialize()
    with pytest.raises(fastfed.RoundFailedError, match="0 of 4 client updates aggregated"):
        process.next(state, clients)
    assert state.round == 0 and executor.actors_replaced == 2
    assert all("client_timeout" in reason for _, reason in process.last_failures)
    executor.shutdown()
