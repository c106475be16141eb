"""Weighted means of client model updates: the aggregation step of FedAvg (McMahan et al. 2017).

All arithmetic is in float64 and independent of the backend, so results are bit-identical on
native, Numba and NumPy kernels. Float layers keep their dtype; integer layers (step counters,
batch-norm counts) are rounded to the nearest integer, and 64-bit integer layers are averaged in
exact integer arithmetic. Weights are scaled by a power of two before use (exact), so any finite
non-negative weights with a positive sum give the right mean, 1e-300 and 1e308 alike.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

import numpy as np

from .._backend import kernels
from .encoded import accumulate_entry, parse_client, raw_or_nothing
from .layers import (
    AllNonFinite,
    ArrayLike,
    LayerSpec,
    NonFinite,
    Screened,
    Update,
    cast_to_layer,
    check_non_finite_policy,
    check_update,
    check_updates,
    check_weight,
    check_weights,
    exact_integer_mean,
    exact_weight,
    first_non_finite_layer,
    is_exact_integer,
    kernel_output,
    layers_of,
    match_specs,
    non_finite_error,
    normalized_weights,
    refuse_masked,
    rounded_quotient,
)

__all__ = ["Accumulator", "screened_mean", "weighted_mean", "weighted_sum"]


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


def _weighted_layers(
    clients: list[list[np.ndarray]],
    weights: list[float],
    specs: list[LayerSpec],
    as_sum: bool,
    destinations: list[np.ndarray] | None,
) -> list[np.ndarray]:
    """Float64 sums (``as_sum``) or means in the layers' dtypes, of the clients with positive weight,
    written into ``destinations`` when given."""
    # Zero-weight clients contribute nothing (and 0 * inf must not poison the mean).
    active = [k for k, w in enumerate(weights) if w > 0.0]
    scaled, total, exponent = normalized_weights([weights[k] for k in active])
    kernel = kernels().aggregate
    result = []
    for j, spec in enumerate(specs):
        destination = None if destinations is None else destinations[j]
        sources = [clients[k][j] for k in active]
        if not as_sum and is_exact_integer(spec):
            layer = exact_integer_mean(sources, scaled.tolist(), spec.dtype).reshape(spec.shape)
        else:
            # Float means and sums are written by the kernel straight into a caller's array.
            direct = destination is not None and (as_sum or spec.dtype in (np.float32, np.float64))
            values = destination.reshape(-1) if destination is not None and direct else kernel_output(spec, as_sum)
            if not active:
                values[:] = 0.0
            elif as_sum:
                kernel.weighted_sum_layer(sources, scaled, 1.0, values)
                with np.errstate(over="ignore"):
                    np.ldexp(values, exponent, out=values)  # undo the scaling: exact, or inf where it overflows
            else:
                kernel.weighted_sum_layer(sources, scaled, total, values)
            layer = values.reshape(spec.shape) if as_sum else cast_to_layer(values, spec)
            if destination is not None and direct:  # the kernel wrote into the caller's array
                result.append(destination)
                continue
        if destination is not None:
            destination[...] = layer
            layer = destination
        result.append(layer)
    return result


def _combine(
    updates: object, weights: object, *, as_sum: bool, non_finite: NonFinite, out: object = None
) -> tuple[list[np.ndarray], list[int]]:
    non_finite = check_non_finite_policy(non_finite)
    clients, specs = check_updates(updates)
    destinations = None if out is None else _checked_out(out, specs, as_sum)
    weight_values = check_weights(weights, len(clients))
    if not as_sum and not any(weight_values):
        raise ValueError("the weights sum to zero; at least one client needs a positive weight")
    if non_finite == "propagate":  # nothing to check: the kernels write straight into the caller's arrays
        return _weighted_layers(clients, weight_values, specs, as_sum, destinations), []
    skipped: list[int] = []
    while True:
        # One pass over the updates: a result that is finite proves every contributing value finite,
        # so the clients are searched only when it is not. The result reaches the caller's arrays
        # only once checked, so that an error leaves them as they were.
        result = _weighted_layers(clients, weight_values, specs, as_sum, None)
        bad_layers = [j for j, layer in enumerate(result) if first_non_finite_layer([layer]) is not None]
        culprits = [
            k
            for k, w in enumerate(weight_values)
            if w > 0.0 and first_non_finite_layer([clients[k][j] for j in bad_layers]) is not None
        ]
        if not culprits:  # finite, or an overflow of finite values (a weighted sum of huge numbers)
            if destinations is None:
                return result, skipped
            for destination, values in zip(destinations, result):
                destination[...] = values
            return destinations, skipped
        if non_finite == "raise":
            client = culprits[0]
            layer = bad_layers[first_non_finite_layer([clients[client][j] for j in bad_layers]) or 0]
            raise non_finite_error(client, layer)
        for k in culprits:
            weight_values[k] = 0.0
        skipped += culprits
        if not as_sum and not any(weight_values):
            everyone = sorted(skipped)
            message = f"every client with a positive weight holds NaN or infinity (clients {everyone})"
            raise AllNonFinite(message, everyone)


def weighted_sum(
    updates: Sequence[Update],
    weights: Sequence[float] | np.ndarray | None = None,
    *,
    out: Sequence[np.ndarray] | None = None,
    non_finite: NonFinite = "raise",
) -> list[np.ndarray]:
    """``sum_k weights[k] * updates[k]`` layer by layer, as float64 arrays.

    The result stays float64 whatever the input dtypes, so partial sums from several workers can be
    added together and divided by their total weight without losing precision. ``out``: float64
    arrays shaped like the layers to write the sums into; ``non_finite``: as for :func:`weighted_mean`.
    """
    return _combine(updates, weights, as_sum=True, non_finite=non_finite, out=out)[0]


def weighted_mean(
    updates: Sequence[Update],
    weights: Sequence[float] | np.ndarray | None = None,
    *,
    out: Sequence[np.ndarray] | None = None,
    non_finite: NonFinite = "raise",
) -> list[np.ndarray]:
    """The weighted mean of K client updates, layer by layer.

    Args:
      updates: K client updates, each a list of arrays with the same shapes and dtypes. Masked
        arrays are refused (their masks would be lost).
      weights: K finite, non-negative numbers (e.g. example counts) with a positive sum;
        ``None`` (the default) weighs clients equally.
      out: optional arrays, one per layer with the clients' shape and dtype, that receive the mean
        and are returned (e.g. last round's global model). With ``non_finite="propagate"`` the
        kernels write straight into them, which saves the operating system zeroing fresh pages for
        every result (as much as reading several clients); otherwise the mean is checked first and
        then copied in, so that an error leaves them as they were.
      non_finite: what to do with a client whose update holds NaN or infinity. ``"raise"`` (the
        default) raises a ``ValueError`` naming the client and layer, so a poisoned mean is never
        returned silently; ``"skip"`` leaves such clients out, as if their weight were zero (the
        FedAvg servers of :mod:`fastfed.learning` and the Flower strategies drop them the same way);
        ``"propagate"`` lets the values into the mean, as plain IEEE arithmetic would.

    Returns:
      One array per layer with the clients' shape and dtype. Integer layers are rounded to nearest
      (half to even); 64-bit integer layers are averaged exactly.
    """
    return _combine(updates, weights, as_sum=False, non_finite=non_finite, out=out)[0]


def screened_mean(
    updates: Sequence[Update], weights: Sequence[float] | np.ndarray | None = None, non_finite: NonFinite = "skip"
) -> Screened:
    """:func:`weighted_mean`, also saying which clients ``non_finite="skip"`` left out."""
    return Screened(*_combine(updates, weights, as_sum=False, non_finite=non_finite))


class Accumulator:
    """A streaming weighted mean: add clients one at a time, holding one model-sized float64 sum.

    This is how FedAvg servers avoid keeping every client's update in memory: each update is folded
    into the running sum as it arrives and can be freed at once. :meth:`add`, :meth:`add_encoded`,
    :meth:`add_weighted_sum` and :meth:`merge` may be called from several threads at once; each
    update is validated outside the lock and folded in under it.

    Args:
      non_finite: as for :func:`weighted_mean`; with ``"skip"``, :meth:`add` leaves such an update
        out and records its client index in :attr:`skipped`.
    """

    def __init__(self, *, non_finite: NonFinite = "raise") -> None:
        self.non_finite = check_non_finite_policy(non_finite)
        self._lock = threading.Lock()
        self._specs: list[LayerSpec] | None = None
        # The sums and weights are kept scaled by 2**-exponent, exponent being that of the largest
        # weight so far: exact, and no product overflows however large the weights.
        self._sums: list[np.ndarray] = []
        self._weights: list[float] = []
        self._exponent: int | None = None
        # 64-bit integer layers also keep exact sums, sum_k (w_k * 2**1074) * x_k, as Python integers;
        # None once a float64 partial sum (add_weighted_sum) makes exactness impossible.
        self._exact: dict[int, np.ndarray] | None = {}
        self._exact_total = 0
        self.count = 0
        self.skipped: list[int] = []

    @property
    def total_weight(self) -> float:
        """The exact (``math.fsum``) total of the weights added, as :func:`weighted_mean` computes it."""
        with self._lock:
            return self._total_weight()

    def _total_weight(self) -> float:
        total = math.fsum(self._weights)
        try:
            return math.ldexp(total, self._exponent or 0)
        except OverflowError:  # weights of 1e308: their total is beyond float64
            return math.inf

    @property
    def specs(self) -> list[LayerSpec] | None:
        """The layer shapes and dtypes fixed by the first update, or ``None`` before it."""
        return self._specs

    def _next_client(self) -> int:
        return self.count + len(self.skipped)

    def _start(self, specs: list[LayerSpec]) -> None:
        self._specs = specs
        self._sums = [np.zeros(spec.size, dtype=np.float64) for spec in specs]
        if self._exact is not None:
            self._exact = self._zero_exact_sums(specs)

    @staticmethod
    def _zero_exact_sums(specs: list[LayerSpec]) -> dict[int, np.ndarray]:
        return {j: np.zeros(spec.size, dtype=object) for j, spec in enumerate(specs) if is_exact_integer(spec)}

    def _scale_for(self, weight: float) -> float:
        """``weight`` scaled like the sums, first rescaling them if ``weight`` is the largest yet."""
        exponent = math.frexp(weight)[1]
        if self._exponent is None:
            self._exponent = exponent
        elif exponent > self._exponent:
            shift = self._exponent - exponent
            for acc in self._sums:
                np.ldexp(acc, shift, out=acc)
            self._weights = [math.ldexp(w, shift) for w in self._weights]
            self._exponent = exponent
        return math.ldexp(weight, -self._exponent)

    def _screen(self, layers: list[np.ndarray], weight: float, client: int) -> bool:
        """Whether to fold the update in, by the non-finite policy."""
        if self.non_finite == "propagate" or weight == 0.0:
            return True
        layer = first_non_finite_layer(layers)
        if layer is None:
            return True
        if self.non_finite == "raise":
            raise non_finite_error(client, layer)
        return False

    def _fold(
        self,
        specs: list[LayerSpec],
        client: int,
        weight: float,
        folded: bool,
        accumulate: Callable[[list[np.ndarray], float], None],
        integers: list[np.ndarray],
    ) -> None:
        """Adds one validated client under the lock: ``accumulate(sums, scaled_weight)`` folds its
        float values in, ``integers`` holds its layers' values for the exact integer sums."""
        with self._lock:
            match_specs(specs, self._specs, client)  # again: another thread may have fixed the specs
            if self._specs is None:
                self._start(specs)
            if not folded:
                self.skipped.append(client)
                return
            if weight > 0.0:
                scaled = self._scale_for(weight)
                accumulate(self._sums, scaled)
                if self._exact is not None:
                    exact = exact_weight(weight)
                    for j, sums in self._exact.items():
                        sums += exact * integers[j].astype(object)
                    self._exact_total += exact
                self._weights.append(scaled)
            self.count += 1

    def add(self, update: Update, weight: float = 1.0) -> None:
        """Folds one client's update in with ``weight``; the update is checked before anything changes."""
        client = self._next_client()
        weight = check_weight(weight, client)
        flat, specs = check_update(update, client, self._specs)
        folded = self._screen(flat, weight, client)

        def accumulate(sums: list[np.ndarray], scaled: float) -> None:
            kernel = kernels().aggregate
            for acc, values in zip(sums, flat):
                kernel.accumulate(acc, values, scaled)

        self._fold(specs, client, weight, folded, accumulate, flat)

    def add_encoded(self, payload: bytes | bytearray | memoryview, weight: float = 1.0) -> None:
        """Folds in a :func:`fastfed.compression.encode` payload without materialising the float update.

        Quantized tensors are unpacked, dequantized and accumulated in one fused pass; the result
        equals decoding to float32 and calling :meth:`add`, bit for bit. The payload is validated
        completely (raising :class:`fastfed.DecodeError`) before anything changes. Quantized tensors
        are finite by construction; raw ones are screened by the non-finite policy.
        """
        client = self._next_client()
        weight = check_weight(weight, client)
        entries = parse_client(payload, client)
        specs = [LayerSpec(entry.shape, entry.dtype) for entry in entries]
        match_specs(specs, self._specs, client)
        raw = [raw_or_nothing(entry) for entry in entries]
        folded = self._screen(raw, weight, client)

        def accumulate(sums: list[np.ndarray], scaled: float) -> None:
            for acc, entry in zip(sums, entries):
                accumulate_entry(acc, entry, scaled)

        self._fold(specs, client, weight, folded, accumulate, raw)

    def add_weighted_sum(self, sums: Sequence[ArrayLike], total_weight: float, count: int = 1) -> None:
        """Folds in a partial sum (from :func:`weighted_sum` on another worker) of ``count`` clients.

        A float64 partial sum cannot carry 64-bit integers exactly, so after it the accumulator's
        64-bit integer layers are averaged in float64.
        """
        total_weight = check_weight(total_weight, self.count)
        refuse_masked(sums, "partial sum")
        if self._specs is None:
            raise ValueError("add_weighted_sum needs the layer specs: add one update first, or use from_specs()")
        layers = layers_of(sums, self.count)
        if len(layers) != len(self._specs):
            raise ValueError(f"partial sum has {len(layers)} layers; expected {len(self._specs)}")
        arrays = []
        for j, (layer, spec) in enumerate(zip(layers, self._specs)):
            refuse_masked(layer, f"partial sum, layer {j}")
            array = np.asarray(layer, dtype=np.float64)
            if array.shape != spec.shape:
                raise ValueError(f"partial sum, layer {j}: shape {array.shape} does not match {spec.shape}")
            arrays.append(array.reshape(-1))
        with self._lock:
            self._add_scaled_sums(arrays, [total_weight], 0, count)
            self._exact = None

    def _add_scaled_sums(self, sums: list[np.ndarray], weights: list[float], exponent: int, count: int) -> None:
        """Adds sums and weights that are scaled by ``2**-exponent`` (under the lock)."""
        positive = [w for w in weights if w > 0.0]
        if positive:
            largest = max(positive)
            self._scale_for(math.ldexp(largest, exponent) if exponent else largest)
            shift = exponent - (self._exponent or 0)
            kernel = kernels().aggregate
            with np.errstate(over="ignore"):
                for acc, values in zip(self._sums, sums):
                    kernel.accumulate(acc, np.ldexp(values, shift), 1.0)
            self._weights.extend(math.ldexp(w, shift) for w in positive)
        self.count += count

    @classmethod
    def from_specs(cls, specs: Sequence[LayerSpec], *, non_finite: NonFinite = "raise") -> Accumulator:
        """An empty accumulator for updates with these layer shapes and dtypes."""
        accumulator = cls(non_finite=non_finite)
        accumulator._start(list(specs))
        return accumulator

    def merge(self, other: Accumulator) -> None:
        """Adds another accumulator's clients into this one."""
        with other._lock:  # a snapshot, so that the two locks are never held together
            specs, exponent, count = other._specs, other._exponent or 0, other.count
            sums = [acc.copy() for acc in other._sums]
            weights = list(other._weights)
            exact = None if other._exact is None else {j: s.copy() for j, s in other._exact.items()}
            exact_total = other._exact_total
        if specs is None:
            return
        with self._lock:
            if self._specs is None:
                self._start(specs)
            elif specs != self._specs:
                raise ValueError("cannot merge accumulators of different layer shapes or dtypes")
            self._add_scaled_sums(sums, weights, exponent, count)
            if self._exact is None or exact is None:
                self._exact = None
            else:
                for j, values in exact.items():
                    self._exact[j] += values
                self._exact_total += exact_total

    def weighted_sums(self) -> list[np.ndarray]:
        """The running float64 sums, shaped like the layers (copies)."""
        with self._lock:
            if self._specs is None:
                raise ValueError("no update has been added")
            with np.errstate(over="ignore"):
                return [
                    np.ldexp(s, self._exponent or 0).reshape(spec.shape) for s, spec in zip(self._sums, self._specs)
                ]

    def result(self) -> list[np.ndarray]:
        """The weighted mean of everything added so far, in the layers' dtypes."""
        with self._lock:
            if self._specs is None or self.count == 0:
                raise ValueError("no update has been added")
            total = math.fsum(self._weights)
            if total == 0.0:
                raise ValueError("the weights sum to zero; at least one client needs a positive weight")
            means = []
            for j, (acc, spec) in enumerate(zip(self._sums, self._specs)):
                if self._exact is not None and j in self._exact:
                    means.append(rounded_quotient(self._exact[j], self._exact_total, spec.dtype).reshape(spec.shape))
                else:
                    means.append(cast_to_layer(acc / total, spec))
            return means

    def reset(self) -> None:
        """Forgets every update but keeps the layer specs and buffers for the next round."""
        with self._lock:
            for acc in self._sums:
                acc.fill(0.0)
            self._weights.clear()
            self._exponent = None
            self._exact = {} if self._specs is None else self._zero_exact_sums(self._specs)
            self._exact_total = 0
            self.count = 0
            self.skipped.clear()
