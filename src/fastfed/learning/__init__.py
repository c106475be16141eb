"""FedAvg over Keras: the training process, client training, aggregation of client deltas, server
optimizers, evaluation, checkpoints, and the executors that run clients locally or on Ray."""

from __future__ import annotations

from . import optimizers
from .aggregators import AdaptiveBound, MeanAggregator, mean, mean_aggregator
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .client import ClientStep, FedProx, enable_determinism
from .evaluation import Evaluation, evaluate
from .fedavg import FedAvg, FedAvgState, RoundFailedError
from .inputs import ClientDataError
from .rounds import ClientReport
from .training import RunExistsError, TrainingInterrupted, TrainingResult, run_training

__all__ = [
    "AdaptiveBound",
    "Checkpoint",
    "CheckpointError",
    "ClientDataError",
    "ClientReport",
    "ClientStep",
    "Evaluation",
    "FedAvg",
    "FedAvgState",
    "FedProx",
    "MeanAggregator",
    "RoundFailedError",
    "RunExistsError",
    "TrainingInterrupted",
    "TrainingResult",
    "enable_determinism",
    "evaluate",
    "load_checkpoint",
    "mean",
    "mean_aggregator",
    "optimizers",
    "run_training",
    "save_checkpoint",
]
