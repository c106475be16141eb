"""Weighted means of client model updates: the aggregation step of FedAvg (McMahan et al. 2017).

An update is what Keras ``get_weights()``, Flower ``NDArrays`` or a NumPy-converted PyTorch
``state_dict`` give: a list of arrays, one per layer. All arithmetic is in float64 and independent
of the backend, so results are bit-identical on native, Numba and NumPy kernels. Float layers keep
their dtype; integer layers (step counters, batch-norm counts) are rounded to the nearest integer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._backend import kernels
from .compression.quantizer import dequantization_step
from .compression.wire import (
    CHECKSUM,
    CODEC_RAW,
    CODEC_UNIFORM,
    Entry,
    crc32,
    match_layout,
    parse,
    parse_structure,
    raw_view,
    stored_checksum,
)
from .errors import DecodeError

__all__ = ["Accumulator", "LayerSpec", "weighted_mean", "weighted_mean_encoded", "weighted_sum"]

ArrayLike = Any
Update = Sequence[ArrayLike]


class LayerSpec:
    """The shape and dtype every client must send for one layer."""

    __slots__ = ("dtype", "shape", "size")

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.shape = shape
        self.dtype = dtype
        self.size = math.prod(shape)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerSpec) and (self.shape, self.dtype) == (other.shape, other.dtype)

    def __hash__(self) -> int:
        return hash((self.shape, self.dtype))

    def __repr__(self) -> str:
        return f"LayerSpec(shape={self.shape}, dtype={self.dtype})"


def _check_weight(weight: Any, client: int) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise TypeError(f"weight of client {client} is {weight!r}; expected a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"weight of client {client} is {value}; weights must be finite and non-negative")
    return value


def _as_layer(array: ArrayLike, client: int, layer: int) -> np.ndarray:
    """A 1-D, C-contiguous, aligned, native-byte-order view (or copy) of one layer of one client."""
    try:
        array = np.asarray(array)
    except (TypeError, ValueError) as error:
        raise TypeError(f"client {client}, layer {layer}: not convertible to an array ({error})") from None
    if array.dtype.kind not in "fiu":
        raise TypeError(
            f"client {client}, layer {layer}: dtype {array.dtype} cannot be averaged; expected a float or integer array"
        )
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    flat: np.ndarray = np.require(array, requirements=("C", "A")).reshape(-1)  # as the kernels require
    return flat


def _layers_of(update: object, client: int) -> list[ArrayLike]:
    if isinstance(update, np.ndarray) or not isinstance(update, Sequence) or isinstance(update, (str, bytes)):
        raise TypeError(f"client {client}: expected a list of arrays (one per layer), got {type(update).__name__}")
    return list(update)


def _match_specs(specs: list[LayerSpec], expected: list[LayerSpec] | None, client: int) -> None:
    """Raises unless a client's layers have the shapes and dtypes of ``expected`` (the first client's)."""
    if expected is None:
        return
    if len(specs) != len(expected):
        raise ValueError(f"client {client} has {len(specs)} layers; expected {len(expected)} like the first client")
    for j, (spec, want) in enumerate(zip(specs, expected)):
        if spec.shape != want.shape:
            raise ValueError(f"client {client}, layer {j}: shape {spec.shape} does not match the expected {want.shape}")
        if spec.dtype != want.dtype:
            raise TypeError(f"client {client}, layer {j}: dtype {spec.dtype} does not match the expected {want.dtype}")


def _check_update(
    update: Update, client: int, expected: list[LayerSpec] | None
) -> tuple[list[np.ndarray], list[LayerSpec]]:
    """Normalises one client's layers and checks them against ``expected`` (the first client's)."""
    layers = _layers_of(update, client)
    flat: list[np.ndarray] = []
    specs: list[LayerSpec] = []
    for j, layer in enumerate(layers):
        original = layer if isinstance(layer, np.ndarray) else np.asarray(layer)
        values = _as_layer(original, client, j)
        flat.append(values)
        specs.append(LayerSpec(tuple(original.shape), values.dtype.newbyteorder("=")))
    _match_specs(specs, expected, client)
    return flat, specs


def _accumulate_entry(acc: np.ndarray, entry: Entry, weight: float) -> None:
    """``acc += weight * decode(entry)`` with the values decode() gives (float32 for quantized tensors)."""
    if entry.codec == CODEC_RAW:
        kernels().aggregate.accumulate(acc, entry.raw_values(), weight)
    elif entry.block == 0:
        step = dequantization_step(entry.bits, entry.minimum, entry.maximum)
        kernels().quantize.unpack_dequantize_accumulate(entry.data, entry.bits, entry.minimum, step, weight, acc)
    else:  # a rotation mixes whole blocks, so rotated tensors are decoded first
        kernels().aggregate.accumulate(acc, entry.decode().astype(np.float32, copy=False).reshape(-1), weight)


def cast_to_layer(values: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """Casts a float64 mean to the layer's dtype and shape; integers round to nearest (half to even).

    Always returns an array, a 0-d one for scalar layers.
    """
    if spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return np.asarray(values).astype(spec.dtype, copy=False).reshape(spec.shape)


def _kernel_output(spec: LayerSpec, as_sum: bool) -> np.ndarray:
    # float32 means are written by the kernel directly; everything else goes through float64.
    dtype = np.float32 if spec.dtype == np.float32 and not as_sum else np.float64
    return np.empty(spec.size, dtype=dtype)


def _combine(updates: object, weights: Sequence[float] | np.ndarray | None, as_sum: bool) -> list[np.ndarray]:
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
        weight_values = [_check_weight(w, k) for k, w in enumerate(weight_list)]
    specs: list[LayerSpec] | None = None
    clients: list[list[np.ndarray]] = []
    for k, update in enumerate(updates):
        flat, own = _check_update(update, k, specs)
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
    result = []
    for j, spec in enumerate(specs):
        out = _kernel_output(spec, as_sum)
        if active:
            kernel.weighted_sum_layer([clients[k][j] for k in active], active_weights, divisor, out)
        else:
            out[:] = 0.0
        result.append(out.reshape(spec.shape) if as_sum else cast_to_layer(out, spec))
    return result


def weighted_sum(updates: Sequence[Update], weights: Sequence[float] | np.ndarray | None = None) -> list[np.ndarray]:
    """``sum_k weights[k] * updates[k]`` layer by layer, as float64 arrays.

    The result stays float64 whatever the input dtypes, so partial sums from several workers can be
    added together and divided by their total weight without losing precision.
    """
    return _combine(updates, weights, as_sum=True)


def weighted_mean(updates: Sequence[Update], weights: Sequence[float] | np.ndarray | None = None) -> list[np.ndarray]:
    """The weighted mean of K client updates, layer by layer.

    Args:
      updates: K client updates, each a list of arrays with the same shapes and dtypes.
      weights: K finite, non-negative numbers (e.g. example counts) with a positive sum;
        ``None`` (the default) weighs clients equally.

    Returns:
      One array per layer with the clients' shape and dtype. Integer layers are rounded to nearest.
    """
    return _combine(updates, weights, as_sum=False)


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
        weight = _check_weight(weight, client)
        flat, specs = _check_update(update, client, self._specs)
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
        weight = _check_weight(weight, client)
        entries = _parse_client(payload, client)
        specs = [LayerSpec(entry.shape, entry.dtype) for entry in entries]
        _match_specs(specs, self._specs, client)
        if self._specs is None:
            self._start(specs)
        if weight > 0.0:
            for acc, entry in zip(self._sums, entries):
                _accumulate_entry(acc, entry, weight)
        self.count += 1
        self._weights.append(weight)

    def add_weighted_sum(self, sums: Sequence[ArrayLike], total_weight: float, count: int = 1) -> None:
        """Folds in a partial sum (from :func:`weighted_sum` on another worker) of ``count`` clients."""
        total_weight = _check_weight(total_weight, self.count)
        if self._specs is None:
            raise ValueError("add_weighted_sum needs the layer specs: add one update first, or use from_specs()")
        layers = _layers_of(sums, self.count)
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


def _parse_client(payload: bytes | bytearray | memoryview, client: int, checksum: bool = True) -> list[Entry]:
    try:
        return parse(payload) if checksum else parse_structure(payload)
    except DecodeError as error:
        raise DecodeError(f"client {client}: {error}") from None


def _means_of_raw(
    values: list[np.ndarray], weights: np.ndarray, total: float, specs: list[LayerSpec]
) -> list[np.ndarray]:
    """The means of consecutive raw layers of one dtype, whose values each client holds as one flat run."""
    out = _kernel_output(LayerSpec((sum(spec.size for spec in specs),), specs[0].dtype), as_sum=False)
    kernels().aggregate.weighted_sum_layer(values, weights, total, out)
    means, start = [], 0
    for spec in specs:
        means.append(cast_to_layer(out[start : start + spec.size], spec))
        start += spec.size
    return means


def _mean_of_levels(
    levels: list[np.ndarray],
    bits: int,
    minimums: np.ndarray,
    maximums: np.ndarray,
    weights: np.ndarray,
    total: float,
    spec: LayerSpec,
    checksums: np.ndarray,
) -> np.ndarray:
    """x = min + step * q: the offsets add up once, the levels stream through the tiled kernel,
    which also continues each client's checksum over its levels."""
    scales = (weights * ((maximums - minimums) / float(2**bits - 1))).astype(np.float32)
    offset = math.fsum((weights * minimums).tolist())
    out = _kernel_output(spec, as_sum=False)
    kernels().quantize.weighted_sum_quantized(levels, bits, scales, offset, total, out, checksums)
    return cast_to_layer(out, spec)


def _mean_of_column(column: list[Entry], weights: np.ndarray, total: float, spec: LayerSpec) -> np.ndarray:
    """The weighted mean of one layer over clients' verified entries, by the fastest exact route."""
    first = column[0]
    if all(entry.codec == CODEC_RAW for entry in column):
        return _means_of_raw([entry.raw_values() for entry in column], weights, total, [spec])[0]
    if all(e.codec == CODEC_UNIFORM and e.block == 0 and e.bits == first.bits for e in column):
        return _mean_of_levels(
            [e.data for e in column],
            first.bits,
            np.array([e.minimum for e in column]),
            np.array([e.maximum for e in column]),
            weights,
            total,
            spec,
            np.zeros(len(column), dtype=np.uint32),  # already verified by parse
        )
    acc = np.zeros(spec.size, dtype=np.float64)  # mixed codecs or rotated tensors: one client at a time
    for entry, weight in zip(column, weights):
        _accumulate_entry(acc, entry, float(weight))
    return cast_to_layer(acc / total, spec)


def _continue_checksums(checksums: np.ndarray, buffers: list[memoryview], start: int, stop: int) -> None:
    for k, buffer in enumerate(buffers):
        checksums[k] = crc32(buffer[start:stop], int(checksums[k]))


def _mean_of_shared_layout(
    buffers: list[memoryview],
    template: list[Entry],
    minimums: np.ndarray,
    maximums: np.ndarray,
    weights: np.ndarray,
    total: float,
    clients: list[int],
) -> list[np.ndarray]:
    """One pass over payloads laid out like ``template``: each quantized layer's levels are
    checksummed by the kernel that sums them, every other byte by the CRC between layers, and
    nothing is returned unless every payload's checksum matches."""
    checksums = np.zeros(len(buffers), dtype=np.uint32)
    payloads = [np.frombuffer(buffer, dtype=np.uint8) for buffer in buffers]  # sliced below: views are cheap
    position = 0
    means: list[np.ndarray] = []
    j = 0
    while j < len(template):
        entry = template[j]
        if entry.codec == CODEC_RAW:
            # Adjacent raw tensors of one dtype (biases, small kernels) are averaged as one run.
            run = [entry]
            while (
                j + len(run) < len(template)
                and template[j + len(run)].codec == CODEC_RAW
                and template[j + len(run)].dtype == entry.dtype
            ):
                run.append(template[j + len(run)])
            end = entry.offset + sum(e.count for e in run) * entry.dtype.itemsize
            values = [raw_view(p[entry.offset : end], entry.dtype) for p in payloads]
            means += _means_of_raw(values, weights, total, [LayerSpec(e.shape, e.dtype) for e in run])
            j += len(run)
            continue
        spec = LayerSpec(entry.shape, entry.dtype)
        length = entry.data.nbytes
        _continue_checksums(checksums, buffers, position, entry.offset)
        levels = [p[entry.offset : entry.offset + length] for p in payloads]
        means.append(
            _mean_of_levels(levels, entry.bits, minimums[:, j], maximums[:, j], weights, total, spec, checksums)
        )
        position = entry.offset + length
        j += 1
    _continue_checksums(checksums, buffers, position, buffers[0].nbytes - CHECKSUM.size)
    for k, buffer in enumerate(buffers):
        if int(checksums[k]) != stored_checksum(buffer):
            raise DecodeError(
                f"client {clients[k]}: invalid fastfed payload: checksum mismatch (corrupted in transit?)"
            )
    return means


def weighted_mean_encoded(
    payloads: Sequence[bytes | bytearray | memoryview], weights: Sequence[float] | np.ndarray | None = None
) -> list[np.ndarray]:
    """The weighted mean of K encoded updates, reading each payload once.

    Every payload is validated (structure and checksum) before anything is returned. Quantized
    layers of one bit width are summed by a tiled kernel as ``sum_k w_k min_k + sum_k (w_k step_k) q_k``,
    with the level sums in float32 blocks of eight clients: the result equals decoding and averaging
    to within ~1e-6 of each tensor's range (far below the quantization step), and is bit-identical
    on every backend. When all payloads share one table layout (the usual case: one model, one
    codec), the checksums are computed by that same kernel pass while the bytes are in cache.
    :meth:`Accumulator.add_encoded` is the streaming alternative.
    """
    if isinstance(payloads, (bytes, bytearray, memoryview)) or not isinstance(payloads, Sequence):
        raise TypeError("payloads: expected a sequence of encoded updates")
    if len(payloads) == 0:
        raise ValueError("payloads: expected at least one encoded update, got none")
    weight_list = [1.0] * len(payloads) if weights is None else list(np.asarray(weights, dtype=object).reshape(-1))
    if len(weight_list) != len(payloads):
        raise ValueError(f"got {len(payloads)} encoded updates but {len(weight_list)} weights")
    weight_values = [_check_weight(w, k) for k, w in enumerate(weight_list)]
    total = math.fsum(weight_values)
    if total == 0.0:
        raise ValueError("the weights sum to zero; at least one client needs a positive weight")
    for client, payload in enumerate(payloads):
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"client {client}: expected an encoded update (bytes), got {type(payload).__name__}")
    buffers = [memoryview(payload).cast("B") for payload in payloads]
    active = [k for k, w in enumerate(weight_values) if w > 0.0]
    active_weights = np.array([weight_values[k] for k in active], dtype=np.float64)
    template = _parse_client(buffers[0], 0, checksum=False)
    layout = match_layout(buffers, template)
    if layout.matches.all() and all(entry.codec == CODEC_RAW or entry.block == 0 for entry in template):
        for k, weight in enumerate(weight_values):
            if weight == 0.0:  # not read by the pass, still verified
                _parse_client(buffers[k], k)
        return _mean_of_shared_layout(
            [buffers[k] for k in active],
            template,
            layout.minimums[active],
            layout.maximums[active],
            active_weights,
            total,
            active,
        )
    # Differently laid out payloads (or rotated tensors): each is verified, then averaged by column.
    parsed = [_parse_client(buffer, k) for k, buffer in enumerate(buffers)]
    specs = [LayerSpec(entry.shape, entry.dtype) for entry in parsed[0]]
    for client, entries in enumerate(parsed):
        _match_specs([LayerSpec(entry.shape, entry.dtype) for entry in entries], specs, client)
    return [
        _mean_of_column([parsed[k][j] for k in active], active_weights, total, spec) for j, spec in enumerate(specs)
    ]
