"""Client training in this process, the default executor."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from ..rounds import GroupResult, IndexedClient, RoundSpec, WorkerConfig, train_group
from .base import Executor

__all__ = ["LocalExecutor"]

log = logging.getLogger("fastfed")


class LocalExecutor(Executor):
    """Trains every client in this process, on Keras models built once and reused.

    Args:
      threads: how many clients train side by side, each thread on its own copy of the model
        (running one traced training loop, traced once, on its own variables).
        ``None`` (the default): 2 on a CPU with at least two cores, where one client's per-step
        dispatch overlaps another's arithmetic, and 1 on GPUs. Results are the same bits for any
        number of threads.

    With several threads, each one's TensorFlow kernels get an equal share of the cores: before
    TensorFlow starts, :meth:`share_cores` sets its intra-op threads to cores / threads (the
    process-wide setting that Ray's and Flower's simulation workers also fix per worker). Small
    steps then run whole on one core instead of being split, and a FedAvg round of an MLP with
    batch 20 trains 1.35x faster on two cores than with the threads sharing TensorFlow's pool. It
    is left alone where TensorFlow has already started (a log line says so), where
    ``TF_NUM_INTRAOP_THREADS`` is set, or where the program set the intra-op threads itself.
    """

    def __init__(self, threads: int | None = None) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self.threads = threads
        self._trainers: list[Any] = []
        self._config: WorkerConfig | None = None
        self._cores_shared = False

    def share_cores(self) -> None:
        """Sets TensorFlow's intra-op threads to cores / threads, once, if TensorFlow has not
        started and nobody else has chosen them (see the class docstring)."""
        if self._cores_shared:
            return
        self._cores_shared = True
        threads = self._thread_count()
        import tensorflow as tf

        chosen = os.environ.get("TF_NUM_INTRAOP_THREADS") or tf.config.threading.get_intra_op_parallelism_threads()
        if threads <= 1 or chosen:
            return
        try:
            tf.config.threading.set_intra_op_parallelism_threads(max(1, _usable_cores() // threads))
        except RuntimeError:  # TensorFlow ran before fastfed: its thread pools are fixed
            log.info(
                "TensorFlow started before fastfed, so its %d client threads share one kernel thread pool "
                "(slower for small models); create the FedAvg process first, or LocalExecutor(threads=1)",
                threads,
            )

    def trainer(self, config: WorkerConfig, model: Any = None) -> Any:
        """The first trainer for ``config``, built on ``model`` if given (one the process built already)."""
        if not self._trainers or self._config is not config:
            self._trainers, self._config = [config.build_trainer(model)], config
        return self._trainers[0]

    def _thread_count(self) -> int:
        if self.threads is not None:
            return self.threads
        import tensorflow as tf

        return 1 if tf.config.list_physical_devices("GPU") else min(2, _usable_cores())

    def run(
        self,
        config: WorkerConfig,
        spec: RoundSpec,
        groups: Sequence[Sequence[IndexedClient]],
        progress: Callable[[int], object] | None = None,
    ) -> list[GroupResult]:
        self.share_cores()
        self.trainer(config)
        threads = self._thread_count()
        return [train_group(self._trainers, config, spec, group, progress, threads) for group in groups]

    def shutdown(self) -> None:
        self._trainers, self._config = [], None


def _usable_cores() -> int:
    """The cores this process may run on (its affinity, e.g. under a container's CPU set)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1
