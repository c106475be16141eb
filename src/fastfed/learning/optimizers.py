"""Server optimizers acting on the averaged client delta (Reddi et al. 2021, "Adaptive Federated
Optimization"): SGD with optional momentum, Adam, Yogi and Adagrad, on lists of NumPy arrays.

The averaged delta is the negative pseudo-gradient, so every update moves the weights along it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SGD", "Adagrad", "Adam", "ServerOptimizer", "Yogi"]

State = dict[str, list[np.ndarray]]


class ServerOptimizer:
    """``init(weights) -> state`` and ``apply(weights, delta, state) -> (weights, state)``, pure."""

    def init(self, weights: list[np.ndarray]) -> State:
        raise NotImplementedError

    def apply(self, weights: list[np.ndarray], delta: list[np.ndarray], state: State) -> tuple[list[np.ndarray], State]:
        raise NotImplementedError


def _zeros(weights: list[np.ndarray]) -> list[np.ndarray]:
    return [np.zeros(w.shape, np.float64) for w in weights]


def _step(weights: list[np.ndarray], direction: list[np.ndarray]) -> list[np.ndarray]:
    # Integer tensors (counters) take the rounded averaged delta; floats keep their dtype.
    updated = []
    for w, d in zip(weights, direction):
        value = w.astype(np.float64) + d
        updated.append(np.rint(value).astype(w.dtype) if w.dtype.kind in "iu" else value.astype(w.dtype))
    return updated


@dataclass(frozen=True)
class SGD(ServerOptimizer):
    """``w += lr * m`` with ``m = momentum * m + delta``; ``learning_rate=1, momentum=0`` is plain FedAvg."""

    learning_rate: float = 1.0
    momentum: float = 0.0

    def init(self, weights: list[np.ndarray]) -> State:
        return {"momentum": _zeros(weights)} if self.momentum else {}

    def apply(self, weights: list[np.ndarray], delta: list[np.ndarray], state: State) -> tuple[list[np.ndarray], State]:
        if not self.momentum:
            return _step(weights, [self.learning_rate * d.astype(np.float64) for d in delta]), state
        momentum = [self.momentum * m + d for m, d in zip(state["momentum"], delta)]
        return _step(weights, [self.learning_rate * m for m in momentum]), {"momentum": momentum}


@dataclass(frozen=True)
class _Adaptive(ServerOptimizer):
    learning_rate: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def init(self, weights: list[np.ndarray]) -> State:
        return {"m": _zeros(weights), "v": [np.full(w.shape, self.tau**2) for w in weights]}

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def apply(self, weights: list[np.ndarray], delta: list[np.ndarray], state: State) -> tuple[list[np.ndarray], State]:
        deltas = [d.astype(np.float64) for d in delta]
        m = [self.beta_1 * m + (1 - self.beta_1) * d for m, d in zip(state["m"], deltas)]
        v = [self._second_moment(v, d * d) for v, d in zip(state["v"], deltas)]
        direction = [self.learning_rate * mi / (np.sqrt(vi) + self.tau) for mi, vi in zip(m, v)]
        return _step(weights, direction), {"m": m, "v": v}


@dataclass(frozen=True)
class Adam(_Adaptive):
    """FedAdam: ``v = beta_2 v + (1 - beta_2) delta^2``."""

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1 - self.beta_2) * d2


@dataclass(frozen=True)
class Yogi(_Adaptive):
    """FedYogi: ``v = v - (1 - beta_2) delta^2 sign(v - delta^2)``."""

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return np.asarray(v - (1 - self.beta_2) * d2 * np.sign(v - d2))


@dataclass(frozen=True)
class Adagrad(_Adaptive):
    """FedAdagrad: ``v = v + delta^2``."""

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return np.asarray(v + d2)
