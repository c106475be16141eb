"""FedAvg over Keras: the training process, evaluation and server optimizers."""

from __future__ import annotations

from . import optimizers
from .fedavg import FedAvg, FedAvgState, MeanAggregator, evaluate, mean

__all__ = ["FedAvg", "FedAvgState", "MeanAggregator", "evaluate", "mean", "optimizers"]
