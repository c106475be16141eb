"""Where client training runs: in this process (:class:`LocalExecutor`, the default) or on a Ray
cluster (:class:`RayExecutor`). Both run the same per-group work and return one partial weighted
sum per group of clients, never one model per client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..learning.rounds import GroupResult, IndexedClient, RoundSpec, WorkerConfig, train_group

__all__ = ["Executor", "LocalExecutor", "RayExecutor"]


class Executor:
    """Runs a round's groups of clients and returns their results in group order."""

    #: How many groups a round is split into when ``clients_per_partial_sum`` is not set.
    default_groups: int = 1

    def run(
        self, config: WorkerConfig, spec: RoundSpec, groups: Sequence[Sequence[IndexedClient]]
    ) -> list[GroupResult]:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Releases the executor's workers; it builds new ones if used again."""


class LocalExecutor(Executor):
    """Trains every client in this process with one reused Keras model."""

    def __init__(self) -> None:
        self._trainer: Any = None
        self._config: WorkerConfig | None = None

    def trainer(self, config: WorkerConfig) -> Any:
        if self._trainer is None or self._config is not config:
            self._trainer, self._config = config.build_trainer(), config
        return self._trainer

    def run(
        self, config: WorkerConfig, spec: RoundSpec, groups: Sequence[Sequence[IndexedClient]]
    ) -> list[GroupResult]:
        trainer = self.trainer(config)
        return [train_group(trainer, config, spec, group) for group in groups]

    def shutdown(self) -> None:
        self._trainer = self._config = None


from ._ray import RayExecutor  # noqa: E402  (ray itself is imported only when a RayExecutor starts)
