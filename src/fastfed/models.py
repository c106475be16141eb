"""Keras builders for the models of TFF's tutorials and McMahan et al. 2017."""

from __future__ import annotations

from typing import Any

__all__ = ["cnn", "mlp", "softmax_regression"]


def softmax_regression(input_shape: tuple[int, ...] = (784,), classes: int = 10) -> Any:
    """``input -> softmax``, zero-initialised as in TFF's image-classification tutorial."""
    import keras

    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(classes, activation="softmax", kernel_initializer="zeros"),
        ]
    )


def mlp(input_shape: tuple[int, ...] = (784,), hidden: int = 512, classes: int = 10) -> Any:
    """``input -> hidden (ReLU) -> softmax``: the 784-512-10 MLP of TFF's compression tutorial."""
    import keras

    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )


def cnn(input_shape: tuple[int, ...] = (28, 28), classes: int = 10) -> Any:
    """The original FedAvg CNN (McMahan et al. 2017): 1,663,370 parameters on 28x28 images.

    ``input_shape`` is how images arrive: (28, 28), (28, 28, 1) or flattened (784,).
    """
    import keras

    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Reshape((28, 28, 1)),
            keras.layers.Conv2D(32, 5, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2, padding="same"),
            keras.layers.Conv2D(64, 5, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2, padding="same"),
            keras.layers.Flatten(),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )
