"""fastfed inside Flower: the strategies' aggregation, called in-process on real Flower results.

Each round the tests train the clients of tests/flower_clients.py locally, wrap their arrays in
real ``FitRes`` (legacy API) or reply ``Message`` objects (Message API), and hand them to Flower's
strategy and to fastfed's. One subprocess runs a real simulation per API on Flower's own engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import strategy as legacy
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp import Grid
from flwr.serverapp import strategy as message_api

from fastfed.compression import RotatedQuantizer
from fastfed.integrations import flower as fast_legacy
from fastfed.integrations.flower import serverapp as fast_message
from flower_clients import CODEC, NUM_CLIENTS, ROUNDS, accuracy, initial_arrays, local_train

Model = list[np.ndarray]


class _Proxy(ClientProxy):
    """A registered client that never trains remotely: the tests train it in-process."""

    def get_properties(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def get_parameters(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def reconnect(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


def _client_manager() -> SimpleClientManager:
    manager = SimpleClientManager()
    for shard in range(NUM_CLIENTS):
        manager.register(_Proxy(str(shard)))
    return manager


def _fit_res(arrays: Model | Any, count: int) -> FitRes:
    parameters = arrays if not isinstance(arrays, list) else ndarrays_to_parameters(arrays)
    return FitRes(Status(Code.OK, ""), parameters, count, {})


def run_legacy(strategy: Any, compress: bool = False, codec: Any = CODEC) -> list[Model]:
    """Rounds of a legacy strategy: configure_fit, local training of every shard, aggregate_fit."""
    manager = _client_manager()
    parameters = ndarrays_to_parameters(initial_arrays())
    models = []
    for server_round in range(1, ROUNDS + 1):
        instructions = strategy.configure_fit(server_round, parameters, manager)
        received = parameters_to_ndarrays(instructions[0][1].parameters)
        results = []
        for proxy, fit_ins in instructions:
            shard = int(proxy.cid)
            arrays, count = local_train(received, shard)
            if compress:
                rotation = fit_ins.config[fast_legacy.ROTATION_SEED_KEY]
                arrays = fast_legacy.compress_parameters(arrays, received, codec, seed=shard, rotation_seed=rotation)
            results.append((proxy, _fit_res(arrays, count)))
        parameters, _ = strategy.aggregate_fit(server_round, results, [])
        models.append(parameters_to_ndarrays(parameters))
    return models


def reply(content: RecordDict, node: int, server_round: int = 1) -> Message:
    """A reply Message as a SuperLink delivers it to the ServerApp."""
    metadata = Metadata(
        run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"train-{node}",
        group_id=str(server_round), created_at=0.0, ttl=60.0, message_type="train",
    )  # fmt: skip
    return Message(content, metadata=metadata)


def _train_content(record: ArrayRecord, count: int) -> RecordDict:
    return RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": count})})


def run_message(strategy: Any, compress: bool = False, codec: Any = CODEC) -> list[Model]:
    """Rounds of a Message-API strategy: configure_train, local training, aggregate_train."""
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = list(range(1, NUM_CLIENTS + 1))
    arrays = ArrayRecord(initial_arrays())
    models = []
    for server_round in range(1, ROUNDS + 1):
        config = ConfigRecord()
        strategy.configure_train(server_round, arrays, config, grid)
        received = arrays.to_numpy_ndarrays()
        replies = []
        for shard in range(NUM_CLIENTS):
            trained, count = local_train(received, shard)
            record = ArrayRecord(trained)
            if compress:
                rotation = config[fast_message.ROTATION_SEED_KEY]
                record = fast_message.compress_arrays(record, arrays, codec, seed=shard, rotation_seed=rotation)
            replies.append(reply(_train_content(record, count), shard + 1, server_round))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        models.append(arrays.to_numpy_ndarrays())
    return models


@pytest.fixture(autouse=True)
def _message_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    """configure_train builds instruction Messages, which need the identity of a running ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


STRATEGIES: dict[str, tuple[Callable[[], Any], Callable[[], Any], Callable[..., list[Model]]]] = {
    "legacy-fedavg": (legacy.FedAvg, fast_legacy.FastFedAvg, run_legacy),
    "legacy-fedadam": (
        lambda: legacy.FedAdam(eta=0.05, initial_parameters=ndarrays_to_parameters(initial_arrays())),
        lambda: fast_legacy.FastFedAdam(eta=0.05, initial_parameters=ndarrays_to_parameters(initial_arrays())),
        run_legacy,
    ),
    "message-fedavg": (message_api.FedAvg, fast_message.FastFedAvg, run_message),
    "message-fedadam": (
        lambda: message_api.FedAdam(eta=0.05),
        lambda: fast_message.FastFedAdam(eta=0.05),
        run_message,
    ),
}


def assert_models_agree(actual: list[Model], expected: list[Model], rtol: float, atol: float) -> None:
    for round_actual, round_expected in zip(actual, expected, strict=True):
        for a, b in zip(round_actual[:2], round_expected[:2]):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_fastfed_strategies_match_flower_each_round(name: str) -> None:
    flower_strategy, fast_strategy, run = STRATEGIES[name]
    expected = run(flower_strategy())
    actual = run(fast_strategy())
    # Flower averages in float32, fastfed in float64: they differ by ~1e-7 relative. Adam divides the
    # mean delta by sqrt(v), which amplifies that difference for parameters whose delta is tiny.
    tolerance = (1e-4, 1e-5) if "adam" in name else (1e-5, 1e-6)
    assert_models_agree(actual, expected, *tolerance)
    assert accuracy(actual[-1]) > 0.75


@pytest.mark.parametrize("run", [run_legacy, run_message])
def test_integer_tensors_are_averaged_and_keep_their_dtype(run: Callable[..., list[Model]]) -> None:
    fast = run(fast_legacy.FastFedAvg() if run is run_legacy else fast_message.FastFedAvg())
    # Round 1: counters 10, 11, 12, 13 over near-equal shards average to 11.5 -> rounds to 11 or 12.
    counters = [model[2] for model in fast]
    assert all(counter.dtype == np.int64 for counter in counters)
    assert 11 <= counters[0] <= 12 and list(counters) == sorted(counters)


def test_flower_inplace_zeroes_the_integer_tensor_fastfed_averages() -> None:
    flower = run_legacy(legacy.FedAvg(inplace=True))
    fast = run_legacy(fast_legacy.FastFedAvg())
    assert flower[0][2] == 0  # fractional weights cast to int64: every client's counter times 0
    assert fast[0][2] >= 11


@pytest.mark.parametrize("codec", [CODEC, RotatedQuantizer(4, shared_rotation=True, min_size=0)])
@pytest.mark.parametrize("run", [run_legacy, run_message])
def test_compressed_updates_converge_within_a_point_of_uncompressed(
    run: Callable[..., list[Model]], codec: Any
) -> None:
    # Shared rotation: the strategies send each round's rotation in the fit/train config.
    strategy = fast_legacy.FastFedAvg if run is run_legacy else fast_message.FastFedAvg
    plain = run(strategy())
    compressed = run(strategy(), compress=True, codec=codec)
    assert abs(accuracy(compressed[-1]) - accuracy(plain[-1])) <= 0.01
    assert compressed[-1][2].dtype == np.int64 and compressed[-1][2] == plain[-1][2]


def test_simulations_run_on_flowers_engine(tmp_path: Path) -> None:
    """One real simulation per API (Flower's own engine on Ray), with compressed client updates."""
    pytest.importorskip("ray")
    scenarios = ["legacy-fast-fedavg-compressed", "message-fast-fedavg-compressed"]
    # Flower's Ray workers import TensorFlow whenever it is installed (seconds each); these clients
    # train with NumPy, so the simulation hides it from the workers.
    hidden = tmp_path / "hidden" / "tensorflow"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ModuleNotFoundError("hidden by the test", name="tensorflow")\n')
    python_path = os.pathsep.join(filter(None, [str(hidden.parent), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "PYTHONPATH": python_path}
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("flower_simulations.py")), str(tmp_path), *scenarios],
        capture_output=True, text=True, timeout=300, env=environment, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    for scenario in scenarios:
        with np.load(tmp_path / f"{scenario}.npz") as saved:
            final = [saved[f"round{ROUNDS - 1}_{j}"] for j in range(3)]
        assert accuracy(final) > 0.75, scenario
        assert final[2].dtype == np.int64 and final[2] >= 3 * 11


# Units ------------------------------------------------------------------------------------------


def test_npy_views_are_zero_copy_and_refuse_pickled_objects() -> None:
    import io

    from fastfed.integrations.flower._averaging import npy_view

    for array in (np.arange(12, dtype=np.float32).reshape(3, 4), np.asfortranarray(np.ones((2, 3))), np.array(7)):
        view = npy_view(_npy(array))
        np.testing.assert_array_equal(view, array)
        assert not view.flags.writeable
    data = _npy(np.arange(5.0))
    assert np.shares_memory(npy_view(data), np.frombuffer(data, np.uint8))
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays are refused"):
        npy_view(buffer.getvalue())
    with pytest.raises(ValueError, match="not a .npy array"):
        npy_view(b"\x93NUMPX garbage")
    with pytest.raises(ValueError, match="expected 48"):
        npy_view(_npy(np.zeros(12, np.float32))[:-2])


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_mixed_compressed_and_plain_results_in_one_round() -> None:
    from fastfed.compression import UniformQuantizer

    rng = np.random.default_rng(0)
    global_weights = [rng.standard_normal((20, 30)).astype(np.float32), np.array(5, np.int64)]
    updated = [[g + rng.standard_normal(g.shape).astype(g.dtype) * 0.01 if g.ndim else g + k for g in global_weights]
               for k in range(4)]  # fmt: skip
    codec = UniformQuantizer(bits=16, min_size=0)
    parameters = [
        fast_legacy.compress_parameters(updated[0], global_weights, codec, seed=0),
        ndarrays_to_parameters(updated[1]),
        fast_legacy.compress_parameters(updated[2], global_weights, codec, seed=2),
        ndarrays_to_parameters(updated[3]),
    ]
    results = [(None, _fit_res(p, n)) for p, n in zip(parameters, [10, 20, 30, 40])]
    strategy = fast_legacy.FastFedAvg()
    with pytest.raises(ValueError, match="need the round's global weights"):
        strategy.aggregate_fit(1, results, [])
    strategy.configure_fit(1, ndarrays_to_parameters(global_weights), _client_manager())
    aggregated, _ = strategy.aggregate_fit(1, results, [])
    mean = parameters_to_ndarrays(aggregated)
    expected = [sum(n * u[j].astype(np.float64) for n, u in zip([10, 20, 30, 40], updated)) / 100 for j in range(2)]
    np.testing.assert_allclose(mean[0], expected[0], atol=1e-5)
    assert mean[1].dtype == np.int64 and mean[1] == np.rint(expected[1])


def test_compressed_scalar_tensors_come_back_as_arrays() -> None:
    from fastfed.compression import UniformQuantizer
    from fastfed.integrations.flower._averaging import average_results, encode_delta

    global_weights = [np.ones(3, np.float32), np.array(4, np.int64)]
    updated = [np.full(3, 2.0, np.float32), np.array(6, np.int64)]
    payload = encode_delta(updated, global_weights, UniformQuantizer(bits=8, min_size=0), seed=0)
    mean = average_results([], [(payload, 1.0)], global_weights)
    assert all(isinstance(array, np.ndarray) for array in mean)
    assert mean[1].shape == () and mean[1].dtype == np.int64 and mean[1] == 6
