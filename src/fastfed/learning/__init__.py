"""FedAvg over Keras: the training process, evaluation and server optimizers."""

from __future__ import annotations

from . import optimizers
from .aggregators import AdaptiveBound, MeanAggregator, mean
from .fedavg import FedAvg, FedAvgState, RoundFailedError, evaluate

__all__ = [
    "AdaptiveBound",
    "FedAvg",
    "FedAvgState",
    "MeanAggregator",
    "RoundFailedError",
    "evaluate",
    "mean",
    "optimizers",
]
