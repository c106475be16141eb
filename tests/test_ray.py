"""The Ray executor on a real two-node Ray cluster on 127.0.0.1: equality with local execution,
actor failure mid-round, client timeouts."""

from __future__ import annotations

import functools
import os
import signal
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


# Module-scoped fixtures build large workloads (or a Ray cluster) once: one xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("ray-cluster")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head node and a second node joining it, both on this machine, started with Ray's own
    multi-node test utility from this interpreter's environment; only they are stopped afterwards."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        yield nodes.address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def executor(cluster: str) -> Iterator[RayExecutor]:
    """One pool of two TensorFlow actors shared by the module's tests (building them takes seconds)."""
    pool = RayExecutor(cluster, num_actors=2)
    yield pool
    pool.shutdown()


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
def test_ray_rounds_equal_local_rounds_bit_for_bit(executor: RayExecutor, bits: int | None) -> None:
    clients = _clients(8)
    codec = UniformQuantizer(bits=bits, min_size=100) if bits else None
    runs = {}
    for name, process in (("local", _process(aggregator=fastfed.mean_aggregator(codec=codec))),
                          ("ray", _process(executor, aggregator=fastfed.mean_aggregator(codec=codec)))):  # fmt: skip
        state = process.initialize()
        history = []
        for _ in range(3):
            state, metrics = process.next(state, clients)
            history.append((metrics["train_loss"], metrics["train_accuracy"], metrics["aggregate_bits"]))
        runs[name] = (state.weights, history)
    assert runs["ray"][1] == runs["local"][1]
    for ray_weights, local_weights in zip(runs["ray"][0], runs["local"][0]):
        np.testing.assert_array_equal(ray_weights, local_weights)


def test_killed_actor_fails_its_clients_and_is_replaced(executor: RayExecutor) -> None:
    clients = _clients(12)
    replaced = executor.actors_replaced
    process = _process(executor, clients_per_partial_sum=None)
    state, _ = process.next(process.initialize(), clients)  # the actors are built and have trained
    victim = executor.actor_pids()[0]
    os.kill(victim, signal.SIGKILL)  # the actor dies between rounds; its next task fails
    _wait_until_gone(victim)
    state, metrics = process.next(state, clients)
    assert metrics["clients_failed"] == 6  # actor 0's share: one group of 6 clients
    assert metrics["num_clients"] == 12 and metrics["num_examples"] > 0
    assert all("actor died" in reason for _, reason in process.last_failures)
    assert executor.actors_replaced == replaced + 1 and victim not in executor.actor_pids()
    state, metrics = process.next(state, clients)
    assert metrics["clients_failed"] == 0 and state.round == 3


def _wait_until_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid):
        assert time.monotonic() < deadline, f"process {pid} survived SIGKILL"
        time.sleep(0.01)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as status:
            return status.read().lower()
    except FileNotFoundError:
        return "zombie"


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
