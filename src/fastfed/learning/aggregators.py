"""Server-side aggregation of client deltas: the weighted mean, with optional compression of the
uploads and robust clipping or zeroing of large updates.

Robustness follows TFF's robust aggregators: zeroing replaces an update whose L2 norm exceeds a
bound by zeros (its weight still counts), clipping scales an update down to a bound. A bound is a
number, or an :class:`AdaptiveBound` that tracks a quantile of the round's update norms with the
geometric update of Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"
(without the noise, which only matters for differential privacy).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..aggregation import Accumulator
from ..compression import Codec, encode, raw_size_bits, size_bits

__all__ = ["AdaptiveBound", "MeanAggregator", "RoundTally", "l2_norm", "mean", "mean_aggregator"]


@dataclass(frozen=True)
class AdaptiveBound:
    """A norm bound ``multiplier * estimate + increment`` whose ``estimate`` tracks the
    ``target_quantile`` of update norms: after each round, ``estimate *= exp(-learning_rate *
    (fraction of norms <= estimate - target_quantile))``.

    TFF's defaults are ``AdaptiveBound(1.0, 0.8, 0.2)`` for clipping and ``AdaptiveBound(100.0,
    0.98, 0.2, multiplier=2.0, increment=1.0)`` for zeroing.
    """

    initial: float = 1.0
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    multiplier: float = 1.0
    increment: float = 0.0

    def __post_init__(self) -> None:
        if not (self.initial > 0 and math.isfinite(self.initial)):
            raise ValueError(f"initial must be positive and finite, got {self.initial}")
        if not 0.0 <= self.target_quantile <= 1.0:
            raise ValueError(f"target_quantile must be in [0, 1], got {self.target_quantile}")
        if self.learning_rate < 0 or self.multiplier <= 0 or self.increment < 0:
            raise ValueError("learning_rate and increment must be non-negative, multiplier positive")

    def bound(self, estimate: float) -> float:
        return self.multiplier * estimate + self.increment

    def updated(self, estimate: float, norms: Sequence[float]) -> float:
        if not norms:
            return estimate
        below = sum(norm <= estimate for norm in norms) / len(norms)
        return estimate * math.exp(-self.learning_rate * (below - self.target_quantile))


Bound = float | AdaptiveBound


def _check_bound(name: str, bound: Bound | None) -> None:
    if bound is None or isinstance(bound, AdaptiveBound):
        return
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"{name} must be a positive number, an AdaptiveBound or None, got {bound!r}")


@dataclass
class RoundTally:
    """What a round's client contributions did; tallies of several workers add up with :meth:`merge`."""

    aggregated: int = 0
    non_finite: int = 0
    clipped: int = 0
    zeroed: int = 0
    failed: int = 0
    aggregate_bits: int = 0
    norms: list[float] = field(default_factory=list)

    def merge(self, other: RoundTally) -> None:
        self.aggregated += other.aggregated
        self.non_finite += other.non_finite
        self.clipped += other.clipped
        self.zeroed += other.zeroed
        self.failed += other.failed
        self.aggregate_bits += other.aggregate_bits
        self.norms.extend(other.norms)


def l2_norm(layers: Sequence[np.ndarray]) -> float:
    """The L2 norm of an update, squares summed in float64 (a float32 update of 1e20 has a norm,
    not infinity). Only float64 values beyond 1e154 can overflow that: such a layer is scaled by its
    largest value first, and layers' norms are combined relative to the largest of them."""
    norms = []
    for layer in layers:
        values = np.asarray(layer, dtype=np.float64).reshape(-1)
        with np.errstate(over="ignore"):
            square = float(np.dot(values, values))
        if math.isfinite(square):
            norms.append(math.sqrt(square))
        else:
            largest = float(np.abs(values).max())
            scaled = values / largest
            norms.append(largest * math.sqrt(float(np.dot(scaled, scaled))))
    top = max(norms, default=0.0)
    if top == 0.0 or not math.isfinite(top):
        return top
    return top * math.sqrt(math.fsum((norm / top) ** 2 for norm in norms))


@dataclass(frozen=True)
class MeanAggregator:
    """The weighted mean of client deltas; see :func:`mean_aggregator`."""

    codec: Codec | None = None
    clipping: Bound | None = None
    zeroing: Bound | None = None

    def __post_init__(self) -> None:
        _check_bound("clipping", self.clipping)
        _check_bound("zeroing", self.zeroing)

    def initial_state(self) -> dict[str, float]:
        """The adaptive bounds' estimates (empty when every bound is fixed)."""
        state = {}
        for name, bound in (("clipping", self.clipping), ("zeroing", self.zeroing)):
            if isinstance(bound, AdaptiveBound):
                state[f"{name}_estimate"] = bound.initial
        return state

    def bounds(self, state: dict[str, float]) -> tuple[float | None, float | None]:
        """(clipping bound, zeroing bound) in force this round."""

        def resolve(name: str, bound: Bound | None) -> float | None:
            if isinstance(bound, AdaptiveBound):
                return bound.bound(state[f"{name}_estimate"])
            return None if bound is None else float(bound)

        return resolve("clipping", self.clipping), resolve("zeroing", self.zeroing)

    def next_state(self, state: dict[str, float], norms: Sequence[float]) -> dict[str, float]:
        updated = dict(state)
        for name, bound in (("clipping", self.clipping), ("zeroing", self.zeroing)):
            if isinstance(bound, AdaptiveBound):
                updated[f"{name}_estimate"] = bound.updated(state[f"{name}_estimate"], norms)
        return updated

    def contribute(
        self,
        accumulator: Accumulator,
        delta: list[np.ndarray],
        weight: float,
        bounds: tuple[float | None, float | None],
        seed: int,
        tally: RoundTally,
        rotation_seed: int | None = None,
    ) -> None:
        """Screens, bounds, (compresses) and accumulates one client's delta, counting what happened.

        ``seed`` is the client's own; ``rotation_seed`` the round's, the same for all of its clients
        (``RotatedQuantizer(shared_rotation=True)`` needs it).
        """
        if not all(np.isfinite(d).all() for d in delta):
            tally.non_finite += 1  # rejected outright, as TFF's update_non_finite counts
            return
        clip_bound, zeroing_bound = bounds
        # The norm costs a pass over the update: only bounds (and adaptive bounds' estimates) need it.
        norm = l2_norm(delta) if clip_bound is not None or zeroing_bound is not None else 0.0
        if clip_bound is not None or zeroing_bound is not None:
            tally.norms.append(norm)
        if zeroing_bound is not None and norm > zeroing_bound:
            delta = [np.zeros_like(d) for d in delta]
            tally.zeroed += 1
        elif clip_bound is not None and norm > clip_bound:
            scale = clip_bound / norm
            delta = [(d * scale).astype(d.dtype, copy=False) for d in delta]
            tally.clipped += 1
        if self.codec is not None:
            payload = encode(delta, self.codec, seed=seed, rotation_seed=rotation_seed)
            tally.aggregate_bits += size_bits(payload)
            accumulator.add_encoded(payload, weight)
        else:
            tally.aggregate_bits += raw_size_bits(delta)
            accumulator.add(delta, weight)
        tally.aggregated += 1


def mean_aggregator(
    *,
    codec: Codec | None = None,
    clipping: Bound | None = None,
    zeroing: Bound | None = None,
) -> MeanAggregator:
    """Weighted mean aggregation of client deltas, TFF's ``MeanFactory`` with its robust wrappers.

    Args:
      codec: compress every client upload with this codec (after clipping), e.g.
        :class:`fastfed.compression.UniformQuantizer` or :class:`fastfed.compression.RotatedQuantizer`
        (with ``shared_rotation=True``, FedAvg gives every client the round's rotation); ``None``
        sends updates exactly.
      clipping: scale any update whose L2 norm exceeds this bound down to it.
      zeroing: replace any update whose L2 norm exceeds this bound by zeros (checked first).
    """
    return MeanAggregator(codec, clipping, zeroing)


def mean(
    *,
    compression: Codec | None = None,
    clipping: Bound | None = None,
    zeroing: Bound | None = None,
) -> MeanAggregator:
    """Deprecated alias of :func:`mean_aggregator` (``compression`` is now ``codec``); removed in 0.3."""
    warnings.warn(
        "fastfed.mean(compression=...) is now fastfed.mean_aggregator(codec=...); the old name goes in 0.3",
        DeprecationWarning,
        stacklevel=2,
    )
    return MeanAggregator(compression, clipping, zeroing)
