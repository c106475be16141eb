"""Benchmark workloads shared by the benchmark modules."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

# The original FedAvg CNN of McMahan et al. 2017, as in TFF's compression tutorial: 1,663,370 float32.
CNN_SHAPES = [(5, 5, 1, 32), (32,), (5, 5, 32, 64), (64,), (3136, 512), (512,), (512, 10), (10,)]


def random_updates(k: int, shapes: list[tuple[int, ...]], seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(shape, dtype=np.float32) * 0.01 for shape in shapes] for _ in range(k)]


def example_counts(k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 1000, k)


# FedAvg scenarios, name: (model, batch, client learning rate, 8-bit uploads and broadcast).
FEDAVG_SCENARIOS = {
    "mnist by digit": ("mlp", 100, 0.1, False),
    "20 label-skewed clients": ("mlp", 20, 0.1, False),
    "cnn 10x400": ("cnn", 20, 0.02, False),
    "cnn 10x400 8-bit": ("cnn", 20, 0.02, True),
}


def fedavg_model_fn(kind: str) -> Any:
    """fastfed's MLP 784-512-10 or the FedAvg CNN, as a model function."""
    from fastfed import models

    return partial(models.cnn, (28, 28)) if kind == "cnn" else partial(models.mlp, (784,), hidden=512)


def fedavg_process(kind: str, batch: int, learning_rate: float, compressed: bool) -> Any:
    """The FedAvg process a scenario runs: its model, client SGD, seed 0."""
    import keras

    import fastfed
    from fastfed.compression import UniformQuantizer

    codec = UniformQuantizer(bits=8) if compressed else None
    return fastfed.FedAvg(
        fedavg_model_fn(kind),
        client_optimizer=partial(keras.optimizers.SGD, learning_rate=learning_rate),
        aggregator=fastfed.mean_aggregator(codec=codec),
        broadcast_codec=codec,
        batch_size=batch,
        seed=0,
    )
