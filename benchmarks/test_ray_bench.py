"""Local vs Ray execution: round time, driver peak memory and bytes moved per round.

Run: ``pytest benchmarks/test_ray_bench.py --benchmark-enable``. Ray runs 2 actors on this machine
(a private ``ray.init``), on the CNN scenario of the FedAvg benchmark (10 clients x 400 MNIST images,
batch 20), with and without 8-bit compression of uploads and broadcast; then 1,000 clients per
round of a small model, to show that the driver's memory does not grow with clients.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")
keras = pytest.importorskip("keras")

import fastfed
from fastfed import data, models
from fastfed.compression import UniformQuantizer
from fastfed.learning.executors import LocalExecutor, RayExecutor

from .conftest import peak_memory_bytes, timing

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Module-scoped fixtures build large workloads (or a Ray cluster) once: one xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("ray-bench")


MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def actors() -> Iterator[RayExecutor]:
    """A private Ray instance on this machine (never a cluster found by address) and two actors,
    shared by the module's benchmarks: each new configuration is rebuilt inside the same actors."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    executor = RayExecutor(num_actors=2)
    yield executor
    executor.shutdown()
    ray.shutdown()


def _cnn_process(executor: Any, bits: int | None) -> fastfed.FedAvg:
    codec = UniformQuantizer(bits=bits) if bits else None
    return fastfed.FedAvg(
        functools.partial(models.cnn, (28, 28)),
        client_optimizer=functools.partial(keras.optimizers.SGD, learning_rate=0.02),
        aggregator=fastfed.mean_aggregator(codec=codec),
        broadcast_codec=codec,
        batch_size=20,
        seed=0,
        executor=executor,
    )


@pytest.mark.skipif(not MNIST.exists(), reason="the real MNIST test set is not next to the repository")
@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("where", ["local", "ray (2 actors)"])
def test_cnn_round(
    benchmark: Any, actors: RayExecutor, where: str, bits: int | None, request: pytest.FixtureRequest
) -> None:
    x, y = data.load_mnist_idx(MNIST)
    # Untimed (CI): two clients of 100 images, one per actor; test_ray.py checks Ray rounds in full.
    count, size = (10, 400) if timing(request.config) else (2, 100)
    clients = [(x[size * k : size * (k + 1)], y[size * k : size * (k + 1)]) for k in range(count)]
    executor = LocalExecutor() if where == "local" else actors
    process = _cnn_process(executor, bits)
    holder = {"state": process.next(process.initialize(), clients)[0]}  # warm-up: actors built, step traced

    def one_round() -> dict[str, float]:
        holder["state"], metrics = process.next(holder["state"], clients)
        return metrics

    benchmark.group = "cnn round: local vs ray"
    benchmark.extra_info["label"] = f"{where}, {'uncompressed' if bits is None else f'{bits}-bit'}"
    metrics = benchmark.pedantic(one_round, rounds=3, iterations=1)
    assert metrics["num_examples"] == count * size and metrics["clients_failed"] == 0
    if not benchmark.disabled:  # a further round, measured for the table only
        benchmark.extra_info["peak_mib"] = peak_memory_bytes(one_round) / 2**20
    if isinstance(executor, RayExecutor):
        moved = executor.last_round_bytes
        benchmark.extra_info["to_actors_mib"] = moved["to_actors"] / 2**20
        benchmark.extra_info["from_actors_mib"] = moved["from_actors"] / 2**20
        print(f"\n{where} {bits}: to actors {moved['to_actors'] / 2**20:.1f} MiB, "
              f"from actors {moved['from_actors'] / 2**20:.1f} MiB per round")  # fmt: skip


def test_driver_memory_is_flat_in_clients_per_round(actors: RayExecutor) -> None:
    (x, y), _ = data.load_digits(seed=0)
    process = fastfed.FedAvg(
        functools.partial(models.mlp, (64,), hidden=256),
        client_optimizer=functools.partial(keras.optimizers.SGD, learning_rate=0.05),
        batch_size=10,
        seed=0,
        executor=actors,
    )
    state, _ = process.next(process.initialize(), data.partition_iid(x, y, 10).all())
    peaks = {}
    for count in (100, 1000):
        clients = data.partition_iid(np.tile(x, (2, 1)), np.tile(y, 2), count, seed=count).all()
        holder = {"state": state}

        def one_round(clients: list = clients, holder: dict = holder) -> None:
            holder["state"], metrics = process.next(holder["state"], clients)
            assert metrics["num_clients"] == len(clients) and metrics["clients_failed"] == 0

        peaks[count] = peak_memory_bytes(one_round)
        state = holder["state"]
    update = sum(w.nbytes for w in state.weights)
    print(f"\ndriver peak: 100 clients {peaks[100] / 2**20:.2f} MiB, 1000 clients {peaks[1000] / 2**20:.2f} MiB "
          f"(one update {update / 2**10:.0f} KiB)")  # fmt: skip
    # Two partial sums per round whatever the number of clients; holding every update would need 1000 x.
    assert peaks[1000] < peaks[100] + 50 * update
