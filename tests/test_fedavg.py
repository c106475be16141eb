"""FedAvg over Keras: TFF parity, determinism, no retracing, compression, faulty updates, the CLI."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import fastfed
from fastfed import data, models, optimizers
from fastfed.compression import RotatedQuantizer, UniformQuantizer
from fastfed.executors import LocalExecutor
from fastfed.learning.client import ClientTrainer

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
TFF_TRAIN_ACCURACY = [0.911, 0.925, 0.944, 0.955, 0.962, 0.967]  # TFF 0.87, same data and settings


def _digits_clients(count: int = 5) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    (x, y), test = data.load_digits(seed=0)
    return data.partition_iid(x, y, count, seed=0).all(), test


def _process(**options: object) -> fastfed.FedAvg:
    settings: dict[str, object] = {
        "client_optimizer": lambda: keras.optimizers.SGD(learning_rate=0.1),
        "batch_size": 20,
        "seed": 3,
    }
    settings.update(options)
    model_fn = settings.pop("model_fn", lambda: models.mlp((64,), hidden=32))
    return fastfed.FedAvg(model_fn, **settings)  # type: ignore[arg-type]


@pytest.mark.skipif(not MNIST.exists(), reason="the real MNIST test set is not next to the repository")
def test_mnist_by_digit_matches_tff_training_accuracy() -> None:
    # Prepare: client d holds the first 1,000 test images of digit d, flattened, pixels / 255.
    x, y = data.load_mnist_idx(MNIST)
    clients = data.partition_by_label(x.reshape(len(x), 784), y, per_client=1000).all()
    process = fastfed.FedAvg(
        lambda: models.mlp((784,), hidden=512),
        client_optimizer=lambda: keras.optimizers.SGD(learning_rate=0.1),
        server_optimizer=optimizers.SGD(learning_rate=1.0),
        batch_size=100,
        local_epochs=1,
        seed=0,
    )
    state = process.initialize()
    # Execute
    accuracies = []
    for _ in range(6):
        state, metrics = process.next(state, clients)
        accuracies.append(metrics["train_accuracy"])
        # The test set has fewer than 1,000 images of some digits (892 fives), as in TFF's run on it.
        assert metrics["num_examples"] == sum(len(c[1]) for c in clients) == 9786
        assert metrics["num_batches"] == sum(-(-len(c[1]) // 100) for c in clients)
    # Assert: within 1.5 points of TFF each round.
    assert np.max(np.abs(np.array(accuracies) - TFF_TRAIN_ACCURACY)) <= 0.015, accuracies


def test_rounds_are_deterministic_and_never_retrace() -> None:
    clients, _ = _digits_clients()
    runs = []
    for _ in range(2):
        process = _process()
        state = process.initialize()
        for _ in range(3):
            state, metrics = process.next(state, clients)
        runs.append((state.weights, metrics))
        assert process.trainer.traces == 1
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(a, b)
    assert runs[0][1]["train_loss"] == runs[1][1]["train_loss"]


@functools.cache
def _one_model() -> Any:
    return models.mlp((64,), hidden=32)


def _dropout_mlp() -> Any:
    layers = keras.layers
    return keras.Sequential([keras.Input((64,)), layers.Dense(32, "relu"), layers.Dropout(0.3), layers.Dense(10)])


@pytest.mark.parametrize("model_fn", [lambda: models.mlp((64,), hidden=32), _dropout_mlp], ids=["mlp", "dropout"])
def test_clients_trained_side_by_side_give_the_same_bits(model_fn: Any) -> None:
    # Uneven clients, so that threads finish out of order; dropout draws from each client's own seed.
    (x, y), _ = data.load_digits(seed=0)
    clients = [(x[a:b], y[a:b]) for a, b in [(0, 30), (30, 200), (200, 230), (230, 500), (500, 520), (520, 700)]]
    runs = []
    for threads in (1, 3):
        process = _process(model_fn=model_fn, executor=LocalExecutor(threads=threads))
        state = process.initialize()
        for _ in range(2):
            state, metrics = process.next(state, clients)
        runs.append((state.weights, metrics))
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(a, b)
    for key in ("train_loss", "train_accuracy", "num_examples"):
        assert runs[0][1][key] == runs[1][1][key]


def test_a_dropout_clients_update_does_not_depend_on_the_clients_before_it() -> None:
    (x, y), _ = data.load_digits(seed=0)
    clients = [(x[:100], y[:100]), (x[100:200], y[100:200])]
    trainer = ClientTrainer(_dropout_mlp, lambda: keras.optimizers.SGD(learning_rate=0.1), None, 20, 1)
    weights = [np.array(w) for w in trainer.model.get_weights()]
    prepared = [trainer.prepare(i, *client) for i, client in enumerate(clients)]
    alone = trainer.train(weights, *prepared[1], np.random.default_rng(7)).weights
    trainer.train(weights, *prepared[0], np.random.default_rng(8))
    after_another = trainer.train(weights, *prepared[1], np.random.default_rng(7)).weights
    for a, b in zip(alone, after_another):
        np.testing.assert_array_equal(a, b)


def test_a_sibling_runs_the_leaders_traced_loop_on_its_own_variables() -> None:
    (x, y), _ = data.load_digits(seed=0)
    leader = ClientTrainer(_dropout_mlp, lambda: keras.optimizers.SGD(learning_rate=0.1), None, 20, 1)
    weights = [np.array(w) for w in leader.model.get_weights()]
    client = leader.prepare(0, x[:100], y[:100])
    leader.ready()
    sibling = leader.sibling()
    assert sibling is not None
    sibling.ready()
    assert (leader.traces, sibling.traces) == (1, 0)  # one trace for both
    by_leader = leader.train(weights, *client, np.random.default_rng(7)).weights
    leader_after = [np.array(w) for w in leader.model.get_weights()]
    leader.reset_metrics()
    by_sibling = sibling.train(weights, *client, np.random.default_rng(7)).weights
    for a, b, mine, theirs, kept in zip(
        by_leader, by_sibling, sibling.model.get_weights(), leader.model.get_weights(), leader_after
    ):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(mine, b)  # the sibling trained its own variables ...
        np.testing.assert_array_equal(theirs, kept)  # ... and left the leader's alone
    assert sibling.metric_states()[0][1] == 100 and leader.metric_states()[0][1] == 0  # examples counted


@pytest.mark.parametrize(
    "settings", [{"learning_rate": [0.1, 0.2]}, {"momentum": [0.9, 0.5]}], ids=["variable", "constant"]
)
def test_a_sibling_whose_optimizer_differs_from_the_leaders_traces_its_own_loop(
    settings: dict[str, list[float]],
) -> None:
    (x, y), _ = data.load_digits(seed=0)
    # The loop holds the leader's optimizer settings (as variables' fresh values or as constants).
    made = iter([{name: values[k] for name, values in settings.items()} for k in range(2)])
    leader = ClientTrainer(_dropout_mlp, lambda: keras.optimizers.SGD(**next(made)), None, 20, 1)
    leader.prepare(0, x[:100], y[:100])
    leader.ready()
    sibling = leader.sibling()
    assert sibling is not None
    sibling.ready()
    assert (leader.traces, sibling.traces) == (1, 1)


SHARE_CORES = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
import keras, tensorflow as tf, fastfed
from fastfed.executors import LocalExecutor
if os.environ.get("START_TENSORFLOW"):
    tf.constant(0.0)
model_fn = lambda: fastfed.models.mlp((4,), hidden=2)
fastfed.FedAvg(model_fn, client_optimizer=keras.optimizers.SGD, executor=LocalExecutor(threads=2))
print("intra-op threads", tf.config.threading.get_intra_op_parallelism_threads())
"""


@pytest.mark.parametrize(
    ("environment", "expected", "logged"),
    [({}, max(1, len(os.sched_getaffinity(0)) // 2), False), ({"TF_NUM_INTRAOP_THREADS": "2"}, 0, False),
     ({"START_TENSORFLOW": "1"}, 0, True)],
    ids=["fresh", "chosen by the user", "tensorflow started"],
)  # fmt: skip
def test_client_threads_share_the_cores_only_before_tensorflow_starts(
    environment: dict[str, str], expected: int, logged: bool
) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("TF_NUM_INTRAOP_THREADS", "START_TENSORFLOW")}
    completed = subprocess.run(
        [sys.executable, "-c", SHARE_CORES], env={**env, **environment}, capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert f"intra-op threads {expected}" in completed.stdout
    assert ("TensorFlow started before fastfed" in completed.stdout) == logged


def test_metric_objects_given_by_the_user_are_not_shared_between_threads() -> None:
    (x, y), _ = data.load_digits(seed=0)
    clients = [(x[a:b], y[a:b]) for a, b in [(0, 30), (30, 200), (200, 230), (230, 500)]]
    accuracies = []
    for threads in (1, 2):
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        process = _process(metrics=metrics, executor=LocalExecutor(threads=threads))
        _, round_metrics = process.next(process.initialize(), clients)
        accuracies.append(round_metrics["train_accuracy"])
    assert accuracies[0] == accuracies[1]


class _UnseededNoise(keras.layers.Layer):
    """Random ops without a seed generator of the layer's own: Keras's global one, or TensorFlow's
    stateful random ops; either would make a thread's draws depend on the other's timing."""

    def __init__(self, stateful: bool) -> None:
        super().__init__()
        self.stateful = stateful

    def call(self, x: Any, training: bool = False) -> Any:
        import tensorflow as tf

        if not training:
            return x
        return x * tf.random.uniform(tf.shape(x)) if self.stateful else keras.random.dropout(x, 0.3)


@pytest.mark.parametrize(
    "model_fn",
    [
        pytest.param(_one_model, id="one model object"),
        pytest.param(lambda: keras.Sequential([keras.Input((64,)), _UnseededNoise(False), keras.layers.Dense(10)]),
                     id="global seed generator"),
        pytest.param(lambda: keras.Sequential([keras.Input((64,)), _UnseededNoise(True), keras.layers.Dense(10)]),
                     id="stateful random op"),
    ],
)  # fmt: skip
def test_clients_train_one_at_a_time_where_threads_would_share_state(
    model_fn: Any, caplog: pytest.LogCaptureFixture
) -> None:
    (x, y), _ = data.load_digits(seed=0)
    clients = [(x[a:b], y[a:b]) for a, b in [(0, 30), (30, 60), (60, 90), (90, 120), (120, 150)]]
    weights = []
    for threads in (2, 1):
        keras.utils.set_random_seed(0)  # the shared random state starts alike for both runs
        executor = LocalExecutor(threads=threads)
        process = _process(model_fn=model_fn, executor=executor)
        with caplog.at_level("INFO", logger="fastfed"):
            state = process.initialize()
            state, _ = process.next(state, clients[:1])  # one client: its loop traced without a second thread
            for _ in range(2):
                state, metrics = process.next(state, clients)
        weights.append(state.weights)
        assert metrics["clients_failed"] == 0
        assert len(executor._trainers) == 1
    assert sum("training clients one at a time" in r.getMessage() for r in caplog.records) == 1
    if model_fn is not _one_model:  # (whose one model the first run trained further)
        for alone, with_threads in zip(weights[1], weights[0]):  # in client order, as with one thread
            np.testing.assert_array_equal(alone, with_threads)


def test_an_interrupted_round_leaves_no_client_thread_training() -> None:
    (x, y), _ = data.load_digits(seed=0)
    clients = [(x[a : a + 40], y[a : a + 40]) for a in range(0, 400, 40)]
    calls = []

    def interrupt_on_the_third(report: Any) -> float:
        calls.append(report.index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 1.0

    process = _process(weighting=interrupt_on_the_third, executor=LocalExecutor(threads=2))
    state = process.initialize()
    with pytest.raises(KeyboardInterrupt) as interrupted:
        process.next(state, clients)
    # The traceback (kept here, as an interactive session keeps its last one) must not keep the
    # round's client threads alive, training on the trainers that the next round will use.
    assert interrupted.traceback
    assert not [t for t in threading.enumerate() if t.name.startswith("fastfed-client")]


def test_local_executor_threads_must_be_a_positive_integer() -> None:
    for threads in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            LocalExecutor(threads=threads)  # type: ignore[arg-type]


def test_training_learns_and_evaluation_is_example_weighted() -> None:
    clients, test = _digits_clients()
    process = _process()
    state = process.initialize()
    before = fastfed.evaluate(process.model_fn, state.weights, [test])
    for _ in range(5):
        state, metrics = process.next(state, clients)
    after = fastfed.evaluate(process.model_fn, state.weights, [test])
    assert after["accuracy"] > before["accuracy"] + 0.3 and after["accuracy"] > 0.8
    assert after["num_examples"] == len(test[0])
    split = fastfed.evaluate(
        process.model_fn, state.weights, [(test[0][:100], test[1][:100]), (test[0][100:], test[1][100:])]
    )
    assert split["accuracy"] == pytest.approx(after["accuracy"]) and split["loss"] == pytest.approx(
        after["loss"], rel=1e-5
    )
    assert state.round == 5 and metrics["round"] == 5


CODECS = {
    "raw": None,
    "uniform 8-bit": UniformQuantizer(bits=8, min_size=100),
    "rotated 2-bit": RotatedQuantizer(2, min_size=100),
    "rotated 2-bit shared": RotatedQuantizer(2, shared_rotation=True, min_size=100),
}


def test_compression_cuts_bits_and_keeps_accuracy() -> None:
    clients, test = _digits_clients()
    results = {}
    for name, codec in CODECS.items():
        # 2-bit uploads only (a 2-bit model would be far off); shared rotation: FedAvg gives every
        # client the round's rotation.
        broadcast = codec if isinstance(codec, UniformQuantizer) else None
        process = _process(aggregator=fastfed.mean_aggregator(codec=codec), broadcast_codec=broadcast)
        state = process.initialize()
        for _ in range(5):
            state, metrics = process.next(state, clients)
        results[name] = (fastfed.evaluate(process.model_fn, state.weights, [test])["accuracy"], metrics)
    raw = results["raw"][1]
    assert raw["broadcast_bits"] == 5 * 8 * len(fastfed.compression.encode(_process().initialize().weights))
    assert results["uniform 8-bit"][1]["broadcast_bits"] < raw["broadcast_bits"] / 3
    for name, shrink in (("uniform 8-bit", 3), ("rotated 2-bit", 8), ("rotated 2-bit shared", 8)):
        accuracy, compressed = results[name]
        assert compressed["aggregate_bits"] < raw["aggregate_bits"] / shrink
        assert abs(accuracy - results["raw"][0]) <= 0.03, name


def test_non_finite_update_is_rejected_and_counted() -> None:
    clients, _ = _digits_clients(3)
    poisoned = (np.full_like(clients[0][0], np.nan), clients[0][1])
    process = _process()
    state = process.initialize()
    new_state, metrics = process.next(state, [poisoned, *clients[1:]])
    assert metrics["update_non_finite"] == 1
    assert all(np.isfinite(w).all() for w in new_state.weights)
    assert state.round == 0  # the input state is untouched


@pytest.mark.parametrize(
    "optimizer",
    [optimizers.SGD(1.0, momentum=0.9), optimizers.Adam(0.01), optimizers.Yogi(0.01), optimizers.Adagrad(0.05)],
)
def test_server_optimizers_move_weights_along_the_delta(optimizer: optimizers.ServerOptimizer) -> None:
    weights = [np.zeros(3, np.float32), np.array([5], np.int64)]
    delta = [np.array([1.0, -1.0, 0.0], np.float32), np.array([2], np.int64)]
    state = optimizer.init(weights)
    new, state = optimizer.apply(weights, delta, state)
    assert new[0].dtype == np.float32 and new[1].dtype == np.int64
    assert new[0][0] > 0 > new[0][1] and new[0][2] == 0
    again, _ = optimizer.apply(new, delta, state)
    assert again[0][0] > new[0][0]


def test_server_memory_does_not_grow_with_clients_per_round() -> None:
    import tracemalloc

    (x, y), _ = data.load_digits(seed=0)
    process = fastfed.FedAvg(
        lambda: models.mlp((64,), hidden=256),  # 19,210 parameters: 77 KB per update
        client_optimizer=lambda: keras.optimizers.SGD(learning_rate=0.05),
        batch_size=10,
        seed=0,
    )
    state = process.initialize()
    state, _ = process.next(state, data.partition_iid(x, y, 10).all())  # trace once, outside the measurement
    peaks = {}
    for count in (50, 500):
        clients = data.partition_iid(x, y, count, seed=count).all()
        tracemalloc.start()
        state, metrics = process.next(state, clients)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert metrics["num_clients"] == count
    update_bytes = sum(w.nbytes for w in state.weights)
    # Holding every update would need 500 x 77 KB = 38 MB; streaming needs a few model-sized buffers.
    assert peaks[500] < peaks[50] + 20 * update_bytes
    assert peaks[500] < 0.1 * 500 * update_bytes


def test_custom_metrics_are_measured_during_training_and_example_weighted() -> None:
    clients, _ = _digits_clients(4)
    process = _process(metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=3, name="top3")])
    state = process.initialize()
    _, metrics = process.next(state, clients)
    assert 0.0 < metrics["train_accuracy"] <= metrics["train_top3"] <= 1.0
    # One client: the round's metrics are that client's, over all its examples.
    single = _process(metrics=["accuracy"])
    _, alone = single.next(single.initialize(), clients[:1])
    assert alone["num_examples"] == len(clients[0][1])
    with pytest.raises(TypeError, match="not a keras.metrics.Metric"):
        _ = _process(metrics=[42]).trainer
