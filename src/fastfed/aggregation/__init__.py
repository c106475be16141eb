"""Aggregation: weighted means of client updates, float (:mod:`.mean`) or encoded (:mod:`.encoded`)."""

from __future__ import annotations

from .encoded import weighted_mean_encoded
from .layers import LayerSpec, cast_to_layer
from .mean import Accumulator, weighted_mean, weighted_sum

__all__ = ["Accumulator", "LayerSpec", "cast_to_layer", "weighted_mean", "weighted_mean_encoded", "weighted_sum"]
