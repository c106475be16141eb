"""Losses and metrics as client training and evaluation use them: the default loss read from the
model's last layer, metrics from names or objects, and a loss's value per example."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .inputs import declared_outputs

__all__ = ["output_width", "per_example_loss", "resolve_loss", "resolve_metrics"]


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


def output_width(model: Any) -> int | None:
    """The last axis of a single-output model's predictions, where the model declares it."""
    outputs = declared_outputs(model)
    if outputs and len(outputs) == 1 and len(outputs[0].shape) >= 2:
        width = outputs[0].shape[-1]
        return int(width) if width is not None else None
    return None


def resolve_metrics(
    metrics: Sequence[Any] | str | None, label_shape: tuple[int, ...] = (), width: int | None = None
) -> list[Any]:
    """Keras metric objects from objects, factories or names; default: accuracy.

    ``"accuracy"`` means what it does in Keras's ``compile``: binary accuracy when the model has one
    output unit (``width``), categorical accuracy when each example's labels (``label_shape``) are a
    class vector (one-hot or soft, of any dtype), sparse categorical accuracy for class indices.
    """
    import keras

    if isinstance(metrics, str):
        raise TypeError(f"metrics: expected a list of metrics, got the string {metrics!r} (write [{metrics!r}])")
    resolved = []
    for metric in ("accuracy",) if metrics is None else metrics:
        if metric in ("accuracy", "acc"):
            if width == 1:
                kind = keras.metrics.BinaryAccuracy
            elif label_shape and label_shape[-1] > 1:
                kind = keras.metrics.CategoricalAccuracy
            else:
                kind = keras.metrics.SparseCategoricalAccuracy
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

    # A function's labels and predictions are lined up first, as Keras's compile does (its Loss
    # classes do it in their call).
    values = loss.call(y, predictions) if isinstance(loss, keras.losses.Loss) else loss(*_same_rank(y, predictions))
    values = tf.convert_to_tensor(values)
    if values.shape.rank == 0:
        raise TypeError("loss: got a scalar; a training loss must return one value per example")
    if values.shape.rank > 1:  # per time step or per pixel: averaged within each example
        values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
    return tf.cast(values, tf.float32)


def _same_rank(y: Any, predictions: Any) -> tuple[Any, Any]:
    """Labels and predictions whose ranks differ by one, lined up as Keras lines them up for a loss
    function: the one with a trailing axis of 1 loses it, unless the other has rank 1 and gains one."""
    import tensorflow as tf

    def lined_up(longer: Any, shorter: Any) -> tuple[Any, Any]:
        if longer.shape.rank != shorter.shape.rank + 1 or longer.shape[-1] != 1:
            return longer, shorter
        if shorter.shape.rank == 1:
            return longer, tf.expand_dims(shorter, -1)
        return tf.squeeze(longer, -1), shorter

    y, predictions = tf.convert_to_tensor(y), tf.convert_to_tensor(predictions)
    predictions, y = lined_up(predictions, y)
    y, predictions = lined_up(y, predictions)
    return y, predictions
