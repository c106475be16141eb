"""Client training: one Keras model per worker, reused across clients and rounds.

The training step is one ``tf.function`` with a batch dimension of ``None``, traced once on the
first batch and never again, whatever the clients' sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class ClientResult:
    weights: list[np.ndarray]
    num_examples: int
    num_batches: int
    loss_sum: float
    correct: int


class ClientTrainer:
    def __init__(
        self,
        model_fn: Callable[[], Any],
        optimizer_fn: Callable[[], Any],
        loss: Any,
        batch_size: int,
        local_epochs: int,
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
        self._step: Any = None

    def _build_step(self, x: np.ndarray, y: np.ndarray) -> Any:
        tf = self._tf
        model, optimizer, loss_fn = self.model, self.optimizer, self.loss

        @tf.function(
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
            size = tf.cast(tf.shape(batch_x)[0], tf.float32)
            labels = tf.cast(tf.reshape(batch_y, [-1]), tf.int64)
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(predictions, axis=-1), labels), tf.int64))
            return tf.cast(loss, tf.float32) * size, correct

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
        loss_sum, correct, batches = 0.0, 0, 0
        for _ in range(self.local_epochs):
            order = rng.permutation(len(x))
            for start in range(0, len(x), self.batch_size):
                index = order[start : start + self.batch_size]
                batch_loss, batch_correct = self._step(x[index], y[index])
                loss_sum += float(batch_loss)
                correct += int(batch_correct)
                batches += 1
        return ClientResult(self.model.get_weights(), len(x) * self.local_epochs, batches, loss_sum, correct)
