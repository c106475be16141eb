"""Coordinate-wise median and trimmed mean of client updates: the Byzantine-robust aggregators of
Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".

Each coordinate is aggregated on its own over the K clients, unweighted (as in the paper and in
Flower's FedMedian and FedTrimmedAvg): a minority of arbitrarily bad clients cannot move the result
beyond the honest clients' range. The kernels sort every coordinate's K values with a sorting
network; results are bit-identical on the native, Numba and NumPy backends.

Dtypes: float layers are computed in float64 and returned in their own dtype (float16, float32 or
float64); integer layers are exact and stay integers (the midpoint of an even count, or a trimmed
mean, is rounded half to even). Flower returns float64 for integer layers instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .._backend import kernels
from .layers import (
    AllNonFinite,
    LayerSpec,
    NonFinite,
    Screened,
    Update,
    check_non_finite_policy,
    check_updates,
    non_finite_error,
)

__all__ = ["median", "screened_median", "screened_trimmed_mean", "trimmed_mean"]

# Runs one kernel over one layer's sources into out, flagging clients with non-finite values.
_Kernel = Callable[[list[np.ndarray], np.ndarray, np.ndarray], None]


def _robust(updates: object, kernel: Callable[[int], _Kernel], non_finite: NonFinite) -> Screened:
    """Runs ``kernel(k)`` (for k clients) on every layer, applying the non-finite policy."""
    non_finite = check_non_finite_policy(non_finite)
    clients, specs = check_updates(updates)
    active = list(range(len(clients)))
    while True:
        result, first_bad_layer = _run(clients, specs, active, kernel(len(active)))
        if non_finite == "propagate" or not first_bad_layer:
            return Screened(result, sorted(set(range(len(clients))) - set(active)))
        if non_finite == "raise":
            client = min(first_bad_layer)
            raise non_finite_error(client, first_bad_layer[client])
        active = [k for k in active if k not in first_bad_layer]
        if not active:
            everyone = list(range(len(clients)))
            raise AllNonFinite("every client holds NaN or infinity; nothing is left to aggregate", everyone)


def _run(
    clients: list[list[np.ndarray]], specs: list[LayerSpec], active: list[int], kernel: _Kernel
) -> tuple[list[np.ndarray], dict[int, int]]:
    """The aggregate of the ``active`` clients, and each flagged client's first non-finite layer."""
    result = []
    first_bad_layer: dict[int, int] = {}
    for j, spec in enumerate(specs):
        flags = np.zeros(len(active), dtype=np.uint8)
        out = np.empty(spec.size, dtype=np.float64 if spec.dtype.kind == "f" else spec.dtype)
        kernel([clients[k][j] for k in active], out, flags)
        for position in np.flatnonzero(flags).tolist():
            first_bad_layer.setdefault(active[position], j)
        result.append(out.astype(spec.dtype, copy=False).reshape(spec.shape))
    return result, first_bad_layer


def median(updates: Sequence[Update], *, non_finite: NonFinite = "raise") -> list[np.ndarray]:
    """The coordinate-wise median of K client updates (FedMedian, Yin et al. 2018).

    For an even K each coordinate takes the midpoint of its two middle values, as NumPy's
    ``median`` and Flower's FedMedian do (computed without overflow).

    Args:
      updates: K client updates, each a list of arrays with the same shapes and dtypes.
      non_finite: ``"raise"`` (the default) raises a ``ValueError`` naming a client and layer that
        hold NaN or infinity; ``"skip"`` leaves such clients out; ``"propagate"`` keeps them: a
        coordinate holding a NaN gives NaN, infinities are ordered like numbers.

    Returns:
      One array per layer with the clients' shape and dtype (see the module doc for integers).
    """
    return screened_median(updates, non_finite).layers


def screened_median(updates: Sequence[Update], non_finite: NonFinite = "skip") -> Screened:
    """:func:`median`, also saying which clients ``non_finite="skip"`` left out."""
    return _robust(updates, lambda k: kernels().aggregate.median, non_finite)


def trimmed_mean(updates: Sequence[Update], beta: float, *, non_finite: NonFinite = "raise") -> list[np.ndarray]:
    """The coordinate-wise trimmed mean of K client updates (FedTrimmedAvg, Yin et al. 2018).

    Each coordinate drops its ``int(beta * K)`` smallest and ``int(beta * K)`` largest values and
    averages the rest, as Flower's FedTrimmedAvg (and SciPy's ``trim_mean``) do.

    Args:
      updates: K client updates, each a list of arrays with the same shapes and dtypes.
      beta: the fraction cut from each end, in [0, 0.5).
      non_finite: as for :func:`median`; skipped clients do not count in K.

    Returns:
      One array per layer with the clients' shape and dtype (see the module doc for integers).
    """
    return screened_trimmed_mean(updates, beta, non_finite).layers


def screened_trimmed_mean(updates: Sequence[Update], beta: float, non_finite: NonFinite = "skip") -> Screened:
    """:func:`trimmed_mean`, also saying which clients ``non_finite="skip"`` left out."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating, np.integer)):
        raise TypeError(f"beta must be a number in [0, 0.5), got {beta!r}")
    if not (math.isfinite(beta) and 0.0 <= beta < 0.5):
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")

    def kernel(k: int) -> _Kernel:
        cut = int(beta * k)
        return lambda sources, out, flags: kernels().aggregate.trimmed_mean(sources, cut, out, flags)

    return _robust(updates, kernel, non_finite)
