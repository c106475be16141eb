"""Client training in this process, the default executor."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from ..rounds import GroupResult, IndexedClient, RoundSpec, WorkerConfig, train_group
from .base import Executor

__all__ = ["LocalExecutor"]


class LocalExecutor(Executor):
    """Trains every client in this process, on Keras models built once and reused.

    Args:
      threads: how many clients train side by side, each thread on its own copy of the model.
        ``None`` (the default): 2 on a CPU with at least two cores, where one client's per-step
        dispatch overlaps another's arithmetic (a FedAvg round of small steps runs up to 1.35x
        faster), and 1 on GPUs. Results are the same bits for any number of threads.
    """

    def __init__(self, threads: int | None = None) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self.threads = threads
        self._trainers: list[Any] = []
        self._config: WorkerConfig | None = None

    def trainer(self, config: WorkerConfig, model: Any = None) -> Any:
        """The first trainer for ``config``, built on ``model`` if given (one the process built already)."""
        if not self._trainers or self._config is not config:
            self._trainers, self._config = [config.build_trainer(model)], config
        return self._trainers[0]

    def _thread_count(self) -> int:
        if self.threads is not None:
            return self.threads
        import tensorflow as tf

        return 1 if tf.config.list_physical_devices("GPU") else min(2, os.cpu_count() or 1)

    def run(
        self,
        config: WorkerConfig,
        spec: RoundSpec,
        groups: Sequence[Sequence[IndexedClient]],
        progress: Callable[[int], object] | None = None,
    ) -> list[GroupResult]:
        self.trainer(config)
        threads = self._thread_count()
        return [train_group(self._trainers, config, spec, group, progress, threads) for group in groups]

    def shutdown(self) -> None:
        self._trainers, self._config = [], None
