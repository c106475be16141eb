"""NumPy reference for ``cpp/aggregate``: weighted sums accumulated in float64.

Every element is summed in client order, ``acc = ((0 + w0*x0) + w1*x1) + ...``, then divided once;
the native and Numba kernels follow exactly this order, so all three agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._checks import check_accumulate, check_weighted_sum


def weighted_sum_layer(sources: Sequence[np.ndarray], weights: np.ndarray, divisor: float, out: np.ndarray) -> None:
    """``out[:] = sum_k weights[k] * sources[k] / divisor``, accumulated in float64."""
    weights = check_weighted_sum(sources, weights, out)
    acc = np.zeros(out.shape[0], dtype=np.float64)
    for source, weight in zip(sources, weights):
        acc += weight * source.astype(np.float64)
    out[:] = acc / divisor


def accumulate(acc: np.ndarray, source: np.ndarray, weight: float) -> None:
    """``acc += weight * source`` in float64."""
    check_accumulate(acc, source)
    acc += weight * source.astype(np.float64)
