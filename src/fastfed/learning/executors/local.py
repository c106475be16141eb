"""Client training in this process, the default executor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..rounds import GroupResult, IndexedClient, RoundSpec, WorkerConfig, train_group
from .base import Executor

__all__ = ["LocalExecutor"]


class LocalExecutor(Executor):
    """Trains every client in this process with one reused Keras model."""

    def __init__(self) -> None:
        self._trainer: Any = None
        self._config: WorkerConfig | None = None

    def trainer(self, config: WorkerConfig, model: Any = None) -> Any:
        """The trainer for ``config``, built on ``model`` if given (one the process built already)."""
        if self._trainer is None or self._config is not config:
            self._trainer, self._config = config.build_trainer(model), config
        return self._trainer

    def run(
        self,
        config: WorkerConfig,
        spec: RoundSpec,
        groups: Sequence[Sequence[IndexedClient]],
        progress: Callable[[int], object] | None = None,
    ) -> list[GroupResult]:
        trainer = self.trainer(config)
        return [train_group(trainer, config, spec, group, progress) for group in groups]

    def shutdown(self) -> None:
        self._trainer = self._config = None
