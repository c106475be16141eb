"""Flower simulations (Flower's own engine, on Ray) for tests/test_flower.py's smoke test.

Run as ``python flower_simulations.py OUT_DIR SCENARIO [SCENARIO ...]``: writes the global model
after every round of each scenario to ``OUT_DIR/SCENARIO.npz``. One subprocess isolates Ray, which
Flower starts and shuts down per run, and bounds the runs with a timeout. The clients are those of
tests/flower_clients.py.
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
from flwr.client import Client, ClientApp
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerApp, ServerConfig
from flwr.serverapp import Grid
from flwr.simulation import run_simulation

from fastfed.integrations import flower as fast_legacy
from fastfed.integrations.flower import serverapp as fast_message
from flower_clients import CODEC, NUM_CLIENTS, ROUNDS, initial_arrays, local_train

BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}


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


SCENARIOS: dict[str, Callable[[], list[list[np.ndarray]]]] = {
    "legacy-fast-fedavg-compressed": lambda: run_legacy(fast_legacy.FastFedAvg, CompressedDigitsClient),
    "message-fast-fedavg-compressed": lambda: run_message(fast_message.FastFedAvg, compress=True),
}


def main() -> None:
    output, scenarios = sys.argv[1], sys.argv[2:]
    logging.getLogger("flwr").setLevel(logging.WARNING)
    for scenario in scenarios:
        models = SCENARIOS[scenario]()
        if len(models) != ROUNDS:
            raise SystemExit(f"{scenario}: recorded {len(models)} rounds, expected {ROUNDS}")
        arrays = {f"round{r}_{j}": array for r, model in enumerate(models) for j, array in enumerate(model)}
        np.savez(os.path.join(output, f"{scenario}.npz"), **arrays)


if __name__ == "__main__":
    main()
