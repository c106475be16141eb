"""Losses and metrics as client training and evaluation use them: the default loss read from the
model's last layer, metrics from names or objects, and a loss's value per example."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["per_example_loss", "resolve_loss", "resolve_metrics"]


def resolve_loss(loss: Any, model: Any) -> Any:
    """The loss to train and evaluate with: ``loss`` (an object or a Keras name), or, when it is
    ``None``, sparse categorical cross-entropy on what the model's last layer outputs.

    Keras's own default reads the outputs as probabilities, which silently trains a model that ends
    in a linear layer (logits, as in TFF's tutorials) on the wrong loss; so the last layer decides.
    """
    import keras

    if loss is not None:
        return keras.losses.get(loss) if isinstance(loss, str) else loss
    last = model.layers[-1] if getattr(model, "layers", None) else None
    activation = getattr(last, "activation", None)
    if isinstance(last, keras.layers.Softmax) or activation is keras.activations.softmax:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=False)
    if activation is keras.activations.linear:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    described = type(model).__name__ if last is None else f"{type(last).__name__} layer {last.name!r}"
    raise ValueError(
        f"cannot tell whether the model's outputs ({described}) are logits or probabilities: "
        "give the loss, e.g. loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)"
    )


def resolve_metrics(metrics: Sequence[Any] | None, one_hot_labels: bool = False) -> list[Any]:
    """Keras metric objects from objects, factories or names; default: accuracy.

    ``"accuracy"`` means sparse categorical accuracy for integer labels and categorical accuracy for
    one-hot labels, as it does in Keras's ``compile``.
    """
    import keras

    resolved = []
    for metric in ("accuracy",) if metrics is None else metrics:
        if metric in ("accuracy", "acc"):
            kind = keras.metrics.CategoricalAccuracy if one_hot_labels else keras.metrics.SparseCategoricalAccuracy
            metric = kind(name="accuracy")
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


def per_example_loss(loss: Any, y: Any, predictions: Any) -> Any:
    """One loss value per example, whether ``loss`` is a Keras ``Loss`` (unreduced through its
    ``call``) or a function returning per-example (or per-element) values."""
    import keras
    import tensorflow as tf

    values = loss.call(y, predictions) if isinstance(loss, keras.losses.Loss) else loss(y, predictions)
    values = tf.convert_to_tensor(values)
    if values.shape.rank == 0:
        raise TypeError("loss: got a scalar; a training loss must return one value per example")
    if values.shape.rank > 1:  # per time step or per pixel: averaged within each example
        values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
    return tf.cast(values, tf.float32)
