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

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
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

    from fastfed._npy import npy_view

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
    from fastfed.integrations.flower._averaging import ClientUpdate, aggregate_updates, encode_delta

    global_weights = [np.ones(3, np.float32), np.array(4, np.int64)]
    updated = [np.full(3, 2.0, np.float32), np.array(6, np.int64)]
    payload = encode_delta(updated, global_weights, UniformQuantizer(bits=8, min_size=0), seed=0)
    mean = aggregate_updates([ClientUpdate(None, payload, 1.0)], global_weights, None, "skip").layers
    assert mean is not None and all(isinstance(array, np.ndarray) for array in mean)
    assert mean[1].shape == () and mean[1].dtype == np.int64 and mean[1] == 6


@pytest.mark.parametrize("robust", [False, True])
def test_compressed_deltas_come_back_exactly_at_the_dtypes_limits(robust: bool) -> None:
    # Integer deltas in their own dtype wrapped around (0 - 5 as uint8 came back as 255), and float16
    # ones overflowed (60000 - (-60000)); quantized float16 weights at 65504 could come back infinite.
    from fastfed.aggregation.robust import screened_median
    from fastfed.compression import UniformQuantizer
    from fastfed.integrations.flower._averaging import ClientUpdate, aggregate_updates, encode_delta

    received = [np.array([5, 200], np.uint8), np.array([100, -100], np.int8), np.array([3, 2**62], np.int64),
                np.array([-6e4, 6e4], np.float16), np.full(4096, 65504, np.float16)]  # fmt: skip
    rng = np.random.default_rng(0)
    updated = [
        [np.array([0, 250], np.uint8), np.array([-100, 100], np.int8), np.array([-(2**62), 7], np.int64),
         np.array([6e4, -6e4], np.float16), (65504 - 100 * rng.random(4096)).astype(np.float16)]
        for _ in range(3)
    ]  # fmt: skip
    codec = UniformQuantizer(bits=2, min_size=100)
    updates = [ClientUpdate(None, encode_delta(u, received, codec, seed=k), 1.0) for k, u in enumerate(updated)]
    aggregate = (lambda clients, weights, policy: screened_median(clients, policy)) if robust else None
    result = aggregate_updates(updates, received, aggregate, "skip")
    assert result.dropped == {} and result.layers is not None
    for layer, expected in zip(result.layers[:4], updated[0][:4]):
        assert layer.dtype == expected.dtype
        np.testing.assert_array_equal(layer, expected)
    assert np.isfinite(result.layers[4]).all() and float(result.layers[4].max()) <= 65504
    with pytest.raises(ValueError, match="layer 0: the update differs from the received weights by more than int64"):
        encode_delta([np.array([2**63 - 1])], [np.array([-(2**63)])], codec, seed=0)


def test_a_round_whose_every_client_holds_nan_aggregates_to_nothing() -> None:
    # Every client dropped under non_finite="skip": no aggregate, each counted, not an exception.
    for strategy in (fast_legacy.FastFedAvg(), fast_legacy.FastFedMedian(), fast_legacy.FastFedTrimmedAvg()):
        strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(3, np.float32)]), _client_manager())
        bad = ndarrays_to_parameters([np.array([np.nan, 1, 2], np.float32)])
        results = [(None, _fit_res(bad, 1)), (None, _fit_res(bad, 2))]
        aggregated, _ = strategy.aggregate_fit(1, results, [])
        assert aggregated is None


# Flower semantics kept, hostile results dropped ----------------------------------------------------

GLOBAL = [np.zeros((2, 3), np.float32), np.zeros(3, np.float32), np.array(0, np.int64)]


def _client(k: int) -> Model:
    return [np.full((2, 3), k, np.float32), np.full(3, 10.0 * k, np.float32), np.array(k, np.int64)]


def _legacy_results(models: list[Any], counts: list[int] | None = None) -> list[tuple[ClientProxy, FitRes]]:
    counts = counts or [10] * len(models)
    return [(_Proxy(str(k)), _fit_res(model, n)) for k, (model, n) in enumerate(zip(models, counts))]


def _configured_legacy(strategy: Any) -> Any:
    strategy.configure_fit(1, ndarrays_to_parameters(GLOBAL), _client_manager())
    return strategy


def _dropped_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if "as a failure" in record.getMessage()]


def test_message_api_matches_arrays_by_key_as_flower_does() -> None:
    def replies() -> list[Message]:
        first = ArrayRecord({"w": Array(np.zeros(2)), "b": Array(np.full(2, 100.0))})
        second = ArrayRecord({"b": Array(np.full(2, 100.0)), "w": Array(np.zeros(2))})  # same arrays, other order
        return [reply(_train_content(record, 5), node + 1) for node, record in enumerate([first, second])]

    flower, _ = message_api.FedAvg().aggregate_train(1, replies())
    for configured in (False, True):
        strategy = fast_message.FastFedAvg()
        if configured:  # the round's arrays, in yet another order
            record = ArrayRecord({"b": Array(np.zeros(2)), "w": Array(np.zeros(2))})
            strategy.configure_train(1, record, ConfigRecord(), Mock(spec=Grid, get_node_ids=lambda: [1, 2]))
        arrays, _ = strategy.aggregate_train(1, replies())
        assert list(arrays.keys()) == list(flower.keys()) == ["w", "b"]
        np.testing.assert_array_equal(arrays["w"].numpy(), flower["w"].numpy())  # 0, not 50
        np.testing.assert_array_equal(arrays["b"].numpy(), np.full(2, 100.0))
    other_keys = replies()
    other_keys[1] = reply(_train_content(ArrayRecord({"w": Array(np.zeros(2)), "c": Array(np.ones(2))}), 5), 2)
    from flwr.serverapp.exception import InconsistentMessageReplies

    with pytest.raises(InconsistentMessageReplies, match="must have the same keys"):
        fast_message.FastFedAvg().aggregate_train(1, other_keys)


class _FastFaultTolerant(fast_legacy.FastAggregationMixin, legacy.FaultTolerantFedAvg):
    pass


@pytest.mark.parametrize(("succeeded", "failed"), [(3, 2), (2, 3), (1, 1), (5, 0)])
def test_fault_tolerant_fedavg_counts_as_flower_does(succeeded: int, failed: int) -> None:
    models = [_client(k) for k in range(succeeded)]
    failures: list[Any] = [RuntimeError("lost")] * failed
    flower, _ = legacy.FaultTolerantFedAvg(min_completion_rate_fit=0.5).aggregate_fit(
        1, _legacy_results(models), failures
    )
    fast, _ = _FastFaultTolerant(min_completion_rate_fit=0.5).aggregate_fit(1, _legacy_results(models), failures)
    assert (fast is None) == (flower is None) == (succeeded / (succeeded + failed) < 0.5)
    if flower is not None:
        for got, want in zip(parameters_to_ndarrays(fast)[:2], parameters_to_ndarrays(flower)[:2]):
            np.testing.assert_allclose(got, want, rtol=1e-6)


def test_dropped_results_count_toward_the_completion_rate() -> None:
    models = [_client(k) for k in range(3)]
    models[2][0][0, 0] = np.nan  # 2 of 3 results usable, plus 2 failures: 2 / 5 < 0.5
    strategy = _configured_legacy(_FastFaultTolerant(min_completion_rate_fit=0.5))
    assert strategy.aggregate_fit(1, _legacy_results(models), [RuntimeError("lost")] * 2) == (None, {})


ROBUST_LEGACY = [legacy.FedMedian, legacy.FedTrimmedAvg, legacy.Krum, legacy.Bulyan, legacy.QFedAvg]
ROBUST_MESSAGE = [
    message_api.FedMedian,
    message_api.FedTrimmedAvg,
    message_api.Krum,
    message_api.MultiKrum,
    message_api.Bulyan,
    message_api.QFedAvg,
]


@pytest.mark.parametrize(
    ("mixin", "parent"),
    [(fast_legacy.FastAggregationMixin, p) for p in ROBUST_LEGACY]
    + [(fast_message.FastAggregationMixin, p) for p in ROBUST_MESSAGE],
)
def test_mixin_refuses_strategies_that_do_not_average(mixin: type, parent: type) -> None:
    with pytest.raises(TypeError, match=f"{parent.__name__}.aggregate_.* aggregates otherwise.*FastFedMedian"):
        type("Mixed", (mixin, parent), {})
    user_subclass = type("MyStrategy", (parent,), {})  # a user's subclass of one is refused too
    with pytest.raises(TypeError, match=f"{parent.__name__}.aggregate_"):
        type("Mixed", (mixin, user_subclass), {})


def test_mixin_still_mixes_into_weighted_means_and_users_own_subclasses() -> None:
    class MyFedAvg(legacy.FedAvg):
        def aggregate_fit(self, *args: Any, **kwargs: Any) -> Any:  # a user's own hand-off stays theirs
            return super().aggregate_fit(*args, **kwargs)

    for parent in (MyFedAvg, legacy.FedProx, legacy.FaultTolerantFedAvg, legacy.FedAvgM):
        type("Mixed", (fast_legacy.FastAggregationMixin, parent), {})
    for parent in (message_api.FedProx, message_api.FedAvgM, message_api.FedYogi):
        type("Mixed", (fast_message.FastAggregationMixin, parent), {})
    with pytest.raises(TypeError, match="goes in front of a FedAvg-family strategy"):
        type("Mixed", (fast_legacy.FastAggregationMixin, legacy.DPFedAvgFixed), {})


ROBUST_STRATEGIES = {
    "legacy-median": (legacy.FedMedian, fast_legacy.FastFedMedian, run_legacy),
    "legacy-trimmed": (
        lambda: legacy.FedTrimmedAvg(beta=0.25),
        lambda: fast_legacy.FastFedTrimmedAvg(beta=0.25),
        run_legacy,
    ),
    "message-median": (message_api.FedMedian, fast_message.FastFedMedian, run_message),
    "message-trimmed": (
        lambda: message_api.FedTrimmedAvg(beta=0.25),
        lambda: fast_message.FastFedTrimmedAvg(beta=0.25),
        run_message,
    ),
}


@pytest.mark.parametrize("name", list(ROBUST_STRATEGIES))
def test_fast_robust_strategies_match_flower_each_round(name: str) -> None:
    flower_strategy, fast_strategy, run = ROBUST_STRATEGIES[name]
    expected = run(flower_strategy())
    actual = run(fast_strategy())
    if "median" in name:  # the same values selected: equal, bit for bit
        for round_actual, round_expected in zip(actual, expected, strict=True):
            for a, b in zip(round_actual[:2], round_expected[:2]):
                np.testing.assert_array_equal(a, b)
    else:  # Flower sums in float32, fastfed in float64
        assert_models_agree(actual, expected, 1e-5, 1e-6)
    assert all(model[2].dtype == np.int64 for model in actual)  # Flower's median makes it float64


def _message_replies(models: list[Model], names: tuple[str, ...] = ("w", "b", "steps")) -> list[Message]:
    return [
        reply(_train_content(ArrayRecord(dict(zip(names, map(Array, model)))), 10), node + 1)
        for node, model in enumerate(models)
    ]


def _configured_message(strategy: Any, names: tuple[str, ...] = ("w", "b", "steps")) -> Any:
    record = ArrayRecord(dict(zip(names, map(Array, GLOBAL))))
    strategy.configure_train(1, record, ConfigRecord(), Mock(spec=Grid, get_node_ids=lambda: [1, 2, 3, 4]))
    return strategy


def test_compressed_updates_that_do_not_match_the_model_are_dropped_as_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fastfed.compression import UniformQuantizer, encode

    codec = UniformQuantizer(bits=8, min_size=0)
    good = [fast_legacy.compress_parameters(_client(k), GLOBAL, codec, seed=k) for k in (1, 2)]
    broken_payload = bytearray(good[0].tensors[0])
    broken_payload[-10] ^= 0xFF
    hostile = [
        Parameters([encode(_client(3)[:2], codec, seed=0)], fast_legacy.TENSOR_TYPE),  # fewer layers
        Parameters([encode([np.array(1.0, np.float32), *_client(3)[1:]], codec, seed=0)], fast_legacy.TENSOR_TYPE),
        Parameters([encode([np.ones((1, 3), np.float32), *_client(3)[1:]], codec, seed=0)], fast_legacy.TENSOR_TYPE),
        Parameters([], fast_legacy.TENSOR_TYPE),  # no payload
        Parameters([bytes(broken_payload)], fast_legacy.TENSOR_TYPE),  # checksum mismatch
        Parameters([b"not a payload"], fast_legacy.TENSOR_TYPE),
    ]
    results = _legacy_results([*good, *hostile])
    strategy = _configured_legacy(fast_legacy.FastFedAvg())
    with caplog.at_level("WARNING", logger="flwr"):
        aggregated, _ = strategy.aggregate_fit(1, results, [])
    lines = _dropped_lines(caplog)
    assert len(lines) == len(hostile)  # one line per dropped client, naming it
    assert "client 2 as a failure: 2 layers, but the model has 3" in lines[0]
    assert "layer 0 has shape (), but the model's is (2, 3)" in lines[1]
    assert "layer 0 has shape (1, 3), but the model's is (2, 3)" in lines[2]
    assert "one fastfed payload, got 0 tensors" in lines[3]
    assert "checksum mismatch" in lines[4] and "shorter than the 24-byte minimum" in lines[5]
    mean = parameters_to_ndarrays(aggregated)
    np.testing.assert_allclose(mean[0], np.full((2, 3), 1.5), atol=0.01)  # clients 1 and 2 only
    assert mean[2].dtype == np.int64 and mean[2] == 2  # 1.5, half to even
    # With accept_failures=False, a dropped client fails the round as Flower's failures do.
    strict = _configured_legacy(fast_legacy.FastFedAvg(accept_failures=False))
    assert strict.aggregate_fit(1, results, []) == (None, {})


def test_message_api_mixes_compressed_and_plain_replies() -> None:
    from fastfed.compression import UniformQuantizer

    codec = UniformQuantizer(bits=16, min_size=0)
    models = [_client(k) for k in range(1, 5)]
    names = ("w", "b", "steps")
    received = ArrayRecord(dict(zip(names, map(Array, GLOBAL))))
    replies = _message_replies(models)
    for k in (0, 2):
        record = fast_message.compress_arrays(ArrayRecord(dict(zip(names, map(Array, models[k])))), received, codec)
        replies[k] = reply(_train_content(record, 10), k + 1)
    with pytest.raises(Exception, match="same keys"):  # Flower's own reply check refuses the mix
        message_api.FedAvg().aggregate_train(1, replies)
    arrays, _ = _configured_message(fast_message.FastFedAvg()).aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 2.5), atol=1e-4)
    assert arrays["steps"].numpy().dtype == np.int64 and arrays["steps"].numpy() == 2  # 2.5, half to even
    assert list(arrays.keys()) == list(names)


def test_mocked_replies_work_and_the_round_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    def mock_reply(model: Model) -> Any:  # Flower's own test style for strategies
        message = Mock(spec=Message)
        message.content = _train_content(ArrayRecord(dict(zip(("w", "b", "steps"), map(Array, model)))), 10)
        message.has_error.side_effect = lambda: False
        message.has_content.side_effect = lambda: True
        return message

    models = [_client(k) for k in range(4)]
    with caplog.at_level("INFO", logger="flwr"):
        for strategy in (fast_message.FastFedAvg(), fast_message.FastFedAdam(), fast_message.FastFedMedian()):
            arrays, _ = _configured_message(strategy).aggregate_train(1, [mock_reply(m) for m in models])
            assert arrays is not None and arrays["w"].numpy().shape == (2, 3)
    received = [r.getMessage() for r in caplog.records if "Received" in r.getMessage()]
    assert received == ["aggregate_train: Received 4 results and 0 failures"] * 3


@pytest.mark.parametrize("api", ["legacy", "message"])
def test_non_finite_clients_are_dropped_as_failures_by_default(api: str, caplog: pytest.LogCaptureFixture) -> None:
    models = [_client(k) for k in range(4)]
    models[1][1][2] = np.inf
    models[3][0][1, 1] = np.nan
    if api == "legacy":
        run = lambda s: parameters_to_ndarrays(_configured_legacy(s).aggregate_fit(1, _legacy_results(models), [])[0])  # noqa: E731
        strategies = [fast_legacy.FastFedAvg, fast_legacy.FastFedMedian, fast_legacy.FastFedAdam]
    else:
        run = lambda s: _configured_message(s).aggregate_train(1, _message_replies(models))[0].to_numpy_ndarrays()  # noqa: E731
        strategies = [fast_message.FastFedAvg, fast_message.FastFedMedian, fast_message.FastFedAdam]
    with caplog.at_level("WARNING", logger="flwr"):
        mean = run(strategies[0]())
        median = run(strategies[1]())
    lines = _dropped_lines(caplog)
    assert len(lines) == 4 and all("holds NaN or infinity" in line for line in lines)
    np.testing.assert_array_equal(mean[0], np.ones((2, 3)))  # clients 0 and 2
    np.testing.assert_array_equal(median[1], np.full(3, 10.0))
    initial = {"initial_parameters": ndarrays_to_parameters(GLOBAL)} if api == "legacy" else {}
    assert np.isfinite(run(strategies[2](**initial))[0]).all()
    propagating = strategies[0]()
    propagating.non_finite = "propagate"
    assert np.isnan(run(propagating)[0]).any()
    if api == "legacy":
        strict = _configured_legacy(fast_legacy.FastFedAvg(accept_failures=False))
        assert strict.aggregate_fit(1, _legacy_results(models), []) == (None, {})
