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

from .._extras import require
from ..aggregation import Accumulator, LayerSpec
from ..compression import Codec, encode, raw_size_bits, size_bits
from .aggregators import MeanAggregator, RoundTally, mean_aggregator
from .client import ClientStep, ClientTrainer, FedProx, enable_determinism
from .evaluation import Evaluation, Evaluator
from .inputs import client_arrays
from .losses import resolve_metrics
from .optimizers import SGD, ServerOptimizer
from .rounds import ClientReport, GroupResult, RoundSpec, WorkerConfig, delta_dtype, derived_seed, split_groups

__all__ = ["FedAvg", "FedAvgState", "RoundFailedError"]

log = logging.getLogger("fastfed")


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
      model_fn: builds the Keras model (called once per worker and client thread, then reused); it
        must build a new model on every call, or clients train one at a time.
      client_optimizer: a factory of Keras optimizers, e.g. ``lambda: keras.optimizers.SGD(0.1)``,
        likewise a new one on every call.
      server_optimizer: a :mod:`fastfed.optimizers` optimizer; default ``SGD(learning_rate=1.0)``.
      aggregator: :func:`fastfed.mean_aggregator`, optionally with a codec for the uploads.
      broadcast_codec: a codec for the server-to-client model, or ``None`` (exact). It quantizes the
        weights themselves, not a change, so below 8 bits it costs accuracy that uploads at the same
        bits do not.
      broadcast_compression: deprecated name of ``broadcast_codec``, removed in 0.3.
      loss: a Keras loss (object, function or name); default sparse categorical cross-entropy, on
        logits when the model ends in a linear layer and on probabilities when it ends in a softmax
        (any other model must name its loss).
      metrics: Keras metrics (objects, classes or names) measured during local training and reported
        as ``train_<name>``; default ``["accuracy"]`` (sparse or categorical accuracy, following the labels).
      batch_size, local_epochs: local training settings.
      proximal_mu: FedProx's proximal term (Li et al. 2020, "Federated Optimization in Heterogeneous
        Networks"); 0 (the default) is FedAvg. Shorthand for ``client_step=FedProx(mu)``.
      client_step: a :class:`fastfed.learning.ClientStep` that changes what clients minimise or how
        they apply gradients.
      weighting: how much each client's update counts in the mean: ``"num_examples"`` (default),
        ``"uniform"``, or a callable taking a :class:`fastfed.learning.ClientReport` (the client's
        index, examples and mean training loss) and returning a non-negative number.
      jit_compile: compile local training with XLA; ``None`` decides by device (see
        :class:`fastfed.learning.client.ClientTrainer`).
      clients_per_call: train this many clients together in one call, vectorized over them (see
        :mod:`fastfed.learning.together`); ``None`` decides by device (8 on GPUs, 1 on CPUs).
      executor: where clients train: :class:`fastfed.executors.LocalExecutor` (default: in this
        process, two clients side by side in threads on a CPU) or :class:`fastfed.executors.RayExecutor`.
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
        weighting: str | Callable[[ClientReport], float] = "num_examples",
        proximal_mu: float = 0.0,
        client_step: ClientStep | None = None,
        jit_compile: bool | None = None,
        clients_per_call: int | None = None,
        executor: Any = None,
        clients_per_partial_sum: int | None = None,
        deterministic: bool = False,
        min_clients: int = 1,
        seed: int = 0,
        broadcast_compression: Codec | None = None,
    ) -> None:
        require("keras", "tensorflow", "fastfed.FedAvg")
        if broadcast_compression is not None:
            warnings.warn(
                "FedAvg(broadcast_compression=...) is now broadcast_codec=...; the old name goes in 0.3",
                DeprecationWarning,
                stacklevel=2,
            )
            broadcast_codec = broadcast_compression
        if not callable(weighting) and weighting not in ("num_examples", "uniform"):
            raise ValueError(f"weighting must be 'num_examples', 'uniform' or a callable, got {weighting!r}")
        positive = [("batch_size", batch_size), ("local_epochs", local_epochs), ("min_clients", min_clients)]
        if clients_per_call is not None:
            positive.append(("clients_per_call", clients_per_call))
        for name, value in positive:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        batch_size, local_epochs, min_clients = int(batch_size), int(local_epochs), int(min_clients)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer from 0 to 2**32 - 1 (as Keras's), got {seed!r}")
        seed = int(seed)
        if server_optimizer is not None and not isinstance(server_optimizer, ServerOptimizer):
            raise TypeError(
                f"server_optimizer: expected a fastfed.optimizers optimizer (e.g. fastfed.optimizers.SGD()), got "
                f"{type(server_optimizer).__name__}; Keras optimizers train the clients (client_optimizer)"
            )
        if executor is None:
            from .executors import LocalExecutor

            executor = LocalExecutor()
        share_cores = getattr(executor, "share_cores", None)
        if share_cores is not None:  # before fastfed's first TensorFlow operation: see LocalExecutor
            share_cores()
        resolve_metrics(metrics)  # a bad metric fails here, not in every client of the first round
        if proximal_mu:
            if client_step is not None:
                raise ValueError("give either proximal_mu or client_step, not both")
            client_step = FedProx(proximal_mu)
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
        self.client_step = client_step
        self.jit_compile = jit_compile
        self.clients_per_call = clients_per_call
        self.min_clients = min_clients
        self.seed = seed
        self.clients_per_partial_sum = clients_per_partial_sum
        self.deterministic = deterministic
        self.executor = executor
        self.last_failures: list[tuple[int | str, str]] = []
        self._worker_config: WorkerConfig | None = None
        self._metric_templates: list[Any] | None = None
        self._evaluator: Evaluator | None = None
        self._weight_specs: list[tuple[tuple[int, ...], np.dtype[Any]]] | None = None
        self._optimizer_keys: set[str] | None = None

    @property
    def worker_config(self) -> WorkerConfig:
        """What each worker builds its trainer from (fixed at the first use)."""
        if self._worker_config is None:
            self._worker_config = WorkerConfig(
                self.model_fn, self.client_optimizer, self.loss, self.metrics, self.batch_size,
                self.local_epochs, self.aggregator, self.weighting, self.deterministic,
                self.client_step, self.jit_compile, self.clients_per_call,
            )  # fmt: skip
        return self._worker_config

    @property
    def trainer(self) -> ClientTrainer:
        """The local executor's client trainer (the one Keras model of this process)."""
        trainer = getattr(self.executor, "trainer", None)
        if trainer is None:
            raise AttributeError(f"{type(self.executor).__name__} trains in other processes; it has no local trainer")
        return trainer(self.worker_config)  # type: ignore[no-any-return]

    def _metric_results(self, states: list[list[np.ndarray]] | None, label_shape: tuple[int, ...]) -> dict[str, float]:
        import keras

        if self._metric_templates is None:
            # The clients' metrics, to read their summed states back. Which accuracy "accuracy" is does
            # not matter here (the three kinds keep the same running total and count).
            self._metric_templates = resolve_metrics(self.metrics, label_shape)
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
        model = self.model_fn()
        weights = [np.array(w) for w in model.get_weights()]
        if not weights:
            raise ValueError(
                "model_fn returned a model without weights (a subclassed model is built by its first call): "
                "give it a keras.Input, or call it on a sample batch inside model_fn"
            )
        self._weight_specs = [(w.shape, w.dtype) for w in weights]
        # A local trainer can train on this model rather than build the same one again.
        adopt = getattr(self.executor, "trainer", None)
        if adopt is not None:
            adopt(self.worker_config, model)
        return FedAvgState(
            weights=weights,
            optimizer_state=self.server_optimizer.init(weights),
            aggregator_state=self.aggregator.initial_state(),
        )

    def next(
        self, state: FedAvgState, clients: object, *, progress: Callable[[int], object] | None = None
    ) -> tuple[FedAvgState, dict[str, float]]:
        """Runs one round over ``clients``; the input state is not modified.

        ``clients``: a list of clients, each ``(x, y)`` arrays, a ``{"x", "y"}`` dict or a
        ``tf.data.Dataset`` (see :mod:`fastfed.learning.inputs`), or a :class:`fastfed.data.ClientData`
        (all of its clients). A client whose training raises, or whose data does not fit the model,
        is dropped and counted (``clients_failed``; one ``(client, reason)`` per client in
        ``last_failures`` and a line in the log, the client named by its id in a ``ClientData``, else
        by its position in ``clients``). Raises :class:`RoundFailedError` if fewer than ``min_clients``
        updates were aggregated. ``progress(n)`` is called as clients finish, with how many just did
        (e.g. a progress bar's ``update``).
        """
        from ..data import ClientData

        self.check_state(state)
        names = clients.client_ids if isinstance(clients, ClientData) else None
        arrays = client_arrays(clients)
        started = time.perf_counter()
        round_seed = derived_seed(self.seed, state.round)

        start: list[np.ndarray] | bytes
        if self.broadcast_codec is not None:
            start = encode(state.weights, self.broadcast_codec, seed=round_seed, rotation_seed=round_seed)
            broadcast_bits = size_bits(start) * len(arrays)
        else:
            start = state.weights
            broadcast_bits = raw_size_bits(state.weights) * len(arrays)
        indexed = [(index, x, y) for index, (x, y) in enumerate(arrays)]
        spec = RoundSpec(state.round, self.seed, start, self.aggregator.bounds(state.aggregator_state))
        positions = split_groups(len(indexed), self.clients_per_partial_sum, self.executor.default_groups)
        groups = [[indexed[i] for i in group] for group in positions]
        results = self.executor.run(self.worker_config, spec, groups, progress)
        label_shape = np.shape(arrays[0][1])[1:]
        return self._merge(state, started, len(arrays), results, broadcast_bits, label_shape, names)

    def check_state(self, state: FedAvgState) -> None:
        """Raises ``ValueError`` naming what in ``state`` does not belong to this process: weights of
        another model (count, shapes, dtypes; checked where this process knows its model), or server
        optimizer or aggregator state kept by other settings (e.g. a checkpoint of another run)."""
        specs = self._weight_specs
        trainer = getattr(self.executor, "trainer", None)
        if specs is None and trainer is not None:  # the local trainer builds its model for the round anyway
            variables = trainer(self.worker_config).model.weights
            specs = self._weight_specs = [(tuple(v.shape), np.dtype(v.dtype)) for v in variables]
        if specs is not None:
            if len(state.weights) != len(specs):
                raise ValueError(f"state: {len(state.weights)} weight arrays, but the model has {len(specs)}")
            for j, (weights, (shape, dtype)) in enumerate(zip(state.weights, specs)):
                if np.shape(weights) != shape or np.asarray(weights).dtype != dtype:
                    raise ValueError(
                        f"state: weights {j} have shape {np.shape(weights)} {np.asarray(weights).dtype}, "
                        f"but the model's are {shape} {dtype}"
                    )
        if self._optimizer_keys is None:
            self._optimizer_keys = set(self.server_optimizer.init([np.zeros(1)]))
        if set(state.optimizer_state) != self._optimizer_keys:
            raise ValueError(
                f"state: the server optimizer's state holds {sorted(state.optimizer_state)}, but "
                f"{self.server_optimizer} keeps {sorted(self._optimizer_keys)}"
            )
        expected = set(self.aggregator.initial_state())
        if set(state.aggregator_state) != expected:
            raise ValueError(
                f"state: the aggregator's state holds {sorted(state.aggregator_state)}, but this aggregator "
                f"keeps {sorted(expected)}"
            )

    def evaluate(self, state: FedAvgState, clients: object, *, batch_size: int = 1000) -> Evaluation:
        """The loss, every metric and ``num_examples`` of ``state``'s weights over ``clients``,
        with this process's loss and metrics; per client in ``.per_client`` (see :func:`fastfed.evaluate`)."""
        if self._evaluator is None:
            self._evaluator = Evaluator(self.model_fn, self.loss, self.metrics)
        return self._evaluator(state.weights, clients, batch_size)

    def _merge(
        self,
        state: FedAvgState,
        started: float,
        num_clients: int,
        results: list[GroupResult],
        broadcast_bits: int,
        label_shape: tuple[int, ...],
        names: list[str] | None,
    ) -> tuple[FedAvgState, dict[str, float]]:
        """Merges the groups' partial sums in group order (the order fixes the arithmetic); failed
        clients are named by ``names`` (a ClientData's ids), else by position."""
        accumulator = Accumulator.from_specs([LayerSpec(w.shape, delta_dtype(w)) for w in state.weights])
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
            self.last_failures += [
                (index if names is None else names[index], reason) for index, reason in result.failures
            ]
            if result.metric_states:
                states = result.metric_states if states is None else [
                    [a + b for a, b in zip(mine, theirs)] for mine, theirs in zip(states, result.metric_states)
                ]  # fmt: skip
        for client, reason in self.last_failures:
            log.warning("round %d: client %r failed and is dropped: %s", state.round + 1, client, reason)
        return self._finish_round(state, started, num_clients, accumulator, tally, broadcast_bits,
                                  (loss_sum, examples, batches), self._metric_results(states, label_shape))  # fmt: skip

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
        # Counts stay integers, so that logs and CSV files show them as such.
        metrics: dict[str, float] = {
            "round": new_state.round,
            "train_loss": loss_sum / examples if examples else float("nan"),
            **{f"train_{name}": value for name, value in train_metrics.items()},
            "num_examples": examples,
            "num_batches": batches,
            "num_clients": num_clients,
            "clients_failed": tally.failed,
            "update_non_finite": tally.non_finite,
            "updates_clipped": tally.clipped,
            "updates_zeroed": tally.zeroed,
            "broadcast_bits": broadcast_bits,
            "aggregate_bits": tally.aggregate_bits,
            "broadcast_bits_total": new_state.broadcast_bits_total,
            "aggregate_bits_total": new_state.aggregate_bits_total,
        }
        if clip_bound is not None:
            metrics["clipping_bound"] = clip_bound
        if zeroing_bound is not None:
            metrics["zeroing_bound"] = zeroing_bound
        metrics["round_seconds"] = time.perf_counter() - started
        return new_state, metrics
