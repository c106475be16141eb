"""fastfed: fast federated averaging and update compression.

Aggregation (:func:`weighted_mean`, :class:`Accumulator`, the robust :func:`median` and
:func:`trimmed_mean`) runs on native C++ kernels, with Numba and
NumPy twins selected by :func:`set_backend` or ``FASTFED_BACKEND``. Compression lives in
:mod:`fastfed.compression`, FedAvg over Keras in :mod:`fastfed.learning`. The subpackages
:mod:`fastfed.data`, :mod:`fastfed.models` and :mod:`fastfed.integrations` are imported on first use,
so ``import fastfed`` imports neither TensorFlow, Ray nor Flower.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

from . import compression, learning
from ._backend import available_backends, backend, set_backend, use_backend
from .aggregation import Accumulator, median, trimmed_mean, weighted_mean, weighted_mean_encoded, weighted_sum
from .errors import DecodeError
from .learning import (
    AdaptiveBound,
    Checkpoint,
    CheckpointError,
    ClientDataError,
    ClientStep,
    FedAvg,
    FedAvgState,
    FedProx,
    RoundFailedError,
    enable_determinism,
    evaluate,
    load_checkpoint,
    mean,
    mean_aggregator,
    optimizers,
    run_training,
    save_checkpoint,
)

try:
    __version__ = version("fastfed")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"

# Imported on first attribute access: each pulls in optional, heavy dependencies of its own.
_LAZY_SUBMODULES = ("data", "executors", "integrations", "models")

__all__ = [
    "Accumulator",
    "AdaptiveBound",
    "Checkpoint",
    "CheckpointError",
    "ClientDataError",
    "ClientStep",
    "DecodeError",
    "FedAvg",
    "FedAvgState",
    "FedProx",
    "RoundFailedError",
    "__version__",
    "available_backends",
    "backend",
    "compression",
    "data",
    "enable_determinism",
    "evaluate",
    "integrations",
    "learning",
    "load_checkpoint",
    "mean",
    "mean_aggregator",
    "median",
    "models",
    "optimizers",
    "run_training",
    "save_checkpoint",
    "set_backend",
    "trimmed_mean",
    "use_backend",
    "weighted_mean",
    "weighted_mean_encoded",
    "weighted_sum",
]


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES})
