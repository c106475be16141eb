"""fastfed aggregation inside Flower's Message API strategies (``flwr.serverapp.strategy``, flwr >= 1.21).

As in :mod:`fastfed.integrations.flower`, ``FastAggregationMixin`` averages the replies' ArrayRecords
with fastfed and hands the strategy's own ``aggregate_train`` a single reply holding the mean with
weight 1, so each strategy's server optimizer runs unchanged. Flower's Message-API averaging turns
integer arrays into float64; where the strategy leaves a value unchanged (plain FedAvg), the
mixin returns fastfed's integer mean in its own dtype.

Clients may reply with :func:`compress_arrays` instead of their weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.common import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from ...compression import Codec
from ._averaging import (
    ARRAY_KEY,
    NUMPY_STYPE,
    ROTATION_SEED_KEY,
    average_results,
    encode_delta,
    npy_view,
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
    "FastFedYogi",
    "compress_arrays",
]


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
    """
    if list(updated.keys()) != list(received.keys()):
        raise ValueError("updated and received must hold the same arrays, in the same order")
    updated_arrays, received_arrays = updated.to_numpy_ndarrays(), received.to_numpy_ndarrays()
    payload = encode_delta(updated_arrays, received_arrays, codec, seed, rotation_seed)
    return ArrayRecord({ARRAY_KEY: Array(np.frombuffer(payload, dtype=np.uint8))})


class FastAggregationMixin:
    """Replaces the averaging of a Flower Message-API FedAvg-family strategy with fastfed's."""

    _fastfed_global: ArrayRecord | None = None
    weighted_by_key: str

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any) -> Any:
        # Compressed replies are deltas from the arrays sent this round; remember them.
        self._fastfed_global = arrays
        config[ROTATION_SEED_KEY] = round_rotation_seed(self, server_round)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        parent = super()
        replies = list(replies)
        valid, _ = self._check_and_log_replies(replies, is_train=True)  # type: ignore[attr-defined]
        if not valid:
            return parent.aggregate_train(server_round, replies)  # type: ignore[attr-defined, no-any-return]
        contents = [message.content for message in valid]
        plain: list[tuple[list[np.ndarray], float]] = []
        encoded: list[tuple[bytes, float]] = []
        names: list[str] = []
        for content in contents:
            record = next(iter(content.array_records.values()))
            weight = float(next(iter(content.metric_records.values()))[self.weighted_by_key])
            if list(record.keys()) == [ARRAY_KEY]:
                encoded.append((record[ARRAY_KEY].numpy().tobytes(), weight))
            else:
                names = names or list(record.keys())
                arrays = [npy_view(a.data) if a.stype == NUMPY_STYPE else a.numpy() for a in record.values()]
                plain.append((arrays, weight))
        global_weights = None
        if encoded and self._fastfed_global is not None:
            names = names or list(self._fastfed_global.keys())
            global_weights = self._fastfed_global.to_numpy_ndarrays()
        averaged = dict(zip(names, average_results(plain, encoded, global_weights)))
        single = RecordDict(
            {
                "arrays": ArrayRecord({name: Array(value) for name, value in averaged.items()}),
                "metrics": MetricRecord({self.weighted_by_key: 1}),
            }
        )
        # A reply to the first reply: unlike a new Message, it needs no task identity of this process.
        reply = Message(single, reply_to=valid[0])
        arrays, _ = parent.aggregate_train(server_round, [reply])  # type: ignore[attr-defined]
        if arrays is not None:
            for name, value in averaged.items():
                if value.dtype.kind in "iu" and np.array_equal(arrays[name].numpy(), value):
                    arrays[name] = Array(value)  # the strategy left it as is: keep the integer dtype
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)  # type: ignore[attr-defined]
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
