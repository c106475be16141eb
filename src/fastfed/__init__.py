"""fastfed: fast federated averaging and update compression.

Aggregation (:func:`weighted_mean`, :class:`Accumulator`) runs on native C++ kernels, with Numba and
NumPy twins selected by :func:`set_backend` or ``FASTFED_BACKEND``.
"""

from __future__ import annotations

from . import compression
from ._backend import available_backends, backend, set_backend, use_backend
from .aggregation import Accumulator, weighted_mean, weighted_mean_encoded, weighted_sum
from .checkpoint import Checkpoint, CheckpointError, enable_determinism, load_checkpoint, save_checkpoint
from .errors import DecodeError
from .learning import AdaptiveBound, FedAvg, FedAvgState, RoundFailedError, evaluate, mean, optimizers

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "AdaptiveBound",
    "Checkpoint",
    "CheckpointError",
    "DecodeError",
    "FedAvg",
    "FedAvgState",
    "RoundFailedError",
    "__version__",
    "available_backends",
    "backend",
    "compression",
    "enable_determinism",
    "evaluate",
    "load_checkpoint",
    "mean",
    "optimizers",
    "save_checkpoint",
    "set_backend",
    "use_backend",
    "weighted_mean",
    "weighted_mean_encoded",
    "weighted_sum",
]
