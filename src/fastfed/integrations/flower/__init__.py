"""fastfed aggregation inside Flower's legacy strategies (``flwr.server.strategy``).

``FastAggregationMixin`` replaces the weighted averaging of any strategy of Flower's FedAvg family
(FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx, FaultTolerantFedAvg) with fastfed's exact
kernels and keeps the strategy's own server-optimizer logic and acceptance rules: the mixin
averages the K results, then hands the strategy's ``aggregate_fit`` a single result holding the
mean with ``num_examples=1``, for which Flower's own averaging is the identity. ``accept_failures``
and FaultTolerantFedAvg's ``min_completion_rate_fit`` are applied to the real counts first. Put the
mixin first: ``class MyStrategy(FastAggregationMixin, FedAdam)``. Strategies that aggregate
otherwise (FedMedian, FedTrimmedAvg, Krum, Bulyan, QFedAvg...) are refused with a ``TypeError``;
:class:`FastFedMedian` and :class:`FastFedTrimmedAvg` are their native counterparts.

Every result is checked against the round's global weights (those of ``configure_fit``): a result
that cannot be read, whose layers differ from the model's, whose compressed payload fails its
checksum, or that holds NaN or infinity (``non_finite = "skip"``, the default) is dropped, counted
as a failure and logged in one line. Set ``non_finite`` to ``"raise"`` or ``"propagate"`` on the
strategy for :func:`fastfed.weighted_mean`'s other behaviours.

Clients may send fastfed-compressed updates with :func:`compress_parameters`, alone or mixed with
plain ones in a round; the strategy dequantizes and accumulates them in one pass. For the Message
API (``flwr.serverapp.strategy``), see :mod:`fastfed.integrations.flower.serverapp`.
"""

from __future__ import annotations

from ..._extras import require

require("flwr", "flower", "fastfed.integrations.flower")

from logging import WARNING
from typing import Any

from flwr.common import FitRes, NDArrays, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    FaultTolerantFedAvg,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedOpt,
    FedTrimmedAvg,
    FedYogi,
)

from ..._npy import npy_view
from ...aggregation.layers import NonFinite
from ...aggregation.robust import screened_median, screened_trimmed_mean
from ...compression import Codec
from ._averaging import (
    NUMPY_STYPE,
    ROTATION_SEED_KEY,
    TENSOR_TYPE,
    Aggregate,
    ClientUpdate,
    aggregate_updates,
    encode_delta,
    refuse_other_aggregations,
    round_rotation_seed,
)

__all__ = [
    "ROTATION_SEED_KEY",
    "TENSOR_TYPE",
    "FastAggregationMixin",
    "FastFedAdagrad",
    "FastFedAdam",
    "FastFedAvg",
    "FastFedAvgM",
    "FastFedMedian",
    "FastFedTrimmedAvg",
    "FastFedYogi",
    "compress_parameters",
]

# The legacy strategies whose aggregate_fit is a weighted mean (followed, for some, by a server
# optimizer): the mixin can stand in for their averaging.
WEIGHTED_MEAN_STRATEGIES = (FedAvg, FedAvgM, FedOpt, FedAdam, FedYogi, FedAdagrad, FaultTolerantFedAvg)

Results = list[tuple[ClientProxy, FitRes]]
Failures = list[tuple[ClientProxy, FitRes] | BaseException]


def compress_parameters(
    updated: NDArrays, received: NDArrays, codec: Codec, *, seed: int | None = None, rotation_seed: int | None = None
) -> Parameters:
    """Client side: the update ``updated - received`` as one fastfed payload in Flower ``Parameters``.

    Return it from ``fit`` (e.g. a ``Client`` returning ``FitRes(parameters=...)``); a fastfed
    strategy decodes and averages it in one pass and adds the round's global weights back. For
    ``RotatedQuantizer(shared_rotation=True)``, pass ``rotation_seed=config[ROTATION_SEED_KEY]``
    from the fit config, which fastfed strategies fill in each round.

    Integer layers' differences travel exactly (in a signed type twice as wide, up to int64),
    float16 layers' in float32.
    """
    payload = encode_delta(updated, received, codec, seed, rotation_seed)
    return Parameters(tensors=[payload], tensor_type=TENSOR_TYPE)


def _client_update(parameters: Parameters, weight: float) -> ClientUpdate:
    try:
        if parameters.tensor_type == TENSOR_TYPE:
            if len(parameters.tensors) != 1:
                raise ValueError(f"a compressed update is one fastfed payload, got {len(parameters.tensors)} tensors")
            return ClientUpdate(None, parameters.tensors[0], weight)
        if parameters.tensor_type == NUMPY_STYPE:
            return ClientUpdate([npy_view(tensor) for tensor in parameters.tensors], None, weight)
        return ClientUpdate(parameters_to_ndarrays(parameters), None, weight)
    except (ValueError, TypeError, OSError) as error:
        return ClientUpdate(None, None, weight, f"unreadable parameters ({error})")


def _client_name(proxy: ClientProxy | None, position: int) -> str:
    return str(getattr(proxy, "cid", f"at position {position}"))


class _CheckedResults:
    """Remembers each round's global weights and aggregates results checked against them."""

    _fastfed_global: Parameters | None = None
    #: What to do with a result holding NaN or infinity: "skip" (drop it as a failure, the
    #: default), "raise" or "propagate", as for :func:`fastfed.weighted_mean`.
    non_finite: NonFinite = "skip"

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> Any:
        # Results are checked against the weights sent this round; compressed ones are deltas from them.
        self._fastfed_global = parameters
        instructions = super().configure_fit(server_round, parameters, client_manager)  # type: ignore[misc]
        rotation_seed = round_rotation_seed(self, server_round)
        for _, fit_ins in instructions:
            fit_ins.config[ROTATION_SEED_KEY] = rotation_seed
        return instructions

    def _aggregate_results(
        self, results: Results, failures: Failures, aggregate: Aggregate | None
    ) -> tuple[NDArrays | None, Results, Failures]:
        """(the aggregate or None, the results kept, the failures with the dropped results added)."""
        updates = [_client_update(fit_res.parameters, fit_res.num_examples) for _, fit_res in results]
        known = self._fastfed_global
        global_weights = None
        if known is not None:
            global_weights = (
                [npy_view(tensor) for tensor in known.tensors]
                if known.tensor_type == NUMPY_STYPE
                else parameters_to_ndarrays(known)
            )
        aggregated = aggregate_updates(updates, global_weights, aggregate, self.non_finite)
        for k, reason in aggregated.dropped.items():
            client = _client_name(results[k][0], k)
            log(WARNING, "aggregate_fit: dropping the result of client %s as a failure: %s", client, reason)
        kept = [result for k, result in enumerate(results) if k not in aggregated.dropped]
        return aggregated.layers, kept, [*failures, *(results[k] for k in aggregated.dropped)]

    def _accepts(self, kept: Results, failures: Failures) -> bool:
        """The strategy's own rules on the real counts: FedAvg's ``accept_failures`` and
        FaultTolerantFedAvg's completion rate."""
        if not kept or (not getattr(self, "accept_failures", True) and failures):
            return False
        if isinstance(self, FaultTolerantFedAvg):
            rate: float = self.completion_rate_fit
            return len(kept) / (len(kept) + len(failures)) >= rate
        return True

    def _fit_metrics(self, kept: Results) -> dict[str, Scalar]:
        metrics_fn = getattr(self, "fit_metrics_aggregation_fn", None)
        if metrics_fn is None:
            return {}
        return metrics_fn([(fit_res.num_examples, fit_res.metrics) for _, fit_res in kept])  # type: ignore[no-any-return]


class FastAggregationMixin(_CheckedResults):
    """Replaces the averaging of a Flower FedAvg-family strategy with fastfed's (see the module doc)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        refuse_other_aggregations(cls, FastAggregationMixin, FedAvg, "aggregate_fit", WEIGHTED_MEAN_STRATEGIES)

    def aggregate_fit(
        self, server_round: int, results: Results, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        parent = super()
        if not results or (not getattr(self, "accept_failures", True) and failures):
            return parent.aggregate_fit(server_round, results, failures)  # type: ignore[attr-defined, no-any-return]
        averaged, kept, failures = self._aggregate_results(results, failures, None)
        if averaged is None or not self._accepts(kept, failures):
            return None, {}
        first_proxy, first = kept[0]
        single = FitRes(status=first.status, parameters=ndarrays_to_parameters(averaged), num_examples=1, metrics={})
        # The failures were counted above; the strategy sees one result standing for all of them.
        aggregated, _ = parent.aggregate_fit(server_round, [(first_proxy, single)], [])  # type: ignore[attr-defined]
        return aggregated, self._fit_metrics(kept)  # (the strategy warned if it has no metrics function)


class _RobustAggregation(_CheckedResults):
    """FedMedian's and FedTrimmedAvg's ``aggregate_fit`` with fastfed's kernels and checked results."""

    def _robust_aggregate(self) -> Aggregate:
        raise NotImplementedError

    def aggregate_fit(
        self, server_round: int, results: Results, failures: Failures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results or (not getattr(self, "accept_failures", True) and failures):
            return None, {}
        aggregated, kept, failures = self._aggregate_results(results, failures, self._robust_aggregate())
        if aggregated is None or not self._accepts(kept, failures):
            return None, {}
        if getattr(self, "fit_metrics_aggregation_fn", None) is None and server_round == 1:
            log(WARNING, "No fit_metrics_aggregation_fn provided")  # as Flower's FedMedian and FedTrimmedAvg do
        return ndarrays_to_parameters(aggregated), self._fit_metrics(kept)


class FastFedAvg(FastAggregationMixin, FedAvg):
    """Flower's FedAvg with fastfed averaging."""


class FastFedAvgM(FastAggregationMixin, FedAvgM):
    """Flower's FedAvgM (server momentum) with fastfed averaging."""


class FastFedAdam(FastAggregationMixin, FedAdam):
    """Flower's FedAdam with fastfed averaging."""


class FastFedYogi(FastAggregationMixin, FedYogi):
    """Flower's FedYogi with fastfed averaging."""


class FastFedAdagrad(FastAggregationMixin, FedAdagrad):
    """Flower's FedAdagrad with fastfed averaging."""


class FastFedMedian(_RobustAggregation, FedMedian):
    """Flower's FedMedian (Yin et al. 2018) with :func:`fastfed.median`'s native kernel: the same
    coordinate-wise median for float layers; integer layers stay integers (Flower returns float64)."""

    def _robust_aggregate(self) -> Aggregate:
        return lambda clients, weights, non_finite: screened_median(clients, non_finite)


class FastFedTrimmedAvg(_RobustAggregation, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (Yin et al. 2018) with :func:`fastfed.trimmed_mean`'s native kernel:
    ``int(beta * K)`` values cut from each end of every coordinate, as Flower does."""

    def _robust_aggregate(self) -> Aggregate:
        beta = self.beta
        return lambda clients, weights, non_finite: screened_trimmed_mean(clients, beta, non_finite)
