"""Where client training runs: :class:`LocalExecutor` (the default) or :class:`RayExecutor`.

The implementation lives in :mod:`fastfed.learning.executors`, beside the rest of the training runtime.
"""

from __future__ import annotations

from .learning.executors import Executor, LocalExecutor, RayExecutor

__all__ = ["Executor", "LocalExecutor", "RayExecutor"]
