"""fastfed: fast federated averaging and update compression.

Aggregation (:func:`weighted_mean`, :class:`Accumulator`) runs on native C++ kernels, with Numba and
NumPy twins selected by :func:`set_backend` or ``FASTFED_BACKEND``.
"""

from __future__ import annotations

from . import compression
from ._backend import available_backends, backend, set_backend, use_backend
from .aggregation import Accumulator, weighted_mean, weighted_mean_encoded, weighted_sum
from .errors import DecodeError
from .learning import FedAvg, FedAvgState, evaluate, mean, optimizers

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "DecodeError",
    "FedAvg",
    "FedAvgState",
    "__version__",
    "available_backends",
    "backend",
    "compression",
    "evaluate",
    "mean",
    "optimizers",
    "set_backend",
    "use_backend",
    "weighted_mean",
    "weighted_mean_encoded",
    "weighted_sum",
]
