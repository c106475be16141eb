"""Bring your own data and model: client forms, conversions, one-line failures, evaluation that agrees
with Keras, FedProx, a custom client step, weighting callables, and the XLA-compiled loop."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

import fastfed
from fastfed import data, models
from fastfed.learning import ClientStep, FedProx


def _clients(count: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    (x, y), _ = data.load_digits(seed=0)
    return data.partition_iid(x, y, count, seed=0).all()


def _process(**options: Any) -> fastfed.FedAvg:
    settings: dict[str, Any] = {
        "client_optimizer": lambda: keras.optimizers.SGD(learning_rate=0.1),
        "batch_size": 16,
        "seed": 2,
    }
    settings.update(options)
    model_fn = settings.pop("model_fn", lambda: models.mlp((64,), hidden=16))
    return fastfed.FedAvg(model_fn, **settings)


def _round(process: fastfed.FedAvg, clients: object) -> tuple[list[np.ndarray], dict[str, float]]:
    state, metrics = process.next(process.initialize(), clients)
    return state.weights, metrics


def _assert_same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for left, right in zip(a, b, strict=True):
        np.testing.assert_array_equal(left, right)


def test_datasets_dicts_and_client_data_train_like_arrays() -> None:
    clients = _clients()
    expected, _ = _round(_process(), clients)
    forms = [
        [tf.data.Dataset.from_tensor_slices((x, y)) for x, y in clients],  # unbatched tuples
        [tf.data.Dataset.from_tensor_slices({"x": x, "y": y}).batch(7) for x, y in clients],  # batched dicts
        # a batch of static size, then mapped and prefetched (one batch per client: no example dropped)
        [
            tf.data.Dataset.from_tensor_slices((x, y))
            .batch(len(x), drop_remainder=True)
            .map(lambda a, b: (a, b))
            .prefetch(1)
            for x, y in clients
        ],
        [{"x": x, "y": y} for x, y in clients],
        data.ClientData({str(k): client for k, client in enumerate(clients)}),
    ]
    for form in forms:
        weights, metrics = _round(_process(), form)
        _assert_same_weights(weights, expected)
        assert metrics["clients_failed"] == 0


def test_a_dataset_mapped_from_batches_to_examples_is_not_unbatched() -> None:
    from fastfed.learning.inputs import ClientDataError, client_arrays

    stream = tf.data.Dataset.from_tensor_slices(np.arange(200, dtype=np.float32))
    # The windowing recipe: each batch of five becomes one example of four inputs and four targets.
    windows = stream.batch(5, drop_remainder=True).map(lambda chunk: (chunk[:-1], chunk[1:]))
    ((x, y),) = client_arrays([windows])
    assert x.shape == y.shape == (40, 4) and x[1, 0] == 5.0
    summaries = stream.batch(4, drop_remainder=True).map(lambda chunk: (chunk, tf.reduce_sum(chunk)))
    ((x, y),) = client_arrays([summaries])
    assert x.shape == (50, 4) and y.shape == (50,)
    # Batches kept as batches through a map are joined back into examples.
    pairs = tf.data.Dataset.from_tensor_slices((np.ones((12, 3), np.float32), np.arange(12)))
    ((x, y),) = client_arrays([pairs.batch(4, drop_remainder=True).map(lambda a, b: (2 * a, b)).prefetch(1)])
    assert x.shape == (12, 3) and y.tolist() == list(range(12))
    # So are those of a zip or concatenation of datasets that each keep their batches.
    inputs = tf.data.Dataset.from_tensor_slices(np.arange(24, dtype=np.float32).reshape(12, 2))
    labels = tf.data.Dataset.from_tensor_slices(np.arange(12))
    zipped = tf.data.Dataset.zip((inputs.batch(4, drop_remainder=True), labels.batch(4, drop_remainder=True)))
    joined = zipped.concatenate(zipped.map(lambda a, b: (-a, b))).prefetch(1)
    ((x, y),) = client_arrays([joined])
    assert x.shape == (24, 2) and x[13].tolist() == [-2.0, -3.0] and y.tolist() == list(range(12)) * 2
    # A zip of batches with one side mapped to one value per batch is read as it is: an error.
    one_label = tf.data.Dataset.zip((inputs.batch(4, drop_remainder=True), labels.batch(4).map(lambda b: b[0])))
    ((x, y),) = client_arrays([one_label])
    assert x.shape == (3, 4, 2) and y.tolist() == [0, 4, 8]
    # A pipeline that fails names the client.
    failing = pairs.map(lambda a, b: (tf.gather(a, b), b))  # fails once b reaches 3
    with pytest.raises(
        ClientDataError, match=r"client 1: the dataset could not be read: indices = 3 is not in \[0, 3\)$"
    ):
        client_arrays([pairs, failing])


def test_clients_of_a_client_data_fail_by_their_ids(caplog: pytest.LogCaptureFixture) -> None:
    (x0, y0), (x1, _), (x2, y2) = _clients(3)
    narrow = (x1[:, :32], y0[: len(x1)])  # 32 features for a model of 64
    pool = data.ClientData({"f0001": (x0, y0), "f0002": narrow, "f0003": (x2, y2)})
    process = _process()
    with caplog.at_level(logging.WARNING, logger="fastfed"):
        process.next(process.initialize(), pool)
    expected = [("f0002", "inputs have shape (32,) float32 per example; the model takes (64,)")]
    assert process.last_failures == expected
    assert "client 'f0002' failed and is dropped" in caplog.text
    # Sampled rounds too: every round of three samples all three.
    fastfed.run_training(process, pool, rounds=1, clients_per_round=3, progress=False)
    assert process.last_failures == expected


def test_clients_in_other_dtypes_and_label_shapes_are_converted() -> None:
    clients = _clients()
    expected, _ = _round(_process(), clients)
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = clients
    mixed = [(x0, y0), (x1.astype(np.float64), y1.astype(np.uint8)), (x2, y2.reshape(-1, 1)), (x3, y3.astype(float))]
    process = _process()
    weights, metrics = _round(process, mixed)
    assert metrics["clients_failed"] == 0 and process.trainer.traces == 1
    _assert_same_weights(weights, expected)


def test_a_client_that_cannot_be_used_fails_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    clients = _clients()
    images = (np.ones((5, 8, 8), np.float32), np.zeros(5, np.int64))  # 8x8 images for a model of 64 features
    one_hot = (clients[1][0], np.eye(10, dtype=np.float32)[clients[1][1]])  # one-hot beside integer labels
    process = _process()
    with caplog.at_level(logging.WARNING, logger="fastfed"):
        _, metrics = process.next(process.initialize(), [clients[0], images, one_hot])
    assert metrics["clients_failed"] == 2
    assert process.last_failures == [
        (1, "inputs have shape (8, 8) float32 per example; the model takes (64,)"),
        (2, "labels have shape (10,) float32 per example; the first client's have scalar int64"),
    ]
    assert all("\n" not in record.getMessage() and "[[" not in record.getMessage() for record in caplog.records)
    with pytest.raises(fastfed.learning.ClientDataError, match=r"client 1: 3 inputs but 2 labels"):
        process.next(process.initialize(), [clients[0], (np.ones((3, 64)), np.zeros(2))])
    # A failure inside TensorFlow's graph is reported by its cause, not by "Graph execution error:".
    _, metrics = process.next(process.initialize(), [clients[0], (clients[1][0], np.full(len(clients[1][0]), 12))])
    assert metrics["clients_failed"] == 1
    assert process.last_failures[0][1].startswith("InvalidArgumentError: Received a label value of 12 which is outside")


def test_states_and_models_that_do_not_belong_to_the_process_are_refused() -> None:
    process = _process()
    state = process.initialize()
    clients = _clients(2)
    wrong = [
        (dataclasses.replace(state, weights=[w.astype(np.float64) for w in state.weights]), r"weights 0 have shape"),
        (dataclasses.replace(state, weights=state.weights[:-1]), r"3 weight arrays, but the model has 4"),
        (dataclasses.replace(state, optimizer_state={"m": []}), r"server optimizer's state holds \['m'\]"),
        (dataclasses.replace(state, aggregator_state={"clipping_estimate": 1.0}), r"aggregator's state holds"),
    ]
    for bad, message in wrong:
        with pytest.raises(ValueError, match=message):
            process.next(bad, clients)

    class Unbuilt(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.dense = keras.layers.Dense(10)

        def call(self, x: Any) -> Any:
            return self.dense(x)

    with pytest.raises(ValueError, match="model_fn returned a model without weights"):
        _process(model_fn=Unbuilt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)).initialize()


def _logits_model() -> Any:
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)])


def test_evaluation_agrees_with_keras_for_logits_and_one_hot_labels() -> None:
    clients = [(x, np.eye(10, dtype=np.float32)[y]) for x, y in _clients(3)]
    loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    metrics = ["accuracy", keras.metrics.TopKCategoricalAccuracy(k=3, name="top3")]
    process = _process(model_fn=_logits_model, loss=loss, metrics=metrics)
    state, train = process.next(process.initialize(), clients)
    assert 0 < train["train_accuracy"] <= train["train_top3"] <= 1
    result = process.evaluate(state, clients)
    model = _logits_model()
    model.compile(loss=loss, metrics=["categorical_accuracy", keras.metrics.TopKCategoricalAccuracy(k=3)])
    model.set_weights(state.weights)
    x, y = np.concatenate([c[0] for c in clients]), np.concatenate([c[1] for c in clients])
    keras_loss, keras_accuracy, keras_top3 = model.evaluate(x, y, batch_size=64, verbose=0)
    assert result["loss"] == pytest.approx(keras_loss, abs=1e-4)
    assert result["accuracy"] == pytest.approx(keras_accuracy, abs=1e-4)
    assert result["top3"] == pytest.approx(keras_top3, abs=1e-4)
    assert result["num_examples"] == len(x) and len(result.per_client) == 3
    alone = fastfed.evaluate(_logits_model, state.weights, clients[1:2], loss=loss, metrics=metrics)
    assert result.per_client[1] == pytest.approx(dict(alone))
    assert np.average([c["loss"] for c in result.per_client], weights=[len(c[0]) for c in clients]) == pytest.approx(
        result["loss"], rel=1e-6
    )


def _keras_evaluation(model_fn: Any, weights: list[np.ndarray], loss: Any, x: np.ndarray, y: np.ndarray) -> dict:
    model = model_fn()
    model.compile(loss=loss, metrics=["accuracy"])
    model.set_weights(weights)
    return dict(model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True))


def test_accuracy_and_loss_functions_mean_what_they_mean_in_keras() -> None:
    # "accuracy" of a one-unit sigmoid model is binary accuracy (it read the label-0 fraction), labels
    # that are integer class vectors take categorical accuracy (every client failed), and a loss given
    # as a function or a name sees labels and predictions lined up as Keras lines them up (a custom
    # MSE on (n,) labels and (n, 1) outputs averaged a (batch, batch) broadcast).
    (x, digit), _ = data.load_digits(seed=0)
    x = x[:400]
    binary = (digit[:400] > 4).astype(np.int64)

    def sigmoid_model() -> Any:
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(1, activation="sigmoid")])

    def softmax_model() -> Any:
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax")])

    def mean_squared(labels: Any, outputs: Any) -> Any:
        return tf.reduce_mean(tf.square(tf.cast(labels, tf.float32) - outputs), axis=-1)

    cases = [
        (sigmoid_model, "binary_crossentropy", binary),
        (sigmoid_model, keras.losses.BinaryCrossentropy(), binary.reshape(-1, 1)),
        (sigmoid_model, mean_squared, binary),
        (softmax_model, "categorical_crossentropy", np.eye(10, dtype=np.int64)[digit[:400]]),
    ]
    for model_fn, loss, labels in cases:
        process = _process(model_fn=model_fn, loss=loss, metrics=["accuracy"])
        state, train = process.next(process.initialize(), [(x[:200], labels[:200]), (x[200:], labels[200:])])
        assert train["clients_failed"] == 0
        ours = process.evaluate(state, [(x, labels)])
        theirs = _keras_evaluation(model_fn, state.weights, loss, x, labels)
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
        assert ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=1e-6)
    with pytest.raises(TypeError, match=r"metrics: expected a list of metrics, got the string 'accuracy'"):
        _process(metrics="accuracy")


def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((x.astype(np.float64) - y) ** 2) for x, y in zip(a, b))))


def test_fedprox_keeps_clients_near_the_global_model() -> None:
    clients = _clients()
    start = _process().initialize().weights
    trained = {mu: _round(_process(proximal_mu=mu, local_epochs=3), clients)[0] for mu in (0.0, 1.0, 10.0)}
    moved = {mu: _distance(start, weights) for mu, weights in trained.items()}
    assert moved[10.0] < moved[1.0] < moved[0.0]
    _assert_same_weights(_round(_process(client_step=FedProx(0.0)), clients)[0], _round(_process(), clients)[0])
    with pytest.raises(ValueError, match="mu must be a non-negative number"):
        FedProx(-1.0)
    with pytest.raises(ValueError, match="either proximal_mu or client_step"):
        _process(proximal_mu=0.1, client_step=ClientStep())


class ClippedSteps(ClientStep):
    """A custom client step: every gradient step is clipped to a global norm of 1e-3."""

    def gradients(self, gradients: Any, trainable: Any, start: Any) -> Any:
        clipped, _ = tf.clip_by_global_norm(gradients, 1e-3)
        return clipped


def test_a_custom_client_step_changes_local_training() -> None:
    clients = _clients()
    process = _process(client_step=ClippedSteps())
    start = process.initialize().weights
    weights, metrics = _round(process, clients)
    steps = metrics["num_batches"] / len(clients)  # the mean delta is a mean of clients' deltas
    assert 0 < _distance(start, weights) <= 0.1 * 1e-3 * steps * (1 + 1e-4)


def test_weighting_by_a_callable() -> None:
    clients = _clients()
    only_first = _process(weighting=lambda report: 1.0 if report.index == 0 else 0.0)
    _assert_same_weights(_round(only_first, clients)[0], _round(_process(), clients[:1])[0])
    by_loss = _process(weighting=lambda report: report.loss * report.num_examples)
    assert _round(by_loss, clients)[1]["clients_failed"] == 0
    broken = _process(weighting=lambda report: "heavy")
    with pytest.raises(fastfed.RoundFailedError, match="0 of 4 client updates aggregated"):
        _round(broken, clients)
    assert broken.last_failures[0][1] == "TypeError: weighting returned 'heavy'; expected a number"


def test_xla_compiled_loop_matches_the_graph_loop() -> None:
    clients = _clients(5)  # 288 or 289 examples each: one bucket of 18 batches of 16
    graph, _ = _round(_process(jit_compile=False), clients)
    process = _process(jit_compile=True)
    compiled, metrics = _round(process, clients)
    assert process.trainer.jit_compile and process.trainer.traces == 1
    assert metrics["num_batches"] == sum(-(-len(c[1]) // 16) for c in clients)
    for a, b in zip(compiled, graph):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_clients_trained_together_match_clients_trained_in_turn(momentum: float) -> None:
    (x, y), _ = data.load_digits(seed=0)
    clients = data.partition_dirichlet(x, y, 6, alpha=0.5, seed=1).all()  # clients of different sizes
    optimizer = lambda: keras.optimizers.SGD(learning_rate=0.1, momentum=momentum)  # noqa: E731
    runs = {}
    for per_call in (1, 4):
        process = _process(client_optimizer=optimizer, clients_per_call=per_call, local_epochs=2, proximal_mu=0.01)
        state = process.initialize()
        for _ in range(2):
            state, metrics = process.next(state, clients)
        runs[per_call] = (state.weights, metrics)
        assert process.trainer.clients_per_call == per_call
    for together, in_turn in zip(runs[4][0], runs[1][0], strict=True):
        np.testing.assert_allclose(together, in_turn, rtol=1e-4, atol=1e-5)
    for key in ("train_loss", "train_accuracy", "num_examples", "num_batches"):
        assert runs[4][1][key] == pytest.approx(runs[1][1][key], rel=1e-4), key
    adam = _process(client_optimizer=lambda: keras.optimizers.Adam(0.01), clients_per_call=4)
    _round(adam, clients)  # not vectorizable: trained in turn, with a log line
    assert adam.trainer.clients_per_call == 1


def test_sgd_with_gradient_accumulation_is_trained_in_turn_as_keras_steps_it() -> None:
    """Keras SGD that accumulates gradients (or scales the loss) takes steps the vectorized loop does
    not write out: such clients are trained in turn, to the same weights."""
    (x, y), _ = data.load_digits(seed=0)
    clients = data.partition_dirichlet(x, y, 4, alpha=0.5, seed=1).all()
    optimizer = lambda: keras.optimizers.SGD(learning_rate=0.1, gradient_accumulation_steps=2)  # noqa: E731
    weights = {}
    for per_call in (1, 4):
        process = _process(client_optimizer=optimizer, clients_per_call=per_call)
        state, _ = process.next(process.initialize(), clients)
        assert process.trainer.clients_per_call == 1
        weights[per_call] = state.weights
    for together, in_turn in zip(weights[4], weights[1], strict=True):
        np.testing.assert_array_equal(together, in_turn)


def test_the_default_loss_follows_the_last_layer() -> None:
    clients = _clients(2)
    weights = _process(model_fn=_logits_model).initialize().weights
    x, y = np.concatenate([c[0] for c in clients]), np.concatenate([c[1] for c in clients])

    def keras_loss(model_fn: Any, from_logits: bool) -> float:
        model = model_fn()
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits))
        model.set_weights(weights)
        return float(model.evaluate(x, y, batch_size=64, verbose=0))

    assert fastfed.evaluate(_logits_model, weights, clients)["loss"] == pytest.approx(
        keras_loss(_logits_model, True), abs=1e-4
    )

    def softmax_layer_model() -> Any:
        return keras.Sequential([_logits_model(), keras.layers.Softmax()])

    assert fastfed.evaluate(softmax_layer_model, weights, clients)["loss"] == pytest.approx(
        keras_loss(softmax_layer_model, False), abs=1e-4
    )

    def sigmoid_model() -> Any:
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="sigmoid")])

    with pytest.raises(ValueError, match=r"Dense layer .* logits or probabilities: give the loss"):
        fastfed.evaluate(sigmoid_model, sigmoid_model().get_weights(), clients)
    process = _process(model_fn=sigmoid_model)
    with pytest.raises(ValueError, match=r"logits or probabilities"):
        process.next(process.initialize(), clients)


def test_a_float64_model_gets_a_float64_update() -> None:
    # Deltas were taken and averaged in float32: with weights near 100 a step's update lost ~3%.
    def model_fn() -> Any:
        kernel = keras.initializers.RandomNormal(stddev=100.0, seed=1)
        dense = keras.layers.Dense(3, kernel_initializer=kernel, dtype="float64")
        return keras.Sequential([keras.Input((5,), dtype="float64"), dense])

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 5)), rng.integers(0, 3, 10)
    process = _process(model_fn=model_fn, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       client_optimizer=lambda: keras.optimizers.SGD(learning_rate=1e-4), batch_size=10)  # fmt: skip
    start = process.initialize()
    state, _ = process.next(start, [(x, y)])
    model = model_fn()
    model.set_weights(start.weights)
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model(x))
    expected = start.weights[0] - 1e-4 * tape.gradient(loss, model.trainable_variables)[0].numpy()
    assert state.weights[0].dtype == np.float64
    np.testing.assert_allclose(state.weights[0], expected, rtol=0, atol=1e-11)


def test_construction_refuses_what_would_fail_later_and_accepts_numpy_integers() -> None:
    with pytest.raises(TypeError, match="server_optimizer: expected a fastfed.optimizers optimizer"):
        _process(server_optimizer=keras.optimizers.SGD(learning_rate=1.0))
    with pytest.raises(ValueError, match=r"seed must be an integer from 0 to 2\*\*32 - 1"):
        _process(seed=2**40)
    assert _process(batch_size=np.int64(8)).batch_size == 8
    first, second = keras.Input((32,)), keras.Input((32,))
    joined = keras.layers.Dense(10)(keras.layers.Concatenate()([first, second]))
    with pytest.raises(ValueError, match=r"one input and one output; this model has 2 input\(s\) and 1 output"):
        _process(model_fn=lambda: keras.Model([first, second], joined)).initialize()


def test_labels_of_either_kind_after_integral_floats_and_activity_regularizers_weigh_by_batch() -> None:
    clients = _clients(2)
    process = _process()
    _, metrics = process.next(process.initialize(), [(clients[0][0], clients[0][1].astype(np.float32)), clients[1]])
    assert metrics["clients_failed"] == 0

    def regularized() -> Any:
        hidden = keras.layers.Dense(8, activity_regularizer=keras.regularizers.L2(0.1))
        return keras.Sequential([keras.Input((64,)), hidden, keras.layers.Dense(10)])

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    weights = regularized().get_weights()
    x, y = clients[0][0][:250], clients[0][1][:250]
    ours = fastfed.evaluate(regularized, weights, [(x, y)], loss=loss, metrics=[], batch_size=100)["loss"]
    model = regularized()
    model.compile(loss=loss)
    model.set_weights(weights)
    assert ours == pytest.approx(model.evaluate(x, y, batch_size=100, verbose=0), abs=1e-4)
