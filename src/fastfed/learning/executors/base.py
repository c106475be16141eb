"""The executor interface: how a round's groups of clients are handed to whatever trains them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..rounds import GroupResult, IndexedClient, RoundSpec, WorkerConfig

__all__ = ["Executor"]


class Executor:
    """Runs a round's groups of clients and returns their results in group order."""

    #: How many groups a round is split into when ``clients_per_partial_sum`` is not set.
    default_groups: int = 1

    def run(
        self,
        config: WorkerConfig,
        spec: RoundSpec,
        groups: Sequence[Sequence[IndexedClient]],
        progress: Callable[[int], object] | None = None,
    ) -> list[GroupResult]:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Releases the executor's workers; it builds new ones if used again."""
