"""What the Flower tests' clients do: softmax regression on shards of the bundled digits, in NumPy,
with an int64 step counter, the kind of tensor Flower's in-place averaging zeroes."""

from __future__ import annotations

import numpy as np

from fastfed.compression import UniformQuantizer
from fastfed.data import load_digits, partition_iid

NUM_CLIENTS = 4
ROUNDS = 3
CODEC = UniformQuantizer(bits=8, min_size=0)
(X, Y), _ = load_digits(seed=0)
SHARDS = partition_iid(X, Y, NUM_CLIENTS, seed=0).all()


def initial_arrays() -> list[np.ndarray]:
    return [np.zeros((64, 10), np.float32), np.zeros(10, np.float32), np.array(0, np.int64)]


def local_train(arrays: list[np.ndarray], shard: int) -> tuple[list[np.ndarray], int]:
    """Ten full-batch gradient steps of softmax regression; the step counter advances by 10 + shard."""
    weights, bias, steps = (np.array(a) for a in arrays)
    x, y = SHARDS[shard]
    onehot = np.eye(10, dtype=np.float32)[y]
    for _ in range(10):
        logits = x @ weights + bias
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        error = (probabilities - onehot) / len(x)
        weights -= 0.5 * (x.T @ error)
        bias -= 0.5 * error.sum(axis=0)
    return [weights.astype(np.float32), bias.astype(np.float32), np.array(steps + 10 + shard, np.int64)], len(x)


def accuracy(model: list[np.ndarray]) -> float:
    """Held-out accuracy of a softmax-regression model on the digits' test split."""
    _, (x, y) = load_digits(seed=0)
    return float(np.mean(np.argmax(x @ model[0] + model[1], axis=1) == y))
