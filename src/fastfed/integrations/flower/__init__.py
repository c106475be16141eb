"""fastfed aggregation inside Flower's legacy strategies (``flwr.server.strategy``).

``FastAggregationMixin`` replaces the weighted averaging of any strategy of Flower's FedAvg family
with fastfed's exact, streaming kernels and keeps the strategy's own server-optimizer logic: the
mixin averages the K results, then hands the strategy's ``aggregate_fit`` a single result holding
the mean with ``num_examples=1``, for which Flower's own averaging is the identity. Put the mixin
first: ``class MyStrategy(FastAggregationMixin, FedAdam)``.

Clients may send fastfed-compressed updates with :func:`compress_parameters`; the strategy
dequantizes and accumulates them in one pass. For the Message API (``flwr.serverapp.strategy``),
see :mod:`fastfed.integrations.flower.serverapp`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.common import FitRes, NDArrays, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from ...compression import Codec
from ._averaging import (
    NUMPY_STYPE,
    ROTATION_SEED_KEY,
    TENSOR_TYPE,
    average_results,
    encode_delta,
    npy_view,
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
    "FastFedYogi",
    "compress_parameters",
]


def compress_parameters(
    updated: NDArrays, received: NDArrays, codec: Codec, *, seed: int | None = None, rotation_seed: int | None = None
) -> Parameters:
    """Client side: the update ``updated - received`` as one fastfed payload in Flower ``Parameters``.

    Return it from ``fit`` (e.g. a ``Client`` returning ``FitRes(parameters=...)``); a fastfed
    strategy decodes and averages it in one pass and adds the round's global weights back. For
    ``RotatedQuantizer(shared_rotation=True)``, pass ``rotation_seed=config[ROTATION_SEED_KEY]``
    from the fit config, which fastfed strategies fill in each round.
    """
    payload = encode_delta(updated, received, codec, seed, rotation_seed)
    return Parameters(tensors=[payload], tensor_type=TENSOR_TYPE)


class FastAggregationMixin:
    """Replaces the averaging of a Flower FedAvg-family strategy with fastfed's (see the module doc)."""

    _fastfed_global: Parameters | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> Any:
        # Compressed updates are deltas from the weights sent this round; remember them.
        self._fastfed_global = parameters
        instructions = super().configure_fit(server_round, parameters, client_manager)  # type: ignore[misc]
        rotation_seed = round_rotation_seed(self, server_round)
        for _, fit_ins in instructions:
            fit_ins.config[ROTATION_SEED_KEY] = rotation_seed
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        parent = super()
        if not results or (not getattr(self, "accept_failures", True) and failures):
            return parent.aggregate_fit(server_round, results, failures)  # type: ignore[attr-defined, no-any-return]
        plain: list[tuple[list[np.ndarray], float]] = []
        encoded: list[tuple[bytes, float]] = []
        for _, fit_res in results:
            parameters = fit_res.parameters
            if parameters.tensor_type == TENSOR_TYPE:
                encoded.append((parameters.tensors[0], fit_res.num_examples))
            elif parameters.tensor_type == NUMPY_STYPE:
                plain.append(([npy_view(tensor) for tensor in parameters.tensors], fit_res.num_examples))
            else:
                plain.append((parameters_to_ndarrays(parameters), fit_res.num_examples))
        known = self._fastfed_global
        global_weights = parameters_to_ndarrays(known) if encoded and known is not None else None
        averaged = average_results(plain, encoded, global_weights)
        first_proxy, first = results[0]
        single = FitRes(status=first.status, parameters=ndarrays_to_parameters(averaged), num_examples=1, metrics={})
        aggregated, _ = parent.aggregate_fit(server_round, [(first_proxy, single)], failures)  # type: ignore[attr-defined]
        metrics: dict[str, Scalar] = {}
        metrics_fn = getattr(self, "fit_metrics_aggregation_fn", None)
        if metrics_fn is not None:
            metrics = metrics_fn([(fit_res.num_examples, fit_res.metrics) for _, fit_res in results])
        return aggregated, metrics


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
