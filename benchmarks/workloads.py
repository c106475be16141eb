"""Benchmark workloads shared by the benchmark modules."""

from __future__ import annotations

import numpy as np

# The original FedAvg CNN of McMahan et al. 2017, as in TFF's compression tutorial: 1,663,370 float32.
CNN_SHAPES = [(5, 5, 1, 32), (32,), (5, 5, 32, 64), (64,), (3136, 512), (512,), (512, 10), (10,)]


def random_updates(k: int, shapes: list[tuple[int, ...]], seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(shape, dtype=np.float32) * 0.01 for shape in shapes] for _ in range(k)]


def example_counts(k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 1000, k)
