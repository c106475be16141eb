"""Client training on a Ray cluster: a pool of long-lived actors, each holding one Keras model.

Each round the round spec (with the global weights) enters the object store once; every actor
trains its share of the round's groups of clients one after another and returns one partial
weighted sum per group, as fastfed bytes (the lossless wire format, never pickle for the model
data). The driver's memory and traffic therefore scale with actors and groups, not with clients.
An actor that dies or overruns its time budget loses only its groups, whose clients count as
failed; it is replaced for the next round.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..._extras import require
from ...compression import decode, encode
from ..client import enable_determinism
from ..rounds import GroupResult, IndexedClient, RoundSpec, WorkerConfig, train_group
from .base import Executor

log = logging.getLogger("fastfed")


class _Worker:
    """The body of a Ray actor: one trainer, reused for every client it is given."""

    def __init__(self, config: WorkerConfig) -> None:
        import tensorflow as tf

        # Several actors may share a GPU: let TensorFlow grow into memory instead of taking it all.
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        self.configure(config)

    def configure(self, config: WorkerConfig) -> None:
        """Builds the trainer for a new configuration; the process, and TensorFlow in it, stay."""
        if config.deterministic:
            enable_determinism()
        self.config = config
        self.trainer = config.build_trainer()

    def pid(self) -> int:
        return os.getpid()

    def run(self, spec: RoundSpec, groups: list[list[IndexedClient]]) -> list[dict[str, Any]]:
        packed = []
        for group in groups:
            result = train_group([self.trainer], self.config, spec, group)
            fields = dict(vars(result))
            fields["sums"] = None if result.sums is None else encode(result.sums)
            packed.append(fields)
        return packed


def _unpack(fields: dict[str, Any]) -> GroupResult:
    fields = dict(fields)
    if fields["sums"] is not None:
        fields["sums"] = decode(fields["sums"])
    return GroupResult(**fields)


class RayExecutor(Executor):
    """Runs client training on Ray actors.

    Args:
      address: a running cluster's address (``"auto"``, ``"127.0.0.1:6379"``, ``"ray://..."``), or
        ``None`` to start Ray on this machine (``ray.init()``).
      num_actors: long-lived actors, each building the Keras model once.
      num_cpus_per_actor, num_gpus_per_actor: Ray resources each actor reserves.
      client_timeout: seconds allowed per client; an actor whose share takes longer than this times
        its clients is killed, its clients count as failed, and it is replaced.
      init_kwargs: further arguments for ``ray.init``.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_actors: int = 2,
        num_cpus_per_actor: float = 1.0,
        num_gpus_per_actor: float = 0.0,
        client_timeout: float | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if num_actors < 1:
            raise ValueError(f"num_actors must be at least 1, got {num_actors}")
        if client_timeout is not None and client_timeout <= 0:
            raise ValueError(f"client_timeout must be positive, got {client_timeout}")
        require("ray", "ray", "RayExecutor")  # at construction, not at the first round
        self.address = address
        self.num_actors = num_actors
        self.num_cpus_per_actor = num_cpus_per_actor
        self.num_gpus_per_actor = num_gpus_per_actor
        self.client_timeout = client_timeout
        self.init_kwargs = init_kwargs or {}
        self.default_groups = num_actors
        self._actors: list[Any] = []
        self._config: WorkerConfig | None = None
        self.actors_replaced = 0
        #: Bytes the last round moved between the driver and the actors, by direction.
        self.last_round_bytes = {"to_actors": 0, "from_actors": 0}

    def _new_actor(self) -> Any:
        import ray

        actor_class = ray.remote(num_cpus=self.num_cpus_per_actor, num_gpus=self.num_gpus_per_actor)(_Worker)
        return actor_class.remote(self._config)

    def _start(self, config: WorkerConfig) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, **self.init_kwargs)
        if self._config is config and self._actors:
            return
        self._config = config
        if self._actors:  # a new process or new settings: the running actors rebuild their trainers
            ray.get([actor.configure.remote(config) for actor in self._actors])
        else:
            self._actors = [self._new_actor() for _ in range(self.num_actors)]

    def actor_pids(self) -> list[int]:
        """Process ids of the current actors (for monitoring, or for fault-injection tests)."""
        import ray

        return [int(pid) for pid in ray.get([actor.pid.remote() for actor in self._actors])]

    def _replace(self, slot: int, reason: str) -> None:
        import ray

        ray.kill(self._actors[slot], no_restart=True)
        self._actors[slot] = self._new_actor()
        self.actors_replaced += 1
        log.warning("replaced Ray actor %d: %s", slot, reason)

    def run(
        self,
        config: WorkerConfig,
        spec: RoundSpec,
        groups: Sequence[Sequence[IndexedClient]],
        progress: Callable[[int], object] | None = None,
    ) -> list[GroupResult]:
        import ray
        from ray.exceptions import RayError

        self._start(config)
        spec_ref = ray.put(spec)  # the global weights enter the object store once per round
        shares: list[list[int]] = [list(range(len(groups)))[slot :: self.num_actors] for slot in range(self.num_actors)]
        started = time.monotonic()
        pending: dict[Any, tuple[int, list[int], float]] = {}
        for slot, share in enumerate(shares):
            if not share:
                continue
            clients = sum(len(groups[g]) for g in share)
            deadline = started + self.client_timeout * clients if self.client_timeout else float("inf")
            task = self._actors[slot].run.remote(spec_ref, [list(groups[g]) for g in share])
            pending[task] = (slot, share, deadline)
        results: list[GroupResult | None] = [None] * len(groups)
        busy = sum(1 for share in shares if share)
        client_bytes = sum(x.nbytes + y.nbytes for group in groups for _, x, y in group)
        self.last_round_bytes = {"to_actors": spec.start_bytes() * busy + client_bytes, "from_actors": 0}

        def lose(slot: int, share: list[int], reason: str) -> None:
            for g in share:
                results[g] = GroupResult.lost([index for index, _, _ in groups[g]], reason)
            self._replace(slot, reason)

        while pending:
            next_deadline = min(deadline for _, _, deadline in pending.values())
            timeout = None if next_deadline == float("inf") else max(0.0, next_deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if ready:
                slot, share, _ = pending.pop(ready[0])
                try:
                    for g, fields in zip(share, ray.get(ready[0])):
                        self.last_round_bytes["from_actors"] += len(fields["sums"] or b"")
                        results[g] = _unpack(fields)
                        if progress is not None:  # an actor reports its groups as a whole
                            progress(len(groups[g]))
                except RayError as error:  # the actor died (or its process was killed) mid-round
                    lose(slot, share, f"actor died: {type(error).__name__}")
                continue
            now = time.monotonic()
            for task, (slot, share, deadline) in list(pending.items()):
                if deadline <= now:
                    pending.pop(task)
                    lose(slot, share, f"exceeded client_timeout={self.client_timeout}s per client")
        return [result for result in results if result is not None]

    def shutdown_actors(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []

    def shutdown(self) -> None:
        """Kills the actors (the Ray connection stays; ``ray.shutdown()`` ends it)."""
        if self._actors:
            self.shutdown_actors()
        self._config = None
