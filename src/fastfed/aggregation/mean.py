"""Weighted means of client model updates: the aggregation step of FedAvg (McMahan et al. 2017).

All arithmetic is in float64 and independent of the backend, so results are bit-identical on
native, Numba and NumPy kernels. Float layers keep their dtype; integer layers (step counters,
batch-norm counts) are rounded to the nearest integer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .._backend import kernels
from .encoded import accumulate_entry, parse_client
from .layers import (
    ArrayLike,
    LayerSpec,
    Update,
    cast_to_layer,
    check_update,
    check_weight,
    kernel_output,
    layers_of,
    match_specs,
)

__all__ = ["Accumulator", "weighted_mean", "weighted_sum"]


def _checked_out(out: object, specs: list[LayerSpec], as_sum: bool) -> list[np.ndarray]:
    """The caller's output arrays, one per layer, each writable, contiguous and shaped like the layer."""
    if isinstance(out, np.ndarray) or not isinstance(out, Sequence):
        raise TypeError(f"out: expected a list of arrays (one per layer), got {type(out).__name__}")
    if len(out) != len(specs):
        raise ValueError(f"out: {len(out)} arrays for {len(specs)} layers")
    for j, (array, spec) in enumerate(zip(out, specs)):
        dtype = np.dtype(np.float64) if as_sum else spec.dtype
        if not isinstance(array, np.ndarray) or array.shape != spec.shape or array.dtype != dtype:
            found = f"{array.shape} {array.dtype}" if isinstance(array, np.ndarray) else type(array).__name__
            raise ValueError(f"out[{j}]: expected a {spec.shape} {dtype} array, got {found}")
        if not (array.flags.writeable and array.flags.c_contiguous and array.flags.aligned):
            raise ValueError(f"out[{j}]: expected a writable, C-contiguous, aligned array")
    return list(out)


def _combine(
    updates: object, weights: Sequence[float] | np.ndarray | None, as_sum: bool, out: object = None
) -> list[np.ndarray]:
    # Typed as object: this is the boundary where anything a user passes is checked.
    if isinstance(updates, np.ndarray) or not isinstance(updates, Sequence):
        raise TypeError(f"updates: expected a sequence of client updates, got {type(updates).__name__}")
    if len(updates) == 0:
        raise ValueError("updates: expected at least one client update, got none")
    if weights is None:
        weight_values = [1.0] * len(updates)
    else:
        weight_list = list(np.asarray(weights).reshape(-1)) if isinstance(weights, np.ndarray) else list(weights)
        if len(weight_list) != len(updates):
            raise ValueError(f"got {len(updates)} client updates but {len(weight_list)} weights")
        weight_values = [check_weight(w, k) for k, w in enumerate(weight_list)]
    specs: list[LayerSpec] | None = None
    clients: list[list[np.ndarray]] = []
    for k, update in enumerate(updates):
        flat, own = check_update(update, k, specs)
        specs = specs or own
        clients.append(flat)
    assert specs is not None
    total = math.fsum(weight_values)
    if total == 0.0 and not as_sum:
        raise ValueError("the weights sum to zero; at least one client needs a positive weight")
    # Zero-weight clients contribute nothing (and 0 * inf must not poison the mean).
    active = [k for k, w in enumerate(weight_values) if w > 0.0]
    active_weights = np.array([weight_values[k] for k in active], dtype=np.float64)
    kernel = kernels().aggregate
    divisor = 1.0 if as_sum else total
    destinations = None if out is None else _checked_out(out, specs, as_sum)
    result = []
    for j, spec in enumerate(specs):
        destination = None if destinations is None else destinations[j]
        # Float means and sums are written by the kernel straight into a caller's array.
        if destination is not None and (as_sum or spec.dtype in (np.float32, np.float64)):
            values, direct = destination.reshape(-1), True
        else:
            values, direct = kernel_output(spec, as_sum), False
        if active:
            kernel.weighted_sum_layer([clients[k][j] for k in active], active_weights, divisor, values)
        else:
            values[:] = 0.0
        layer = values.reshape(spec.shape) if as_sum else cast_to_layer(values, spec)
        if destination is not None and not direct:
            destination[...] = layer
        result.append(layer if destination is None else destination)
    return result


def weighted_sum(
    updates: Sequence[Update],
    weights: Sequence[float] | np.ndarray | None = None,
    *,
    out: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """``sum_k weights[k] * updates[k]`` layer by layer, as float64 arrays.

    The result stays float64 whatever the input dtypes, so partial sums from several workers can be
    added together and divided by their total weight without losing precision. ``out``: float64
    arrays shaped like the layers to write the sums into, as for :func:`weighted_mean`.
    """
    return _combine(updates, weights, as_sum=True, out=out)


def weighted_mean(
    updates: Sequence[Update],
    weights: Sequence[float] | np.ndarray | None = None,
    *,
    out: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """The weighted mean of K client updates, layer by layer.

    Args:
      updates: K client updates, each a list of arrays with the same shapes and dtypes.
      weights: K finite, non-negative numbers (e.g. example counts) with a positive sum;
        ``None`` (the default) weighs clients equally.
      out: optional arrays, one per layer with the clients' shape and dtype, that receive the mean
        and are returned (e.g. last round's global model). Reusing them saves the operating system
        zeroing fresh pages for every result, which costs as much as reading several clients.

    Returns:
      One array per layer with the clients' shape and dtype. Integer layers are rounded to nearest.
    """
    return _combine(updates, weights, as_sum=False, out=out)


class Accumulator:
    """A streaming weighted mean: add clients one at a time, holding one model-sized float64 sum.

    This is how FedAvg servers avoid keeping every client's update in memory: each update is folded
    into the running sum as it arrives and can be freed at once. Not thread-safe; use one per thread
    and combine them with :meth:`merge`.
    """

    def __init__(self) -> None:
        self._specs: list[LayerSpec] | None = None
        self._sums: list[np.ndarray] = []
        self._weights: list[float] = []
        self.count = 0

    @property
    def total_weight(self) -> float:
        """The exact (``math.fsum``) total of the weights added, as :func:`weighted_mean` computes it."""
        return math.fsum(self._weights)

    @property
    def specs(self) -> list[LayerSpec] | None:
        """The layer shapes and dtypes fixed by the first update, or ``None`` before it."""
        return self._specs

    def _start(self, specs: list[LayerSpec]) -> None:
        self._specs = specs
        self._sums = [np.zeros(spec.size, dtype=np.float64) for spec in specs]

    def add(self, update: Update, weight: float = 1.0) -> None:
        """Folds one client's update in with ``weight``; the update is checked before anything changes."""
        client = self.count
        weight = check_weight(weight, client)
        flat, specs = check_update(update, client, self._specs)
        if self._specs is None:
            self._start(specs)
        if weight > 0.0:
            kernel = kernels().aggregate
            for acc, values in zip(self._sums, flat):
                kernel.accumulate(acc, values, weight)
        self.count += 1
        self._weights.append(weight)

    def add_encoded(self, payload: bytes | bytearray | memoryview, weight: float = 1.0) -> None:
        """Folds in a :func:`fastfed.compression.encode` payload without materialising the float update.

        Quantized tensors are unpacked, dequantized and accumulated in one fused pass; the result
        equals decoding to float32 and calling :meth:`add`, bit for bit. The payload is validated
        completely (raising :class:`fastfed.DecodeError`) before anything changes.
        """
        client = self.count
        weight = check_weight(weight, client)
        entries = parse_client(payload, client)
        specs = [LayerSpec(entry.shape, entry.dtype) for entry in entries]
        match_specs(specs, self._specs, client)
        if self._specs is None:
            self._start(specs)
        if weight > 0.0:
            for acc, entry in zip(self._sums, entries):
                accumulate_entry(acc, entry, weight)
        self.count += 1
        self._weights.append(weight)

    def add_weighted_sum(self, sums: Sequence[ArrayLike], total_weight: float, count: int = 1) -> None:
        """Folds in a partial sum (from :func:`weighted_sum` on another worker) of ``count`` clients."""
        total_weight = check_weight(total_weight, self.count)
        if self._specs is None:
            raise ValueError("add_weighted_sum needs the layer specs: add one update first, or use from_specs()")
        layers = layers_of(sums, self.count)
        if len(layers) != len(self._specs):
            raise ValueError(f"partial sum has {len(layers)} layers; expected {len(self._specs)}")
        arrays = []
        for j, (layer, spec) in enumerate(zip(layers, self._specs)):
            array = np.asarray(layer, dtype=np.float64)
            if array.shape != spec.shape:
                raise ValueError(f"partial sum, layer {j}: shape {array.shape} does not match {spec.shape}")
            arrays.append(np.require(array, requirements=("C", "A")).reshape(-1))
        kernel = kernels().aggregate
        for acc, values in zip(self._sums, arrays):
            kernel.accumulate(acc, values, 1.0)
        self.count += count
        self._weights.append(total_weight)

    @classmethod
    def from_specs(cls, specs: Sequence[LayerSpec]) -> Accumulator:
        """An empty accumulator for updates with these layer shapes and dtypes."""
        accumulator = cls()
        accumulator._start(list(specs))
        return accumulator

    def merge(self, other: Accumulator) -> None:
        """Adds another accumulator's clients into this one."""
        if other._specs is None:
            return
        if self._specs is None:
            self._start(other._specs)
        elif other._specs != self._specs:
            raise ValueError("cannot merge accumulators of different layer shapes or dtypes")
        self.add_weighted_sum(
            [s.reshape(spec.shape) for s, spec in zip(other._sums, other._specs)],
            other.total_weight,
            other.count,
        )

    def weighted_sums(self) -> list[np.ndarray]:
        """The running float64 sums, shaped like the layers (copies)."""
        if self._specs is None:
            raise ValueError("no update has been added")
        return [s.reshape(spec.shape).copy() for s, spec in zip(self._sums, self._specs)]

    def result(self) -> list[np.ndarray]:
        """The weighted mean of everything added so far, in the layers' dtypes."""
        if self._specs is None or self.count == 0:
            raise ValueError("no update has been added")
        total = self.total_weight
        if total == 0.0:
            raise ValueError("the weights sum to zero; at least one client needs a positive weight")
        return [cast_to_layer(acc / total, spec) for acc, spec in zip(self._sums, self._specs)]

    def reset(self) -> None:
        """Forgets every update but keeps the layer specs and buffers for the next round."""
        for acc in self._sums:
            acc.fill(0.0)
        self._weights.clear()
        self.count = 0
