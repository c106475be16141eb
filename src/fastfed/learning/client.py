"""Client training: one Keras model per worker, reused across clients and rounds.

The training step is one ``tf.function`` with a batch dimension of ``None``, traced once on the
first batch and never again, whatever the clients' sizes. Metrics are updated inside the step, so,
as in TFF, training metrics are measured during local training and weighted by examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def enable_determinism() -> None:
    """Deterministic TensorFlow kernels: with a fixed seed, runs (and resumed runs) repeat bit for bit."""
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()


@dataclass
class ClientResult:
    weights: list[np.ndarray]
    num_examples: int
    num_batches: int
    loss_sum: float


def resolve_metrics(metrics: Sequence[Any] | None) -> list[Any]:
    """Keras metric objects from objects, factories or names; default: sparse categorical accuracy."""
    import keras

    resolved = []
    for metric in ("accuracy",) if metrics is None else metrics:
        if metric in ("accuracy", "acc"):
            # With integer labels and the default loss, "accuracy" means sparse categorical accuracy.
            metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        elif isinstance(metric, str):
            found = keras.metrics.get(metric)
            metric = (
                found
                if isinstance(found, keras.metrics.Metric)
                else keras.metrics.MeanMetricWrapper(found, name=metric)
            )
        elif callable(metric) and not isinstance(metric, keras.metrics.Metric):
            metric = metric()  # a class or factory
        if not isinstance(metric, keras.metrics.Metric):
            raise TypeError(f"metrics: {metric!r} is not a keras.metrics.Metric")
        resolved.append(metric)
    return resolved


class ClientTrainer:
    def __init__(
        self,
        model_fn: Callable[[], Any],
        optimizer_fn: Callable[[], Any],
        loss: Any,
        batch_size: int,
        local_epochs: int,
        metrics: Sequence[Any] | None = None,
    ) -> None:
        import keras
        import tensorflow as tf

        self._tf = tf
        self.model = model_fn()
        self.optimizer = optimizer_fn()
        self.optimizer.build(self.model.trainable_variables)
        # Keras 3 keeps the learning rate among the variables, so a reset restores values, not zeros.
        self._fresh_optimizer = [keras.ops.convert_to_numpy(v) for v in self.optimizer.variables]
        # Per-example losses, so that batch losses add up to an example-weighted total.
        self.loss = keras.losses.get(loss) if not callable(loss) else loss
        self.batch_size = batch_size
        self.local_epochs = local_epochs
        self.metrics = resolve_metrics(metrics)
        self._step: Any = None

    def reset_metrics(self) -> None:
        for metric in self.metrics:
            metric.reset_state()

    def metric_states(self) -> list[list[np.ndarray]]:
        """The metrics' state variables. Keras metrics keep running sums, so states of different
        clients (or workers) add up to the state of all their examples together; FedAvg reads the
        summed states back through metrics of the same kind."""
        import keras

        return [[keras.ops.convert_to_numpy(v) for v in metric.variables] for metric in self.metrics]

    def _build_step(self, x: np.ndarray, y: np.ndarray) -> Any:
        tf = self._tf
        model, optimizer, loss_fn, metrics = self.model, self.optimizer, self.loss, self.metrics

        @tf.function(  # type: ignore[untyped-decorator]
            input_signature=[
                tf.TensorSpec((None, *x.shape[1:]), tf.as_dtype(x.dtype)),
                tf.TensorSpec((None, *y.shape[1:]), tf.as_dtype(y.dtype)),
            ]
        )
        def step(batch_x: Any, batch_y: Any) -> Any:
            with tf.GradientTape() as tape:
                predictions = model(batch_x, training=True)
                # Mean over the batch whether the loss returns per-example values or a reduced scalar.
                loss = tf.reduce_mean(loss_fn(batch_y, predictions))
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            for metric in metrics:
                metric.update_state(batch_y, predictions)
            return tf.cast(loss, tf.float32) * tf.cast(tf.shape(batch_x)[0], tf.float32)

        return step

    @property
    def traces(self) -> int:
        """How many times the training step has been traced (1 after the first batch)."""
        return 0 if self._step is None else int(self._step.experimental_get_tracing_count())

    def train(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> ClientResult:
        if self._step is None:
            self._step = self._build_step(x, y)
        self.model.set_weights(weights)
        # Each client starts from a fresh optimizer state, as in FedAvg.
        for variable, value in zip(self.optimizer.variables, self._fresh_optimizer):
            variable.assign(value)
        loss_sum, batches = 0.0, 0
        for _ in range(self.local_epochs):
            order = rng.permutation(len(x))
            for start in range(0, len(x), self.batch_size):
                index = order[start : start + self.batch_size]
                loss_sum += float(self._step(x[index], y[index]))
                batches += 1
        return ClientResult(self.model.get_weights(), len(x) * self.local_epochs, batches, loss_sum)
