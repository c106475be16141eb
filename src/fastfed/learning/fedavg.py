"""Federated averaging over Keras models (McMahan et al. 2017, "Communication-Efficient Learning
of Deep Networks from Decentralized Data"), with server optimizers from Reddi et al. 2021.

The process has the shape TFF users know from ``build_weighted_fed_avg``: ``initialize()`` gives a
state, ``next(state, clients)`` runs one round and returns the new state and the round's metrics.
The server folds each client's delta into one streaming :class:`fastfed.Accumulator` as soon as it
arrives, so its memory does not grow with the number of clients in a round.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..aggregation import Accumulator, LayerSpec
from ..compression import Codec, encode, raw_size_bits, size_bits
from .aggregators import MeanAggregator, RoundTally, mean_aggregator
from .client import ClientTrainer, enable_determinism, resolve_metrics
from .optimizers import SGD, ServerOptimizer
from .rounds import GroupResult, RoundSpec, WorkerConfig, derived_seed, split_groups

__all__ = ["FedAvg", "FedAvgState", "RoundFailedError", "evaluate"]

log = logging.getLogger("fastfed")

ClientArrays = tuple[np.ndarray, np.ndarray]


@dataclass
class FedAvgState:
    """The server state between rounds."""

    weights: list[np.ndarray]
    round: int = 0
    optimizer_state: dict[str, list[np.ndarray]] = field(default_factory=dict)
    broadcast_bits_total: int = 0
    aggregate_bits_total: int = 0
    aggregator_state: dict[str, float] = field(default_factory=dict)


class RoundFailedError(RuntimeError):
    """Too few clients contributed to a round; the state passed to ``next`` is unchanged."""


class FedAvg:
    """Weighted federated averaging over a Keras model.

    Args:
      model_fn: builds the Keras model (called once per worker, then reused).
      client_optimizer: a factory of Keras optimizers, e.g. ``lambda: keras.optimizers.SGD(0.1)``.
      server_optimizer: a :mod:`fastfed.optimizers` optimizer; default ``SGD(learning_rate=1.0)``.
      aggregator: :func:`fastfed.mean_aggregator`, optionally with a codec for the uploads.
      broadcast_codec: a codec for the server-to-client model, or ``None`` (exact).
      broadcast_compression: deprecated name of ``broadcast_codec``, removed in 0.3.
      loss: a Keras loss; default sparse categorical cross-entropy on probabilities.
      metrics: Keras metrics (objects, classes or names) measured during local training and reported
        as ``train_<name>``; default ``["accuracy"]`` (sparse categorical accuracy).
      batch_size, local_epochs: local training settings.
      weighting: ``"num_examples"`` (default) or ``"uniform"``.
      executor: where clients train: :class:`fastfed.executors.LocalExecutor` (default) or
        :class:`fastfed.executors.RayExecutor`.
      clients_per_partial_sum: clients are summed in contiguous groups of this many, one partial sum
        each, merged in order. The result depends only on this grouping, so any executor with the
        same value gives the same bits. Default: one group locally, one group per Ray actor.
      deterministic: deterministic TensorFlow kernels in this process and in every worker.
      min_clients: fewest client updates a round must aggregate (clients that raise or send
        non-finite updates do not count); below it ``next`` raises :class:`RoundFailedError`.
      seed: fixes model initialisation, shuffling and stochastic rounding. Every random choice
        derives from (seed, round, client index), so results do not depend on execution order.
    """

    def __init__(
        self,
        model_fn: Callable[[], Any],
        *,
        client_optimizer: Callable[[], Any],
        server_optimizer: ServerOptimizer | None = None,
        aggregator: MeanAggregator | None = None,
        broadcast_codec: Codec | None = None,
        loss: Any = None,
        metrics: Sequence[Any] | None = None,
        batch_size: int = 32,
        local_epochs: int = 1,
        weighting: str = "num_examples",
        executor: Any = None,
        clients_per_partial_sum: int | None = None,
        deterministic: bool = False,
        min_clients: int = 1,
        seed: int = 0,
        broadcast_compression: Codec | None = None,
    ) -> None:
        if broadcast_compression is not None:
            warnings.warn(
                "FedAvg(broadcast_compression=...) is now broadcast_codec=...; the old name goes in 0.3",
                DeprecationWarning,
                stacklevel=2,
            )
            broadcast_codec = broadcast_compression
        if weighting not in ("num_examples", "uniform"):
            raise ValueError(f"weighting must be 'num_examples' or 'uniform', got {weighting!r}")
        if batch_size < 1 or local_epochs < 1 or min_clients < 1:
            raise ValueError("batch_size, local_epochs and min_clients must be positive")
        if clients_per_partial_sum is not None and clients_per_partial_sum < 1:
            raise ValueError(f"clients_per_partial_sum must be positive, got {clients_per_partial_sum}")
        self.model_fn = model_fn
        self.client_optimizer = client_optimizer
        self.server_optimizer = server_optimizer or SGD(learning_rate=1.0)
        self.aggregator = aggregator or mean_aggregator()
        self.broadcast_codec = broadcast_codec
        self.loss = loss
        self.metrics = metrics
        self.batch_size = batch_size
        self.local_epochs = local_epochs
        self.weighting = weighting
        self.min_clients = min_clients
        self.seed = seed
        self.clients_per_partial_sum = clients_per_partial_sum
        self.deterministic = deterministic
        if executor is None:
            from .executors import LocalExecutor

            executor = LocalExecutor()
        self.executor = executor
        self.last_failures: list[tuple[int, str]] = []
        self._worker_config: WorkerConfig | None = None
        self._metric_templates: list[Any] | None = None

    @property
    def worker_config(self) -> WorkerConfig:
        """What each worker builds its trainer from (fixed at the first use)."""
        if self._worker_config is None:
            self._worker_config = WorkerConfig(
                self.model_fn, self.client_optimizer, self.loss, self.metrics, self.batch_size,
                self.local_epochs, self.aggregator, self.weighting, self.deterministic,
            )  # fmt: skip
        return self._worker_config

    @property
    def trainer(self) -> ClientTrainer:
        """The local executor's client trainer (the one Keras model of this process)."""
        trainer = getattr(self.executor, "trainer", None)
        if trainer is None:
            raise AttributeError(f"{type(self.executor).__name__} trains in other processes; it has no local trainer")
        return trainer(self.worker_config)  # type: ignore[no-any-return]

    def _metric_results(self, states: list[list[np.ndarray]] | None) -> dict[str, float]:
        import keras

        if self._metric_templates is None:
            self._metric_templates = resolve_metrics(self.metrics)
        results = {}
        for metric, state in zip(self._metric_templates, states or []):
            for variable, value in zip(metric.variables, state):
                variable.assign(value)
            results[metric.name] = float(keras.ops.convert_to_numpy(metric.result()))
        return results

    def initialize(self) -> FedAvgState:
        """The initial server state: the model's initial weights (seeded) and optimizer state."""
        import keras

        if self.deterministic:
            enable_determinism()
        keras.utils.set_random_seed(self.seed)
        weights = [np.array(w) for w in self.model_fn().get_weights()]
        return FedAvgState(
            weights=weights,
            optimizer_state=self.server_optimizer.init(weights),
            aggregator_state=self.aggregator.initial_state(),
        )

    def next(self, state: FedAvgState, clients: Sequence[ClientArrays]) -> tuple[FedAvgState, dict[str, float]]:
        """Runs one round over ``clients`` (a list of ``(x, y)`` arrays); the input state is not modified.

        A client whose training raises is dropped and counted (``clients_failed``; the errors are in
        ``last_failures``). Raises :class:`RoundFailedError` if fewer than ``min_clients`` updates
        were aggregated.
        """
        if len(clients) == 0:
            raise ValueError("clients: a round needs at least one client")
        started = time.perf_counter()
        round_seed = derived_seed(self.seed, state.round)

        start: list[np.ndarray] | bytes
        if self.broadcast_codec is not None:
            start = encode(state.weights, self.broadcast_codec, seed=round_seed)
            broadcast_bits = size_bits(start) * len(clients)
        else:
            start = state.weights
            broadcast_bits = raw_size_bits(state.weights) * len(clients)

        indexed = []
        for index, (x, y) in enumerate(clients):
            x, y = np.asarray(x), np.asarray(y)
            if len(x) != len(y):
                raise ValueError(f"client {index}: {len(x)} inputs but {len(y)} labels")
            if len(x) == 0:
                raise ValueError(f"client {index}: has no examples")
            indexed.append((index, x, y))
        spec = RoundSpec(state.round, self.seed, start, self.aggregator.bounds(state.aggregator_state))
        positions = split_groups(len(indexed), self.clients_per_partial_sum, self.executor.default_groups)
        results = self.executor.run(self.worker_config, spec, [[indexed[i] for i in group] for group in positions])
        return self._merge(state, started, len(clients), results, broadcast_bits)

    def _merge(
        self, state: FedAvgState, started: float, num_clients: int, results: list[GroupResult], broadcast_bits: int
    ) -> tuple[FedAvgState, dict[str, float]]:
        """Merges the groups' partial sums in group order (the order fixes the arithmetic)."""
        accumulator = Accumulator.from_specs([LayerSpec(w.shape, np.dtype(np.float32)) for w in state.weights])
        tally = RoundTally()
        loss_sum, examples, batches = 0.0, 0, 0
        states: list[list[np.ndarray]] | None = None
        self.last_failures = []
        for result in results:
            if result.sums is not None:
                accumulator.add_weighted_sum(result.sums, result.total_weight, result.count)
            tally.merge(result.tally)
            loss_sum += result.loss_sum
            examples += result.examples
            batches += result.batches
            self.last_failures.extend(result.failures)
            if result.metric_states:
                states = result.metric_states if states is None else [
                    [a + b for a, b in zip(mine, theirs)] for mine, theirs in zip(states, result.metric_states)
                ]  # fmt: skip
        for index, reason in self.last_failures:
            log.warning("round %d: client %d failed and is dropped: %s", state.round + 1, index, reason)
        return self._finish_round(state, started, num_clients, accumulator, tally, broadcast_bits,
                                  (loss_sum, examples, batches), self._metric_results(states))  # fmt: skip

    def _finish_round(
        self,
        state: FedAvgState,
        started: float,
        num_clients: int,
        accumulator: Accumulator,
        tally: RoundTally,
        broadcast_bits: int,
        totals: tuple[float, int, int],
        train_metrics: dict[str, float],
    ) -> tuple[FedAvgState, dict[str, float]]:
        """Applies the aggregated delta with the server optimizer and assembles the round's metrics."""
        if tally.aggregated < self.min_clients:
            raise RoundFailedError(
                f"round {state.round + 1}: {tally.aggregated} of {num_clients} client updates aggregated, "
                f"fewer than min_clients={self.min_clients} ({tally.failed} failed, "
                f"{tally.non_finite} non-finite); the state is unchanged"
            )
        weights, optimizer_state = self.server_optimizer.apply(
            state.weights, accumulator.result(), state.optimizer_state
        )
        new_state = FedAvgState(
            weights=weights,
            round=state.round + 1,
            optimizer_state=optimizer_state,
            broadcast_bits_total=state.broadcast_bits_total + broadcast_bits,
            aggregate_bits_total=state.aggregate_bits_total + tally.aggregate_bits,
            aggregator_state=self.aggregator.next_state(state.aggregator_state, tally.norms),
        )
        loss_sum, examples, batches = totals
        clip_bound, zeroing_bound = self.aggregator.bounds(state.aggregator_state)
        metrics = {
            "round": float(new_state.round),
            "train_loss": loss_sum / examples if examples else float("nan"),
            **{f"train_{name}": value for name, value in train_metrics.items()},
            "num_examples": float(examples),
            "num_batches": float(batches),
            "num_clients": float(num_clients),
            "clients_failed": float(tally.failed),
            "update_non_finite": float(tally.non_finite),
            "updates_clipped": float(tally.clipped),
            "updates_zeroed": float(tally.zeroed),
            "broadcast_bits": float(broadcast_bits),
            "aggregate_bits": float(tally.aggregate_bits),
            "broadcast_bits_total": float(new_state.broadcast_bits_total),
            "aggregate_bits_total": float(new_state.aggregate_bits_total),
        }
        if clip_bound is not None:
            metrics["clipping_bound"] = clip_bound
        if zeroing_bound is not None:
            metrics["zeroing_bound"] = zeroing_bound
        metrics["round_seconds"] = time.perf_counter() - started
        return new_state, metrics


def evaluate(
    model_fn: Callable[[], Any],
    weights: Sequence[np.ndarray],
    clients: Sequence[ClientArrays],
    *,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Example-weighted loss and accuracy of ``weights`` over clients' data (one client = centralized)."""
    import keras

    model = model_fn()
    model.set_weights(list(weights))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction="sum")
    loss_sum, correct, examples = 0.0, 0, 0
    for x, y in clients:
        for start in range(0, len(x), batch_size):
            batch_x, batch_y = x[start : start + batch_size], y[start : start + batch_size]
            predictions = keras.ops.convert_to_numpy(model(batch_x, training=False))
            loss_sum += float(loss_fn(batch_y, predictions))
            correct += int(np.sum(np.argmax(predictions, axis=-1) == np.reshape(batch_y, -1)))
            examples += len(batch_x)
    if examples == 0:
        raise ValueError("evaluate: the clients hold no examples")
    return {"loss": loss_sum / examples, "accuracy": correct / examples, "num_examples": float(examples)}
