"""Evaluation of a model's weights over clients' data, with a training process's loss and metrics.

The result is what Keras's ``model.evaluate`` reports on all the clients' examples together (the
loss averaged over examples, plus the model's regularization losses; every metric over every
example), and the same per client. TFF's ``build_fed_eval`` and Flower's ``evaluate_fn`` do this job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._extras import require
from .inputs import DataSpec, client_arrays
from .losses import output_width, per_example_loss, resolve_loss, resolve_metrics

__all__ = ["Evaluation", "Evaluator", "evaluate"]


class Evaluation(dict[str, float]):
    """The loss, every metric and ``num_examples`` over all clients, as a dict; ``per_client`` holds
    the same for each client, in order."""

    def __init__(self, overall: dict[str, float], per_client: list[dict[str, float]]) -> None:
        super().__init__(overall)
        self.per_client = per_client


class Evaluator:
    """One Keras model that evaluates weights batch by batch in a compiled forward pass."""

    def __init__(self, model_fn: Callable[[], Any], loss: Any = None, metrics: Sequence[Any] | None = None) -> None:
        require("keras", "tensorflow", "fastfed evaluation")
        import tensorflow as tf

        self._tf = tf
        self.model = model_fn()
        self.loss = resolve_loss(loss, self.model)
        self._metric_names = metrics
        self.metrics: list[Any] = []
        self.spec = DataSpec.of_model(self.model)
        self._batch: Any = None

    def _build(self) -> Any:
        tf = self._tf
        model, loss, metrics = self.model, self.loss, self.metrics

        def batch(x: Any, y: Any) -> Any:
            predictions = model(x, training=False)
            for metric in metrics:
                metric.update_state(y, predictions)
            regularization = tf.add_n([tf.cast(t, tf.float32) for t in model.losses]) if model.losses else 0.0
            return tf.reduce_sum(per_example_loss(loss, y, predictions)), regularization

        signature = list(self.spec.tensor_specs())
        return tf.function(batch, input_signature=signature)

    def __call__(self, weights: Sequence[np.ndarray], clients: object, batch_size: int = 1000) -> Evaluation:
        import keras

        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        arrays = client_arrays(clients)
        prepared = [self.spec.conform(index, x, y) for index, (x, y) in enumerate(arrays)]
        if not self.metrics:
            self.metrics = resolve_metrics(self._metric_names, prepared[0][1].shape[1:], output_width(self.model))
        if self._batch is None:
            self._batch = self._build()
        self.model.set_weights(list(weights))
        per_client, states = [], None
        loss_total, regularization_total, examples_total = 0.0, 0.0, 0
        for x, y in prepared:
            for metric in self.metrics:
                metric.reset_state()
            loss_sum, regularization_sum = 0.0, 0.0
            for start in range(0, len(x), batch_size):
                batch_x, batch_y = x[start : start + batch_size], y[start : start + batch_size]
                batch_loss, regularization = self._batch(batch_x, batch_y)
                loss_sum += float(batch_loss)
                # Weighted by the batch's examples, as Keras's evaluate weighs each batch's loss (a
                # regularizer of activations differs from batch to batch).
                regularization_sum += float(regularization) * len(batch_x)
            own = [[keras.ops.convert_to_numpy(v) for v in metric.variables] for metric in self.metrics]
            states = own if states is None else [[a + b for a, b in zip(s, o)] for s, o in zip(states, own)]
            per_client.append(self._results((loss_sum + regularization_sum) / len(x), len(x)))
            loss_total, regularization_total = loss_total + loss_sum, regularization_total + regularization_sum
            examples_total += len(x)
        # The totals: every client's metric state summed, as if all examples were one dataset.
        for metric, state in zip(self.metrics, states or []):
            for variable, value in zip(metric.variables, state):
                variable.assign(value)
        overall = self._results((loss_total + regularization_total) / examples_total, examples_total)
        return Evaluation(overall, per_client)

    def _results(self, loss: float, examples: int) -> dict[str, float]:
        import keras

        results = {"loss": loss}
        for metric in self.metrics:
            results[metric.name] = float(keras.ops.convert_to_numpy(metric.result()))
        results["num_examples"] = examples
        return results


def evaluate(
    model_fn: Callable[[], Any],
    weights: Sequence[np.ndarray],
    clients: object,
    *,
    loss: Any = None,
    metrics: Sequence[Any] | None = None,
    batch_size: int = 1000,
) -> Evaluation:
    """The loss, every metric and ``num_examples`` of ``weights`` over clients' data, overall and per
    client (``.per_client``); one client is centralized evaluation.

    Args:
      model_fn: builds the Keras model the weights belong to.
      weights: the model's weights, e.g. ``state.weights``.
      clients: as :meth:`fastfed.FedAvg.next` takes them: ``(x, y)`` pairs, dicts, ``tf.data``
        datasets, or a :class:`fastfed.data.ClientData`.
      loss, metrics: as for :class:`fastfed.FedAvg` (defaults: sparse categorical cross-entropy on
        probabilities, and accuracy). :meth:`fastfed.FedAvg.evaluate` uses the process's own.
    """
    return Evaluator(model_fn, loss, metrics)(weights, clients, batch_size)
