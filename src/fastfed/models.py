"""Keras builders for the models of TFF's tutorials and McMahan et al. 2017."""

from __future__ import annotations

import math
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

    ``input_shape`` is how images arrive: (side, side), (side, side, channels) or flattened
    (side * side,). Other sizes than 28x28 get the same layers (5x5 convolutions of 32 and 64
    filters, each pooled by 2, then 512 units), e.g. 8x8 digits.
    """
    import keras

    image = _image_shape(tuple(input_shape))
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Reshape(image),
            keras.layers.Conv2D(32, 5, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2, padding="same"),
            keras.layers.Conv2D(64, 5, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2, padding="same"),
            keras.layers.Flatten(),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) == 3:
        return input_shape[0], input_shape[1], input_shape[2]
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1], 1
    side = math.isqrt(input_shape[0]) if len(input_shape) == 1 else 0
    if len(input_shape) != 1 or side * side != input_shape[0]:
        raise ValueError(f"cnn: expected square images, (h, w), (h, w, c) or (h*w,) with h == w; got {input_shape}")
    return side, side, 1
