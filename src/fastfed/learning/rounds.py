"""One round's client work, split into ordered groups that any executor can run anywhere.

Clients are summed in fixed groups (contiguous runs of the round's clients), each group into one
partial weighted sum, and the partial sums are merged in group order. The arithmetic therefore
depends only on the grouping, never on which worker ran a group or when, so a Ray round and a local
round with the same grouping give the same bits.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..aggregation import Accumulator
from ..compression import decode
from .aggregators import MeanAggregator, RoundTally
from .client import ClientResult, ClientStep, ClientTrainer, describe_failure

ClientArrays = tuple[np.ndarray, np.ndarray]
IndexedClient = tuple[int, np.ndarray, np.ndarray]


def delta_dtype(weights: np.ndarray) -> np.dtype[Any]:
    """The dtype a client's delta of a layer is computed and averaged in: float64 for float64 layers,
    float32 for the rest (float16 differences in float16 would round past its range, integers wrap)."""
    return np.dtype(np.float64 if weights.dtype == np.float64 else np.float32)


def derived_seed(*path: int) -> int:
    """A 64-bit seed from integers: every random choice of a run derives from (seed, round, ...)."""
    return int(np.random.SeedSequence(list(path)).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs to build its trainer: shipped once to each worker."""

    model_fn: Callable[[], Any]
    client_optimizer: Callable[[], Any]
    loss: Any
    metrics: Sequence[Any] | None
    batch_size: int
    local_epochs: int
    aggregator: MeanAggregator
    weighting: str | Callable[[ClientReport], float]
    deterministic: bool = False
    client_step: ClientStep | None = None
    jit_compile: bool | None = None
    clients_per_call: int | None = None

    def build_trainer(self, model: Any = None) -> ClientTrainer:
        """A trainer on a new model, or on ``model`` (built by ``model_fn``) if given."""
        return ClientTrainer(
            self.model_fn, self.client_optimizer, self.loss, self.batch_size, self.local_epochs,
            self.metrics, self.client_step, self.jit_compile, model, self.clients_per_call,
        )  # fmt: skip

    def client_weight(self, report: ClientReport) -> float:
        """The weight of a client's update in the round's mean."""
        if self.weighting == "num_examples":
            return float(report.num_examples)
        if self.weighting == "uniform":
            return 1.0
        assert callable(self.weighting)
        weight = self.weighting(report)
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise TypeError(f"weighting returned {weight!r}; expected a number") from None
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"weighting returned {value}; expected a finite number >= 0")
        return value


@dataclass(frozen=True)
class ClientReport:
    """What a weighting callable learns of a client after its local training.

    Attributes:
      index: the client's position in the round's list of clients.
      num_examples: examples trained on (times local epochs).
      loss: the client's mean training loss.
    """

    index: int
    num_examples: int
    loss: float


@dataclass(frozen=True)
class RoundSpec:
    """What every group of a round trains from: sent once per round to each worker.

    ``start`` is the broadcast: the global weights, or their fastfed encoding when the broadcast is
    compressed, so that what travels to workers is the compressed payload.
    """

    round: int
    seed: int
    start: list[np.ndarray] | bytes
    bounds: tuple[float | None, float | None]

    def start_weights(self) -> list[np.ndarray]:
        """The weights clients start from, decoded once per process."""
        decoded: list[np.ndarray] | None = self.__dict__.get("_decoded")
        if decoded is None:
            decoded = decode(self.start) if isinstance(self.start, bytes) else self.start
            object.__setattr__(self, "_decoded", decoded)  # a cache, not state: frozen otherwise
        return decoded

    @property
    def rotation_seed(self) -> int:
        """The round's shared rotation (``RotatedQuantizer(shared_rotation=True)``): the same for every client."""
        return derived_seed(self.seed, self.round)

    def start_bytes(self) -> int:
        return len(self.start) if isinstance(self.start, bytes) else sum(w.nbytes for w in self.start)


@dataclass
class GroupResult:
    """One group's partial sum and what its clients did; ``sums`` is ``None`` if none was aggregated."""

    sums: list[np.ndarray] | None
    total_weight: float
    count: int
    tally: RoundTally
    loss_sum: float
    examples: int
    batches: int
    metric_states: list[list[np.ndarray]]
    failures: list[tuple[int, str]] = field(default_factory=list)

    @classmethod
    def lost(cls, clients: Sequence[int], reason: str) -> GroupResult:
        """A group whose worker died or timed out: all its clients count as failed."""
        return cls(None, 0.0, 0, RoundTally(failed=len(clients)), 0.0, 0, 0, [], [(i, reason) for i in clients])


Chunk = list[tuple[int, np.ndarray, np.ndarray, int]]


def _train_chunk(
    trainer: ClientTrainer, start: list[np.ndarray], chunk: Chunk
) -> tuple[list[ClientResult | BaseException], list[list[np.ndarray]] | None]:
    """Trains a chunk of prepared clients (together if more than one); their outcomes, and the
    chunk's training-metric states, or ``None`` if its training failed."""
    trainer.reset_metrics()
    outcomes: list[ClientResult | BaseException]
    try:
        if len(chunk) > 1:
            together = [(x, y, np.random.default_rng(seed)) for _, x, y, seed in chunk]
            outcomes = list(trainer.train_together(start, together))
        else:
            _, x, y, seed = chunk[0]
            outcomes = [trainer.train(start, x, y, np.random.default_rng(seed))]
    except Exception as error:  # a faulty client must not stop the round
        return [error] * len(chunk), None
    return outcomes, trainer.metric_states()


def _chunk_outcomes(
    trainers: list[ClientTrainer], threads: int, start: list[np.ndarray], chunks: list[Chunk]
) -> Iterator[tuple[list[ClientResult | BaseException], list[list[np.ndarray]] | None]]:
    """Each chunk's outcomes, in chunk order; with ``threads`` > 1, chunks train side by side in
    threads, one trainer each (``trainers`` is grown with siblings of its first, its loop traced
    already), which changes no bit: a client's training depends only on its own data and seed, and
    what the chunks return is folded in chunk order."""
    threads = min(threads, len(chunks))
    if threads > 1 and trainers[0].trains_alone():  # e.g. its step draws from shared random state: in order
        threads = 1
    if threads <= 1:
        for chunk in chunks:
            yield _train_chunk(trainers[0], start, chunk)
        return
    idle: queue.SimpleQueue[ClientTrainer] = queue.SimpleQueue()

    def train_on_idle_trainer(chunk: Chunk) -> Any:
        trainer = idle.get()
        try:
            return _train_chunk(trainer, start, chunk)
        finally:
            idle.put(trainer)

    pool = ThreadPoolExecutor(threads, thread_name_prefix="fastfed-client")
    waiting = list(trainers[:threads])
    try:
        # A window of chunks in flight, so that finished updates wait to be folded for a few
        # chunks at most, not for the whole round.
        pending = iter(chunks)
        first_chunks = itertools.islice(pending, 2 * threads)
        window = collections.deque(pool.submit(train_on_idle_trainer, chunk) for chunk in first_chunks)
        # Each trainer set to work as soon as it is ready, and siblings built here meanwhile (Keras
        # builds models and graphs in one thread at a time), so that the first round's model building
        # overlaps the first clients' training. A trainer that fails to trace is set to work anyway:
        # its clients fail with the same error, counted, as with one trainer.
        while waiting or len(trainers) < threads:
            if not waiting:
                sibling = trainers[0].sibling()
                if sibling is None:
                    break
                trainers.append(sibling)
                waiting.append(sibling)
            with contextlib.suppress(Exception):
                waiting[0].ready()
            idle.put(waiting.pop(0))
        while window:
            outcome = window.popleft().result()
            for chunk in itertools.islice(pending, 1):
                window.append(pool.submit(train_on_idle_trainer, chunk))
            yield outcome
    finally:
        # On an interrupt or error, clients not yet started are dropped and running ones finish;
        # threads still waiting for a trainer are given one, so that none waits forever.
        for trainer in waiting:
            idle.put(trainer)
        pool.shutdown(wait=True, cancel_futures=True)


def split_groups(num_clients: int, clients_per_group: int | None, default_groups: int) -> list[range]:
    """Contiguous groups of client positions: ``clients_per_group`` each, or ``default_groups`` of them."""
    size = clients_per_group or max(1, math.ceil(num_clients / max(1, default_groups)))
    return [range(start, min(num_clients, start + size)) for start in range(0, num_clients, size)]


def train_group(
    trainers: list[ClientTrainer],
    config: WorkerConfig,
    spec: RoundSpec,
    clients: Sequence[IndexedClient],
    progress: Callable[[int], object] | None = None,
    threads: int = 1,
) -> GroupResult:
    """Trains a group's clients and folds their deltas, in client order, into one partial sum;
    ``progress(1)`` is called after each client. With ``threads`` > 1, clients train side by side
    in threads, each on its own trainer (``trainers`` is grown with siblings of its first); the
    result is the same bits as with one."""
    accumulator = Accumulator()
    tally = RoundTally()
    loss_sum, examples, batches = 0.0, 0, 0
    metric_states: list[list[np.ndarray]] = []
    failures: list[tuple[int, str]] = []
    start = spec.start_weights()
    dtypes = [delta_dtype(weights) for weights in start]
    # Clients train in chunks of the trainer's clients_per_call (1: one by one); every client's data
    # is conformed first, so that one client's bad data fails that client alone.
    prepared: Chunk = []
    for index, x, y in clients:
        try:
            prepared.append((index, *trainers[0].prepare(index, x, y), derived_seed(spec.seed, spec.round, index)))
        except Exception as error:
            tally.failed += 1
            failures.append((index, describe_failure(error)))
            if progress is not None:
                progress(1)
    size = max(1, trainers[0].clients_per_call)
    chunks = [prepared[first : first + size] for first in range(0, len(prepared), size)]
    if threads > 1 and len(chunks) > 1 and len(trainers) < threads:
        try:
            trainers[0].ready()  # traced first: whether its step can run beside another's
        except Exception:  # raised again as each client's failure when it trains, as with one thread
            threads = 1
    for chunk, (outcomes, states) in zip(chunks, _chunk_outcomes(trainers, threads, start, chunks)):
        if states is not None:  # training metrics cover the clients whose training completed
            metric_states = states if not metric_states else [
                [mine + theirs for mine, theirs in zip(a, b)] for a, b in zip(metric_states, states)
            ]  # fmt: skip
        for (index, _, _, client_seed), outcome in zip(chunk, outcomes):
            try:
                if isinstance(outcome, BaseException):
                    raise outcome
                report = ClientReport(index, outcome.num_examples, outcome.loss_sum / max(1, outcome.num_examples))
                weight = config.client_weight(report)
            except Exception as error:
                tally.failed += 1
                failures.append((index, describe_failure(error)))
            else:
                delta = [new.astype(t) - old.astype(t) for new, old, t in zip(outcome.weights, start, dtypes)]
                loss_sum += outcome.loss_sum
                examples += outcome.num_examples
                batches += outcome.num_batches
                config.aggregator.contribute(
                    accumulator, delta, weight, spec.bounds, client_seed, tally, rotation_seed=spec.rotation_seed
                )
            if progress is not None:
                progress(1)
    sums = accumulator.weighted_sums() if tally.aggregated else None
    return GroupResult(
        sums,
        accumulator.total_weight,
        tally.aggregated,
        tally,
        loss_sum,
        examples,
        batches,
        metric_states,
        failures,
    )
