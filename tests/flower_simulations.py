"""Flower simulations (Flower's own engine, on Ray) for tests/test_flower.py.

Run as ``python flower_simulations.py SCENARIO OUT.npz``: writes the global model after every round.
A subprocess per simulation isolates Ray, which Flower starts and shuts down per run, and bounds
each run with a timeout. Clients train softmax regression on shards of the bundled digits with NumPy
and carry an int64 step counter, the kind of tensor Flower's in-place averaging zeroes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

# Ray warns about GPU visibility defaults on every start; the tests run with warnings as errors.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# A private Ray instance per simulation, never a cluster that `ray start` left on this machine.
os.environ["RAY_ADDRESS"] = "local"

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerApp, ServerConfig
from flwr.server import strategy as legacy
from flwr.serverapp import Grid
from flwr.serverapp import strategy as message_api
from flwr.simulation import run_simulation

from fastfed.compression import UniformQuantizer
from fastfed.data import load_digits, partition_iid
from fastfed.integrations import flower as fast_legacy
from fastfed.integrations.flower import serverapp as fast_message

NUM_CLIENTS = 4
ROUNDS = 3
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
CODEC = UniformQuantizer(bits=8, min_size=0)
(X, Y), _ = load_digits(seed=0)
SHARDS = partition_iid(X, Y, NUM_CLIENTS, seed=0).all()


def initial_arrays() -> list[np.ndarray]:
    return [np.zeros((64, 10), np.float32), np.zeros(10, np.float32), np.array(0, np.int64)]


def local_train(arrays: list[np.ndarray], shard: int) -> tuple[list[np.ndarray], int]:
    """Ten full-batch gradient steps of softmax regression; the step counter advances by 10 + shard."""
    weights, bias, steps = (np.array(a) for a in arrays)
    x, y = SHARDS[shard]
    onehot = np.eye(10, dtype=np.float32)[y]
    for _ in range(10):
        logits = x @ weights + bias
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        error = (probabilities - onehot) / len(x)
        weights -= 0.5 * (x.T @ error)
        bias -= 0.5 * error.sum(axis=0)
    return [weights.astype(np.float32), bias.astype(np.float32), np.array(steps + 10 + shard, np.int64)], len(x)


class DigitsClient(NumPyClient):
    def __init__(self, shard: int) -> None:
        self.shard = shard

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        arrays, count = local_train(parameters, self.shard)
        return arrays, count, {}


class CompressedDigitsClient(Client):
    """Sends its update as one fastfed payload: 8-bit uniform quantization of the delta."""

    def __init__(self, shard: int) -> None:
        self.shard = shard

    def fit(self, ins: FitIns) -> FitRes:
        received = parameters_to_ndarrays(ins.parameters)
        arrays, count = local_train(received, self.shard)
        parameters = fast_legacy.compress_parameters(arrays, received, CODEC, seed=self.shard)
        return FitRes(Status(Code.OK, ""), parameters, count, {})


def run_legacy(strategy_class: type, client: Callable[[int], Client], **options: Any) -> list[list[np.ndarray]]:
    models: list[list[np.ndarray]] = []

    def record(server_round: int, arrays: list[np.ndarray], config: dict) -> None:
        if server_round > 0:
            models.append([np.array(a) for a in arrays])

    strategy = strategy_class(
        initial_parameters=ndarrays_to_parameters(initial_arrays()),
        min_fit_clients=NUM_CLIENTS, min_available_clients=NUM_CLIENTS, fraction_evaluate=0.0,
        evaluate_fn=record, **options,
    )  # fmt: skip
    server = ServerApp(config=ServerConfig(num_rounds=ROUNDS), strategy=strategy)
    client_app = ClientApp(client_fn=lambda context: client(int(context.node_config["partition-id"])))
    run_simulation(server, client_app, num_supernodes=NUM_CLIENTS, backend_config=BACKEND)
    return models


def message_client_app(compress: bool) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        received = message.content["arrays"]
        shard = int(context.node_config["partition-id"])
        arrays, count = local_train(received.to_numpy_ndarrays(), shard)
        record = ArrayRecord(arrays)
        if compress:
            record = fast_message.compress_arrays(record, received, CODEC, seed=shard)
        content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": count})})
        return Message(content=content, reply_to=message)

    return app


def run_message(strategy_class: type, compress: bool = False, **options: Any) -> list[list[np.ndarray]]:
    models: list[list[np.ndarray]] = []

    def record(server_round: int, arrays: ArrayRecord) -> None:
        if server_round > 0:
            models.append([np.array(a) for a in arrays.to_numpy_ndarrays()])

    strategy = strategy_class(
        fraction_evaluate=0.0, min_train_nodes=NUM_CLIENTS, min_available_nodes=NUM_CLIENTS, **options
    )
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_arrays()), num_rounds=ROUNDS, evaluate_fn=record)

    run_simulation(server, message_client_app(compress), num_supernodes=NUM_CLIENTS, backend_config=BACKEND)
    return models


def numpy_client(shard: int) -> Client:
    return DigitsClient(shard).to_client()


SCENARIOS: dict[str, Callable[[], list[list[np.ndarray]]]] = {
    "legacy-flower-fedavg": lambda: run_legacy(legacy.FedAvg, numpy_client),
    "legacy-flower-fedavg-inplace": lambda: run_legacy(legacy.FedAvg, numpy_client, inplace=True),
    "legacy-flower-fedadam": lambda: run_legacy(legacy.FedAdam, numpy_client, eta=0.05),
    "legacy-fast-fedavg": lambda: run_legacy(fast_legacy.FastFedAvg, numpy_client),
    "legacy-fast-fedadam": lambda: run_legacy(fast_legacy.FastFedAdam, numpy_client, eta=0.05),
    "legacy-fast-fedavg-compressed": lambda: run_legacy(fast_legacy.FastFedAvg, CompressedDigitsClient),
    "message-flower-fedavg": lambda: run_message(message_api.FedAvg),
    "message-flower-fedadam": lambda: run_message(message_api.FedAdam, eta=0.05),
    "message-fast-fedavg": lambda: run_message(fast_message.FastFedAvg),
    "message-fast-fedadam": lambda: run_message(fast_message.FastFedAdam, eta=0.05),
    "message-fast-fedavg-compressed": lambda: run_message(fast_message.FastFedAvg, compress=True),
}


def main() -> None:
    scenario, output = sys.argv[1], sys.argv[2]
    logging.getLogger("flwr").setLevel(logging.WARNING)
    models = SCENARIOS[scenario]()
    if len(models) != ROUNDS:
        raise SystemExit(f"{scenario}: recorded {len(models)} rounds, expected {ROUNDS}")
    np.savez(output, **{f"round{r}_{j}": array for r, model in enumerate(models) for j, array in enumerate(model)})


if __name__ == "__main__":
    main()
