"""Aggregation: weighted means of client updates, float (:mod:`.mean`) or encoded (:mod:`.encoded`),
and the robust coordinate-wise median and trimmed mean (:mod:`.robust`)."""

from __future__ import annotations

from .encoded import weighted_mean_encoded
from .layers import LayerSpec, cast_to_layer
from .mean import Accumulator, weighted_mean, weighted_sum
from .robust import median, trimmed_mean

__all__ = [
    "Accumulator",
    "LayerSpec",
    "cast_to_layer",
    "median",
    "trimmed_mean",
    "weighted_mean",
    "weighted_mean_encoded",
    "weighted_sum",
]
