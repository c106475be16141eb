"""The averaging both Flower APIs share: stream results into a fastfed Accumulator, plain or compressed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...aggregation import Accumulator
from ...compression import UniformQuantizer, encode

TENSOR_TYPE = "fastfed.update.v1"  # Parameters.tensor_type of a compressed update (legacy API)
ARRAY_KEY = "fastfed.update.v1"  # the single key of a compressed update's ArrayRecord (Message API)


def encode_delta(
    updated: Sequence[np.ndarray], received: Sequence[np.ndarray], codec: UniformQuantizer, seed: int | None
) -> bytes:
    """A client's update (its weights minus the weights it received), fastfed-encoded."""
    if len(updated) != len(received):
        raise ValueError(f"updated has {len(updated)} arrays but received has {len(received)}")
    delta = [np.asarray(new) - np.asarray(old) for new, old in zip(updated, received)]
    return encode(delta, codec, seed=seed)


class StreamingMean:
    """Folds each result in as it is read, so memory holds one model, not K.

    Uncompressed results are client weights; compressed ones are deltas from the global weights of
    the round. Both can arrive in one round: the deltas' mean is rebased on the global weights.
    """

    def __init__(self) -> None:
        self.weights = Accumulator()
        self.deltas = Accumulator()

    def add_weights(self, arrays: Sequence[np.ndarray], weight: float) -> None:
        self.weights.add(arrays, weight)

    def add_encoded_delta(self, payload: bytes | memoryview, weight: float) -> None:
        self.deltas.add_encoded(payload, weight)

    def result(self, global_weights: Sequence[np.ndarray] | None) -> list[np.ndarray]:
        if self.deltas.count == 0:
            return self.weights.result()
        if global_weights is None:
            raise ValueError("compressed updates need the round's global weights (configure_fit/train was not called)")
        rebased = Accumulator.from_specs(self.deltas.specs or [])
        # mean(global + delta) over the compressed clients = global + mean(delta)
        rebased.add_weighted_sum(
            [
                g.astype(np.float64) * self.deltas.total_weight + s
                for g, s in zip(global_weights, self.deltas.weighted_sums())
            ],
            self.deltas.total_weight,
            self.deltas.count,
        )
        if self.weights.count:
            rebased.merge(self.weights)
        return rebased.result()
