"""The weighted mean of encoded updates, computed from their packed levels without decoding them.

Uniform layers are averaged as ``sum_k w_k min_k + sum_k (w_k step_k) q_k``: the offsets add up
once and the levels stream through the tiled ``weighted_sum_quantized`` kernel, which also
continues each payload's CRC-32, so a model's payloads are read once and verified in that pass
(see ``docs/wire-format.md``).

Shared-rotation layers (``RotatedQuantizer(shared_rotation=True)``, QUIC-FL) are summed in the
rotated domain, ``sum_k w_k sigma_k R[h_k, X_k]``, by the same kind of tiled pass
(``weighted_sum_levels``), then rotated back once; independently rotated layers (EDEN) need every
client's rotation inverted, one fused decode-and-accumulate per client.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .._backend import kernels
from ..compression.quantizer import STREAM_SIGNS, dequantization_step, stream_key
from ..compression.rotated import eden_codebook, eden_keys, shared_codebook, shared_rows
from ..compression.wire import (
    CHECKSUM,
    CODEC_RAW,
    CODEC_ROTATED,
    CODEC_ROTATED_SHARED,
    CODEC_UNIFORM,
    ROTATED_CODECS,
    SCALES_PROBLEM,
    VALUE_LIMIT,
    Entry,
    checksummed_length,
    corrections_problem,
    crc32,
    parse,
    parse_structure,
    raw_view,
    scales_valid,
    stored_checksum,
    table_layout,
)
from ..errors import DecodeError
from .layers import (
    AllNonFinite,
    LayerSpec,
    NonFinite,
    Screened,
    cast_to_layer,
    check_non_finite_policy,
    check_weights,
    exact_integer_mean,
    first_non_finite_layer,
    is_exact_integer,
    kernel_output,
    match_specs,
    non_finite_error,
    normalized_weights,
)

__all__ = [
    "SharedLayout",
    "accumulate_entry",
    "match_layout",
    "parse_client",
    "raw_or_nothing",
    "screened_mean_encoded",
    "weighted_mean_encoded",
]


def accumulate_entry(acc: np.ndarray, entry: Entry, weight: float) -> None:
    """``acc += weight * decode(entry)`` with the values decode() gives (float32 for quantized tensors)."""
    if entry.codec == CODEC_RAW:
        kernels().aggregate.accumulate(acc, entry.raw_values(), weight)
    elif entry.codec == CODEC_UNIFORM and entry.block == 0:
        step = dequantization_step(entry.bits, entry.minimum, entry.maximum)
        kernels().quantize.unpack_dequantize_accumulate(entry.data, entry.bits, entry.minimum, step, weight, acc)
    elif entry.codec == CODEC_ROTATED and entry.dtype != np.float16:
        magnitudes = eden_codebook(entry.bits)[1]
        kernels().quantize.accumulate_rotated(
            entry.levels(), entry.bits, entry.block, eden_keys(entry.seed), magnitudes, entry.scales(), weight, acc
        )
    else:  # a rotation mixes whole blocks, so rotated tensors are decoded first (float16 ones saturated)
        kernels().aggregate.accumulate(acc, entry.decode().astype(np.float32, copy=False).reshape(-1), weight)


def raw_or_nothing(entry: Entry) -> np.ndarray:
    """A raw tensor's values, or no values for a quantized one (finite by construction)."""
    return entry.raw_values() if entry.codec == CODEC_RAW else np.zeros(0, np.float32)


def parse_client(payload: bytes | bytearray | memoryview, client: int, checksum: bool = True) -> list[Entry]:
    try:
        return parse(payload) if checksum else parse_structure(payload)
    except DecodeError as error:
        raise DecodeError(f"client {client}: {error}") from None


def _means_of_raw(
    values: list[np.ndarray], weights: np.ndarray, total: float, specs: list[LayerSpec]
) -> list[np.ndarray]:
    """The means of consecutive raw layers of one dtype, whose values each client holds as one flat run."""
    exact = is_exact_integer(specs[0])  # a run shares one dtype
    if exact:
        out = exact_integer_mean(values, weights.tolist(), specs[0].dtype)
    else:
        out = kernel_output(LayerSpec((sum(spec.size for spec in specs),), specs[0].dtype), as_sum=False)
        kernels().aggregate.weighted_sum_layer(values, weights, total, out)
    means, start = [], 0
    for spec in specs:
        chunk = out[start : start + spec.size]
        means.append(chunk.reshape(spec.shape) if exact else cast_to_layer(chunk, spec))
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
    which also continues each client's checksum over its levels.

    The kernel sums ``scale_k * q_k`` in float32, so the per-client scales ``w_k * step_k`` are
    divided by a common power of two that brings the largest to [0.5, 1): float32 keeps 24 bits of
    each whatever the weights and ranges, and nothing overflows. The offset and the divisor are
    divided by the same power (exact), keeping them finite.
    """
    scales = weights * ((maximums - minimums) / float(2**bits - 1))
    offset = math.fsum((weights * minimums).tolist())
    largest = float(scales.max())
    exponent = math.frexp(largest)[1] if largest > 0.0 else 0
    # Scales far below the offset (or the total) add nothing float32 could hold: the shared power
    # stays within 2**1000 of them, so that the offset and divisor divided by it stay finite.
    exponent = max(exponent, math.frexp(max(abs(offset), total))[1] - 1000)
    scaled = np.ldexp(scales, -exponent).astype(np.float32)
    out = kernel_output(spec, as_sum=False)
    kernels().aggregate.weighted_sum_quantized(
        levels, bits, scaled, math.ldexp(offset, -exponent), math.ldexp(total, -exponent), out, checksums
    )
    return cast_to_layer(out, spec)


def _in_one_pass(entry: Entry) -> bool:
    """Whether the one-pass mean reads this kind of tensor. Uniform rotated tensors take the verify-first
    path, and so do rotated float16 tensors: each client's decoded values saturate at float16's range
    (``Entry.decode``), which a sum in the rotated domain cannot do, and the mean must be theirs."""
    if entry.codec in ROTATED_CODECS:
        return entry.dtype != np.float16
    return entry.codec == CODEC_RAW or entry.block == 0


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
        accumulate_entry(acc, entry, float(weight))
    return cast_to_layer(acc / total, spec)


def _continue_checksums(
    checksums: np.ndarray, buffers: list[memoryview], starts: np.ndarray, stops: np.ndarray
) -> None:
    """Continues each payload's CRC-32 over its bytes [starts[k], stops[k])."""
    for k, (buffer, start, stop) in enumerate(zip(buffers, starts.tolist(), stops.tolist())):
        checksums[k] = crc32(buffer[start:stop], int(checksums[k]))


@dataclass(frozen=True)
class _RotatedColumn:
    """One rotated layer of every payload of a shared layout: views of its scales, levels and corrections."""

    entry: Entry  # the template's
    scales: np.ndarray  # float32 (payloads, blocks)
    levels: list[np.ndarray]
    corrections: list[np.ndarray]  # shared rotation: each payload's positions then corrections, as bytes

    @classmethod
    def of(cls, entry: Entry, payloads: list[np.ndarray], starts: list[int], counts: list[int]) -> _RotatedColumn:
        level_bytes = (entry.padded * entry.bits + 7) // 8
        scales, levels, corrections = [], [], []
        for payload, start, count in zip(payloads, starts, counts):
            scales.append(payload[start : start + entry.scale_bytes])
            first = start + entry.scale_bytes
            levels.append(payload[first : first + level_bytes])
            first += level_bytes
            corrections.append(payload[first : first + 8 * count])
        # Joined once (a copy, aligned by np.concatenate): checked in one vectorized pass.
        joined_scales = raw_view(np.concatenate(scales), np.dtype(np.float32)).reshape(len(payloads), -1)
        return cls(entry, joined_scales, levels, corrections)

    def problem(self) -> tuple[int, str] | None:
        """The first payload whose block scales are out of bounds (see Entry.check_values); the
        corrections are checked as they are added (:func:`_mean_of_shared_rotation`)."""
        valid = scales_valid(self.scales)
        return None if valid.all() else (int(np.argmin(valid)), SCALES_PROBLEM)

    def corrections_problem(self, k: int) -> str:
        """What is wrong with payload ``k``'s corrections."""
        count = self.corrections[k].shape[0] // 8
        positions = raw_view(self.corrections[k][: 4 * count], np.dtype(np.uint32)).astype(np.int64)
        values = raw_view(self.corrections[k][4 * count :], np.dtype(np.float32))
        return corrections_problem(positions, values, self.entry.padded) or ""


def _mean_of_rotated(
    column: _RotatedColumn, seeds: np.ndarray, weights: np.ndarray, total: float, spec: LayerSpec
) -> np.ndarray:
    """EDEN layers: every client's rotation inverted, fused with the weighted accumulation."""
    entry = column.entry
    magnitudes = eden_codebook(entry.bits)[1]
    acc = np.zeros(entry.count)
    accumulate = kernels().quantize.accumulate_rotated
    for levels, scales, seed, weight in zip(column.levels, column.scales, seeds.tolist(), weights.tolist()):
        accumulate(levels, entry.bits, entry.block, eden_keys(seed), magnitudes, scales, weight, acc)
    return cast_to_layer(acc / total, spec)


def _mean_of_shared_rotation(
    column: _RotatedColumn,
    seeds: np.ndarray,
    weights: np.ndarray,
    total: float,
    spec: LayerSpec,
    checksums: np.ndarray,
    bad_corrections: Callable[[int], DecodeError],
) -> np.ndarray:
    """QUIC-FL layers: ``sum_k (w_k / W) sigma_k R[h_k, X_k]`` in the rotated domain, in one pass over
    the levels (which also continues the checksums), plus the clients' corrections, then one inverse
    rotation. Raises ``bad_corrections(k)`` for the first payload whose corrections are out of bounds.

    With a dither table, ``R[h, X] = -T + step X + offset_h``: the kernel sums the integer levels and
    adds the offsets, which repeat every ``rows`` groups of eight values.
    """
    entry = column.entry
    book = shared_codebook(entry.bits)
    rows = np.array([shared_rows(seed, book.rows) for seed in seeds.tolist()], dtype=np.uint32).reshape(-1, 2)
    coefficients = (weights / total)[:, None] * column.scales.astype(np.float64)  # (clients, blocks)
    table: np.ndarray | None
    if book.breakpoints is not None:
        table, offsets, scales = book.table, None, coefficients.astype(np.float32)
    else:
        step = (book.high - book.low) / (2**entry.bits - 1)
        table, offsets = None, _dither_offsets(coefficients, rows, book.rows, book.low, step)
        scales = (coefficients * step).astype(np.float32)
    rotated = np.empty(entry.padded, dtype=np.float32)
    shares = (weights / total).astype(np.float32)
    bad = kernels().aggregate.weighted_sum_levels(
        column.levels, entry.bits, scales, entry.block, table, rows, offsets, 1.0, rotated, checksums,
        column.corrections, shares, VALUE_LIMIT,
    )  # fmt: skip
    if bad >= 0:
        raise bad_corrections(bad)
    mean = np.empty(entry.count, dtype=np.float32)
    kernels().rotate.unrotate_blocks(rotated, entry.block, [stream_key(entry.rotation_seed, STREAM_SIGNS)], mean)
    return cast_to_layer(mean, spec)


def _dither_offsets(coefficients: np.ndarray, rows: np.ndarray, n_rows: int, low: float, step: float) -> np.ndarray:
    """``sum_k coefficients[k, b] * (low + step ((h_k + 1/2) / rows - 1/2))`` for each block ``b`` and each
    group of eight ``g mod rows`` (a client's row repeats every ``rows`` groups): (blocks, rows)."""
    offsets = low + step * ((np.arange(n_rows) + 0.5) / n_rows - 0.5)
    phase = np.arange(n_rows, dtype=np.int64)
    per_row = offsets[(phase[None, :] * rows[:, 1:].astype(np.int64) + rows[:, :1].astype(np.int64)) & (n_rows - 1)]
    return np.ascontiguousarray(coefficients.T @ per_row)


def _verified_problem(buffer: memoryview, client: int, tensor: int, message: str) -> DecodeError:
    """The error for values out of bounds, reported as parse() would: a bad checksum first."""
    if crc32(buffer[: checksummed_length(buffer.nbytes)]) != stored_checksum(buffer):
        return DecodeError(f"client {client}: invalid fastfed payload: checksum mismatch (corrupted in transit?)")
    return DecodeError(f"client {client}: invalid fastfed payload: tensor {tensor}: {message}")


def _bad_corrections(
    buffers: list[memoryview], clients: list[int], tensor: int, column: _RotatedColumn, k: int
) -> DecodeError:
    return _verified_problem(buffers[k], clients[k], tensor, column.corrections_problem(k))


def _mean_of_shared_layout(
    buffers: list[memoryview],
    template: list[Entry],
    layout: SharedLayout,
    weights: np.ndarray,
    total: float,
    clients: list[int],
) -> list[np.ndarray]:
    """One pass over payloads laid out like ``template``: each quantized layer's levels are
    checksummed by the kernel that sums them, every other byte by the CRC between layers, and
    nothing is returned unless every payload's checksum matches."""
    checksums = np.zeros(len(buffers), dtype=np.uint32)
    payloads = [np.frombuffer(buffer, dtype=np.uint8) for buffer in buffers]  # sliced below: views are cheap
    position = np.zeros(len(buffers), dtype=np.int64)  # each payload's bytes before it are checksummed
    means: list[np.ndarray] = []
    j = 0
    while j < len(template):
        entry = template[j]
        starts = layout.offsets[:, j]
        if entry.codec == CODEC_RAW:
            # Adjacent raw tensors of one dtype (biases, small kernels) are averaged as one run.
            run = [entry]
            while (
                j + len(run) < len(template)
                and template[j + len(run)].codec == CODEC_RAW
                and template[j + len(run)].dtype == entry.dtype
            ):
                run.append(template[j + len(run)])
            run_bytes = sum(e.count for e in run) * entry.dtype.itemsize
            values = [
                raw_view(p[start : start + run_bytes], entry.dtype) for p, start in zip(payloads, starts.tolist())
            ]
            means += _means_of_raw(values, weights, total, [LayerSpec(e.shape, e.dtype) for e in run])
            j += len(run)
            continue
        spec = LayerSpec(entry.shape, entry.dtype)
        if entry.codec == CODEC_UNIFORM:
            _continue_checksums(checksums, buffers, position, starts)
            length = entry.data.nbytes
            levels = [p[start : start + length] for p, start in zip(payloads, starts.tolist())]
            minimums, maximums = layout.minimums[:, j], layout.maximums[:, j]
            means.append(_mean_of_levels(levels, entry.bits, minimums, maximums, weights, total, spec, checksums))
            position = starts + length
            j += 1
            continue
        column = _RotatedColumn.of(entry, payloads, starts.tolist(), layout.outliers[:, j].tolist())
        problem = column.problem()
        if problem is not None:
            raise _verified_problem(buffers[problem[0]], clients[problem[0]], j, problem[1])
        if entry.codec == CODEC_ROTATED:
            means.append(_mean_of_rotated(column, layout.seeds[:, j], weights, total, spec))
        else:
            _continue_checksums(checksums, buffers, position, starts + entry.scale_bytes)
            bad_corrections = functools.partial(_bad_corrections, buffers, clients, j, column)
            seeds = layout.seeds[:, j]
            means.append(_mean_of_shared_rotation(column, seeds, weights, total, spec, checksums, bad_corrections))
            position = starts + entry.scale_bytes + (entry.padded * entry.bits + 7) // 8
        j += 1
    _continue_checksums(checksums, buffers, position, np.array([checksummed_length(b.nbytes) for b in buffers]))
    for k, buffer in enumerate(buffers):
        if int(checksums[k]) != stored_checksum(buffer):
            raise DecodeError(
                f"client {clients[k]}: invalid fastfed payload: checksum mismatch (corrupted in transit?)"
            )
    return means


@dataclass(frozen=True)
class SharedLayout:
    """Which payloads are laid out exactly like a validated template (see :class:`TableLayout`), and
    what varies between them; rows of non-matching payloads are undefined."""

    matches: np.ndarray  # bool, one per payload
    minimums: np.ndarray  # float64 (payloads, tensors): uniform tensors' ranges
    maximums: np.ndarray
    seeds: np.ndarray  # uint64 (payloads, tensors)
    outliers: np.ndarray  # int64 (payloads, tensors): shared-rotation tensors' counts of corrections
    offsets: np.ndarray  # int64 (payloads, tensors): where each tensor's data starts

    def rows(self, payloads: list[int]) -> SharedLayout:
        return SharedLayout(*(getattr(self, name)[payloads] for name in self.__dataclass_fields__))


def match_layout(buffers: Sequence[memoryview], template: list[Entry]) -> SharedLayout:
    """Compares K payloads with the template's table in a few vectorized passes (no per-entry Python)."""
    layout = table_layout(template, buffers[0].nbytes)
    sizes = np.array([buffer.nbytes for buffer in buffers], dtype=np.int64)
    # Every payload long enough holds a full table; others get a zero row.
    long_enough = sizes >= layout.table_end
    prefixes = [
        buffer[: layout.table_end] if whole else bytes(layout.table_end) for buffer, whole in zip(buffers, long_enough)
    ]
    tables = np.frombuffer(b"".join(prefixes), dtype=np.uint8).reshape(len(buffers), layout.table_end)
    fixed = ~layout.varying
    matches = long_enough & (tables[:, fixed] == tables[0, fixed]).all(axis=1)
    minimums, maximums = layout.ranges(tables)
    with np.errstate(invalid="ignore"):
        valid = (minimums <= maximums) & (np.maximum(-minimums, maximums) <= layout.limits)  # NaN fails both
    matches &= (valid | (layout.codecs != CODEC_UNIFORM)).all(axis=1)
    # A shared-rotation tensor's count of corrections sets its length, and the lengths the offsets and size.
    shared = layout.codecs == CODEC_ROTATED_SHARED
    padded = np.array([entry.padded for entry in template], dtype=np.int64)
    template_outliers = np.array([entry.outliers for entry in template], dtype=np.int64)
    counts = layout.correction_counts(tables)
    outliers = np.where(shared, np.minimum(counts, padded + 1).astype(np.int64), template_outliers)
    lengths = np.array([entry.data.nbytes for entry in template], dtype=np.int64) + 8 * (outliers - template_outliers)
    matches &= (outliers <= padded).all(axis=1) & (layout.payload_lengths(tables) == lengths).all(axis=1)
    matches &= (sizes == layout.table_end + lengths.sum(axis=1) + CHECKSUM.size) & (layout.totals(tables) == sizes)
    offsets = layout.table_end + np.cumsum(lengths, axis=1) - lengths
    return SharedLayout(matches, minimums, maximums, layout.seeds(tables), outliers, offsets)


def weighted_mean_encoded(
    payloads: Sequence[bytes | bytearray | memoryview],
    weights: Sequence[float] | np.ndarray | None = None,
    *,
    non_finite: NonFinite = "raise",
) -> list[np.ndarray]:
    """The weighted mean of K encoded updates, reading each payload once.

    Every payload is validated (structure and checksum) before anything is returned. Quantized
    layers of one bit width are summed by a tiled kernel as ``sum_k w_k min_k + sum_k (w_k step_k) q_k``,
    with the level sums in float32 blocks of eight clients: the result equals decoding and averaging
    to within ~1e-6 of each tensor's range (far below the quantization step), and is bit-identical
    on every backend. When all payloads share one table layout (the usual case: one model, one
    codec), the checksums are computed by that same kernel pass while the bytes are in cache.
    :meth:`Accumulator.add_encoded` is the streaming alternative.

    Quantized tensors decode to finite values by construction; ``non_finite`` says what to do with
    a client whose raw float tensors hold NaN or infinity, as for :func:`fastfed.weighted_mean`.
    """
    return screened_mean_encoded(payloads, weights, non_finite).layers


def screened_mean_encoded(
    payloads: Sequence[bytes | bytearray | memoryview],
    weights: Sequence[float] | np.ndarray | None = None,
    non_finite: NonFinite = "skip",
) -> Screened:
    """:func:`weighted_mean_encoded`, also saying which clients ``non_finite="skip"`` left out."""
    non_finite = check_non_finite_policy(non_finite)
    if isinstance(payloads, (bytes, bytearray, memoryview)) or not isinstance(payloads, Sequence):
        raise TypeError("payloads: expected a sequence of encoded updates")
    if len(payloads) == 0:
        raise ValueError("payloads: expected at least one encoded update, got none")
    weight_values = check_weights(weights, len(payloads), "encoded updates")
    if not any(weight_values):
        raise ValueError("the weights sum to zero; at least one client needs a positive weight")
    for client, payload in enumerate(payloads):
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"client {client}: expected an encoded update (bytes), got {type(payload).__name__}")
    buffers = [memoryview(payload).cast("B") for payload in payloads]
    template = parse_client(buffers[0], 0, checksum=False)
    skipped: list[int] = []
    while True:
        # A finite mean proves every contributing raw value finite; clients are searched only otherwise.
        means = _mean_of_encoded(buffers, weight_values, template)
        if non_finite == "propagate":
            return Screened(means, skipped)
        bad_layers = [j for j, mean in enumerate(means) if first_non_finite_layer([mean]) is not None]
        culprits: dict[int, int] = {}  # client -> its first non-finite layer
        for k, weight in enumerate(weight_values):
            if weight > 0.0 and bad_layers:
                entries = parse_client(buffers[k], k)
                layer = first_non_finite_layer([raw_or_nothing(entries[j]) for j in bad_layers])
                if layer is not None:
                    culprits[k] = bad_layers[layer]
        if not culprits:
            return Screened(means, skipped)
        if non_finite == "raise":
            client = min(culprits)
            raise non_finite_error(client, culprits[client])
        for k in culprits:
            weight_values[k] = 0.0
        skipped += sorted(culprits)
        if not any(weight_values):
            everyone = sorted(skipped)
            message = f"every client with a positive weight holds NaN or infinity (clients {everyone})"
            raise AllNonFinite(message, everyone)


def _mean_of_encoded(buffers: list[memoryview], weight_values: list[float], template: list[Entry]) -> list[np.ndarray]:
    active = [k for k, w in enumerate(weight_values) if w > 0.0]
    active_weights, total, _ = normalized_weights([weight_values[k] for k in active])
    layout = match_layout(buffers, template)
    if layout.matches.all() and all(_in_one_pass(entry) for entry in template):
        for k, weight in enumerate(weight_values):
            if weight == 0.0:  # not read by the pass, still verified
                parse_client(buffers[k], k)
        return _mean_of_shared_layout(
            [buffers[k] for k in active], template, layout.rows(active), active_weights, total, active
        )
    # Differently laid out payloads (or uniform rotated tensors): each is verified, then averaged by column.
    parsed = [parse_client(buffer, k) for k, buffer in enumerate(buffers)]
    specs = [LayerSpec(entry.shape, entry.dtype) for entry in parsed[0]]
    for client, entries in enumerate(parsed):
        match_specs([LayerSpec(entry.shape, entry.dtype) for entry in entries], specs, client)
    return [
        _mean_of_column([parsed[k][j] for k in active], active_weights, total, spec) for j, spec in enumerate(specs)
    ]
