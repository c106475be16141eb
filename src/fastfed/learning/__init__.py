"""FedAvg over Keras: the training process, client training, aggregation of client deltas, server
optimizers, evaluation, checkpoints, and the executors that run clients locally or on Ray."""

from __future__ import annotations

from . import optimizers
from .aggregators import AdaptiveBound, MeanAggregator, mean, mean_aggregator
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .client import enable_determinism
from .fedavg import FedAvg, FedAvgState, RoundFailedError, evaluate

__all__ = [
    "AdaptiveBound",
    "Checkpoint",
    "CheckpointError",
    "FedAvg",
    "FedAvgState",
    "MeanAggregator",
    "RoundFailedError",
    "enable_determinism",
    "evaluate",
    "load_checkpoint",
    "mean",
    "mean_aggregator",
    "optimizers",
    "save_checkpoint",
]
