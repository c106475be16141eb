"""fastfed aggregation inside Flower's Message API strategies (``flwr.serverapp.strategy``, flwr >= 1.21).

As in :mod:`fastfed.integrations.flower`, ``FastAggregationMixin`` averages the replies'
ArrayRecords with fastfed and hands the strategy's own ``aggregate_train`` a single merged reply
holding the mean with weight 1, so each strategy's server optimizer runs unchanged. Arrays are
matched by key, as Flower does; replies whose key sets differ raise Flower's
``InconsistentMessageReplies``. Flower's Message-API averaging turns integer arrays into float64;
where the strategy leaves a value unchanged (plain FedAvg), the mixin returns fastfed's integer
mean in its own dtype. Mixed into a strategy that does not aggregate by a weighted mean (FedMedian,
FedTrimmedAvg, Krum, MultiKrum, Bulyan, QFedAvg...), it raises ``TypeError``: :class:`FastFedMedian`
and :class:`FastFedTrimmedAvg` are the native counterparts of the first two.

Replies are checked as in the legacy API (see there): a reply that cannot be read, does not match
the arrays sent this round, fails its checksum or holds NaN or infinity (``non_finite = "skip"``)
is dropped as a failure and logged in one line. The merged reply is not a ``Message``: the mixin
reads only ``content``, ``has_error()`` and, for its log lines, ``metadata`` of the replies, so
``Mock(spec=Message)`` replies work as they do with Flower's own strategies.

Clients may reply with :func:`compress_arrays` instead of their weights, in the same round as
clients that reply with plain weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.common import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
)
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from ..._npy import npy_view
from ...aggregation.layers import NonFinite
from ...aggregation.robust import screened_median, screened_trimmed_mean
from ...compression import Codec
from ._averaging import (
    ARRAY_KEY,
    NUMPY_STYPE,
    ROTATION_SEED_KEY,
    Aggregate,
    ClientUpdate,
    aggregate_updates,
    encode_delta,
    refuse_other_aggregations,
    round_rotation_seed,
)

__all__ = [
    "ARRAY_KEY",
    "ROTATION_SEED_KEY",
    "FastAggregationMixin",
    "FastFedAdagrad",
    "FastFedAdam",
    "FastFedAvg",
    "FastFedAvgM",
    "FastFedMedian",
    "FastFedTrimmedAvg",
    "FastFedYogi",
    "compress_arrays",
]

# The Message-API strategies whose aggregate_train is a weighted mean (followed, for some, by a
# server optimizer): the mixin can stand in for their averaging.
WEIGHTED_MEAN_STRATEGIES = (FedAvg, FedAvgM, FedOpt, FedAdam, FedYogi, FedAdagrad)


def compress_arrays(
    updated: ArrayRecord,
    received: ArrayRecord,
    codec: Codec,
    *,
    seed: int | None = None,
    rotation_seed: int | None = None,
) -> ArrayRecord:
    """Client side: the update ``updated - received`` as one fastfed payload in an ``ArrayRecord``.

    Reply with it in place of the trained arrays (``RecordDict({"arrays": compress_arrays(...),
    "metrics": MetricRecord({"num-examples": n})})``). For ``RotatedQuantizer(shared_rotation=True)``,
    pass ``rotation_seed=config[ROTATION_SEED_KEY]`` from the train message's config record, which
    fastfed strategies fill in each round.

    Integer layers' differences travel exactly (in a signed type twice as wide, up to int64),
    float16 layers' in float32.
    """
    if list(updated.keys()) != list(received.keys()):
        raise ValueError("updated and received must hold the same arrays, in the same order")
    updated_arrays, received_arrays = updated.to_numpy_ndarrays(), received.to_numpy_ndarrays()
    payload = encode_delta(updated_arrays, received_arrays, codec, seed, rotation_seed)
    return ArrayRecord({ARRAY_KEY: Array(np.frombuffer(payload, dtype=np.uint8))})


class _MergedReply:
    """The one reply the mixin hands the strategy's own ``aggregate_train``: what that reads of it."""

    def __init__(self, content: RecordDict) -> None:
        self.content = content

    def has_error(self) -> bool:
        return False


def _node(reply: Message) -> str:
    return str(getattr(getattr(reply, "metadata", None), "src_node_id", "?"))


def _array_record(content: RecordDict) -> ArrayRecord:
    return next(iter(content.array_records.values()))


def _check_consistency(contents: list[RecordDict], weighted_by_key: str) -> None:
    """Flower's reply checks (one ArrayRecord, one MetricRecord with the weight), except that
    compressed replies, whose ArrayRecord holds the single key ``ARRAY_KEY``, may mix with plain ones."""
    if any(len(content.array_records) != 1 for content in contents):
        raise InconsistentMessageReplies(reason="Expected exactly one ArrayRecord in replies. Skipping aggregation.")
    key_sets = {frozenset(_array_record(content).keys()) for content in contents} - {frozenset([ARRAY_KEY])}
    if len(key_sets) > 1:
        listed = "; ".join(str(sorted(keys)) for keys in key_sets)
        raise InconsistentMessageReplies(
            reason=f"All ArrayRecords must have the same keys for aggregation, got {listed}. Skipping aggregation."
        )
    validate_message_reply_consistency(contents, weighted_by_key, check_arrayrecord=False)


def _reply_update(content: RecordDict, names: list[str], weighted_by_key: str) -> ClientUpdate:
    """A reply's arrays in the order of ``names`` (matched by key), or its compressed delta."""
    record = _array_record(content)
    weight = float(next(iter(content.metric_records.values()))[weighted_by_key])
    keys = list(record.keys())
    try:
        if keys == [ARRAY_KEY]:
            return ClientUpdate(None, record[ARRAY_KEY].numpy().tobytes(), weight)
        if set(keys) != set(names):
            return ClientUpdate(None, None, weight, f"arrays {sorted(keys)} do not match the round's {sorted(names)}")
        arrays = [
            npy_view(record[name].data) if record[name].stype == NUMPY_STYPE else record[name].numpy() for name in names
        ]
        return ClientUpdate(arrays, None, weight)
    except (ValueError, TypeError) as error:
        return ClientUpdate(None, None, weight, f"unreadable arrays ({error})")


class _CheckedReplies:
    """Remembers each round's arrays and aggregates replies checked against them."""

    _fastfed_global: ArrayRecord | None = None
    #: What to do with a reply holding NaN or infinity: "skip" (drop it as a failure, the default),
    #: "raise" or "propagate", as for :func:`fastfed.weighted_mean`.
    non_finite: NonFinite = "skip"
    weighted_by_key: str

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any) -> Any:
        # Replies are checked against the arrays sent this round; compressed ones are deltas from them.
        self._fastfed_global = arrays
        config[ROTATION_SEED_KEY] = round_rotation_seed(self, server_round)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        replies = list(replies)
        if len(replies) == 1 and isinstance(replies[0], _MergedReply):
            return replies, []  # the mixin's own reply: the real ones were checked and logged already
        return super()._check_and_log_replies(replies, is_train, validate)  # type: ignore[misc, no-any-return]

    def _aggregate_replies(
        self, replies: list[Message], aggregate: Aggregate | None
    ) -> tuple[dict[str, np.ndarray] | None, list[Message]]:
        """(the aggregate by array name, in Flower's order, or None; the replies kept)."""
        # Flower's own log line and error replies; the contents are checked below.
        valid, _ = super()._check_and_log_replies(replies, is_train=True, validate=False)  # type: ignore[misc]
        if not valid:
            return None, []
        contents = [message.content for message in valid]
        _check_consistency(contents, self.weighted_by_key)
        plain_keys = next((list(_array_record(c).keys()) for c in contents if ARRAY_KEY not in _array_record(c)), None)
        known = self._fastfed_global
        names = list(known.keys()) if known is not None else plain_keys or []
        updates = [_reply_update(content, names, self.weighted_by_key) for content in contents]
        global_weights = None if known is None else [known[name].numpy() for name in names]
        aggregated = aggregate_updates(updates, global_weights, aggregate, self.non_finite)
        for k, reason in aggregated.dropped.items():
            log(WARNING, "aggregate_train: dropping the reply from node %s as a failure: %s", _node(valid[k]), reason)
        kept = [message for k, message in enumerate(valid) if k not in aggregated.dropped]
        if aggregated.layers is None:
            return None, kept
        by_name = dict(zip(names, aggregated.layers))
        return {name: by_name[name] for name in plain_keys or names}, kept  # the first reply's order, as Flower's


class FastAggregationMixin(_CheckedReplies):
    """Replaces the averaging of a Flower Message-API FedAvg-family strategy with fastfed's."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        refuse_other_aggregations(cls, FastAggregationMixin, FedAvg, "aggregate_train", WEIGHTED_MEAN_STRATEGIES)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        parent = super()
        averaged, kept = self._aggregate_replies(list(replies), None)
        if averaged is None:
            return parent.aggregate_train(server_round, [])  # type: ignore[attr-defined, no-any-return]
        merged = _MergedReply(
            RecordDict(
                {
                    "arrays": ArrayRecord({name: Array(value) for name, value in averaged.items()}),
                    "metrics": MetricRecord({self.weighted_by_key: 1}),
                }
            )
        )
        arrays, _ = parent.aggregate_train(server_round, [merged])  # type: ignore[attr-defined]
        if arrays is not None:
            for name, value in averaged.items():
                if value.dtype.kind in "iu" and np.array_equal(arrays[name].numpy(), value):
                    arrays[name] = Array(value)  # the strategy left it as is: keep the integer dtype
        metrics = self.train_metrics_aggr_fn([m.content for m in kept], self.weighted_by_key)  # type: ignore[attr-defined]
        return arrays, metrics


class _RobustAggregation(_CheckedReplies):
    """FedMedian's and FedTrimmedAvg's ``aggregate_train`` with fastfed's kernels and checked replies."""

    def _robust_aggregate(self) -> Aggregate:
        raise NotImplementedError

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        aggregated, kept = self._aggregate_replies(list(replies), self._robust_aggregate())
        if aggregated is None:
            return None, None
        arrays = ArrayRecord({name: Array(np.asarray(value)) for name, value in aggregated.items()})
        metrics = self.train_metrics_aggr_fn([m.content for m in kept], self.weighted_by_key)  # type: ignore[attr-defined]
        return arrays, metrics


class FastFedAvg(FastAggregationMixin, FedAvg):
    """Flower's Message-API FedAvg with fastfed averaging."""


class FastFedAvgM(FastAggregationMixin, FedAvgM):
    """Flower's Message-API FedAvgM (server momentum) with fastfed averaging."""


class FastFedAdam(FastAggregationMixin, FedAdam):
    """Flower's Message-API FedAdam with fastfed averaging."""


class FastFedYogi(FastAggregationMixin, FedYogi):
    """Flower's Message-API FedYogi with fastfed averaging."""


class FastFedAdagrad(FastAggregationMixin, FedAdagrad):
    """Flower's Message-API FedAdagrad with fastfed averaging."""


class FastFedMedian(_RobustAggregation, FedMedian):
    """Flower's Message-API FedMedian (Yin et al. 2018) with :func:`fastfed.median`'s native kernel;
    integer arrays stay integers (Flower returns float64)."""

    def _robust_aggregate(self) -> Aggregate:
        return lambda clients, weights, non_finite: screened_median(clients, non_finite)


class FastFedTrimmedAvg(_RobustAggregation, FedTrimmedAvg):
    """Flower's Message-API FedTrimmedAvg (Yin et al. 2018) with :func:`fastfed.trimmed_mean`'s
    native kernel: ``int(beta * K)`` values cut from each end of every coordinate, as Flower does."""

    def _robust_aggregate(self) -> Aggregate:
        beta = self.beta
        return lambda clients, weights, non_finite: screened_trimmed_mean(clients, beta, non_finite)
