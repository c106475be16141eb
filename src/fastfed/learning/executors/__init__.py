"""Where client training runs: in this process (:class:`LocalExecutor`, the default) or on a Ray
cluster (:class:`RayExecutor`). Both run the same per-group work and return one partial weighted
sum per group of clients, never one model per client.
"""

from __future__ import annotations

from .base import Executor
from .local import LocalExecutor
from .ray import RayExecutor  # ray itself is imported only when a RayExecutor starts

__all__ = ["Executor", "LocalExecutor", "RayExecutor"]
