"""What both Flower APIs share: reading clients' updates, checking them against the round's global
layout, and aggregating them with fastfed, with the clients that must be dropped and why.

A client is dropped (and counted as a failure by the strategies) when its update cannot be read,
does not match the round's global layout (layer count, shapes and dtypes), fails its checksum, or,
under the default ``non_finite="skip"``, holds NaN or infinity.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from ...aggregation import LayerSpec, cast_to_layer
from ...aggregation.encoded import screened_mean_encoded
from ...aggregation.layers import (
    AllNonFinite,
    NonFinite,
    Screened,
    check_non_finite_policy,
    check_update,
    refuse_masked,
)
from ...aggregation.mean import screened_mean
from ...compression import Codec, encode
from ...compression.quantizer import mix64
from ...compression.wire import parse, parse_structure, saturate_float16
from ...errors import DecodeError

TENSOR_TYPE = "fastfed.update.v1"  # Parameters.tensor_type of a compressed update (legacy API)
ARRAY_KEY = "fastfed.update.v1"  # the single key of a compressed update's ArrayRecord (Message API)
# The fit/train config entry in which fastfed strategies send the round's rotation: pass it as
# ``rotation_seed`` to compress_parameters / compress_arrays for RotatedQuantizer(shared_rotation=True).
ROTATION_SEED_KEY = "fastfed.rotation_seed"


def round_rotation_seed(strategy: object, server_round: int) -> int:
    """The rotation shared by a round's clients: drawn once per strategy, then one per round (63 bits, as
    Flower config integers are signed 64-bit)."""
    base: int | None = getattr(strategy, "_fastfed_rotation_base", None)
    if base is None:
        base = int.from_bytes(os.urandom(8), "little")
        strategy._fastfed_rotation_base = base  # type: ignore[attr-defined]
    return mix64(base + server_round) >> 1


NUMPY_STYPE = "numpy.ndarray"  # Flower's serialization type for .npy bytes, read with npy_view


def encode_delta(
    updated: Sequence[np.ndarray],
    received: Sequence[np.ndarray],
    codec: Codec,
    seed: int | None,
    rotation_seed: int | None = None,
) -> bytes:
    """A client's update (its weights minus the weights it received), fastfed-encoded."""
    if len(updated) != len(received):
        raise ValueError(f"updated has {len(updated)} arrays but received has {len(received)}")
    for j, (new, old) in enumerate(zip(updated, received)):
        refuse_masked(new, f"updated, layer {j}")
        refuse_masked(old, f"received, layer {j}")
    delta = [_exact_delta(np.asarray(new), np.asarray(old), j) for j, (new, old) in enumerate(zip(updated, received))]
    return encode(delta, codec, seed=seed, rotation_seed=rotation_seed)


def _exact_delta(new: np.ndarray, old: np.ndarray, layer: int) -> np.ndarray:
    """``new - old`` in a dtype that holds it: integers in a signed type twice as wide (in their own
    dtype they would wrap around, and the server would add back a wrong delta), float16 in float32
    (as FedAvg's clients do: float16 would round differences past 65504 to infinity)."""
    dtype = np.result_type(new, old)
    if dtype.kind in "iu":
        wide = np.dtype(f"i{min(2 * dtype.itemsize, 8)}")
        delta: np.ndarray = new.astype(wide) - old.astype(wide)
        if dtype.itemsize == 8:
            # No wider type: differences beyond int64 wrap. Only those whose float64 estimate reaches
            # 2^62 (a true 2^63 or more always does) are checked exactly.
            suspect = np.abs(new.astype(np.float64) - old.astype(np.float64)) >= 2.0**62
            exact = new[suspect].astype(object) - old[suspect].astype(object)
            if not np.array_equal(delta[suspect].astype(object), exact):
                raise ValueError(
                    f"layer {layer}: the update differs from the received weights by more than int64 holds; "
                    "send this model's updates uncompressed"
                )
        return delta
    widened = np.float32 if dtype == np.float16 else dtype
    difference: np.ndarray = new.astype(widened, copy=False) - old.astype(widened, copy=False)
    return difference


class ClientUpdate(NamedTuple):
    """One client's result: its weights (``arrays``), or a fastfed-compressed delta from the round's
    global weights (``payload``), or why it could not be read (``error``); and its weight."""

    arrays: list[np.ndarray] | None
    payload: bytes | None
    weight: float
    error: str | None = None


class RoundAggregate(NamedTuple):
    """The aggregate of a round (``None`` when no client is left) and the dropped clients, by
    position, with the reason for each."""

    layers: list[np.ndarray] | None
    dropped: dict[int, str]


def _layout_mismatches(updates: list[ClientUpdate], global_weights: Sequence[np.ndarray] | None) -> dict[int, str]:
    """Why each update that does not fit the round cannot be aggregated, by position.

    Layer count and shapes must be the global weights' (or, when the strategy never saw them, the
    first plain update's). Dtypes must agree among the plain updates and among the compressed ones
    (the first fitting update of each kind sets them): a server optimizer may keep float64 global
    weights while clients train in float32.
    """
    shapes = None if global_weights is None else [np.shape(g) for g in global_weights]
    dtypes: dict[bool, list[np.dtype[Any]]] = {}
    mismatches = {}
    for k, update in enumerate(updates):
        try:
            if update.error is not None:
                raise ValueError(update.error)
            if update.arrays is not None:
                specs = check_update(update.arrays, k, None)[1]
            else:
                specs = [LayerSpec(entry.shape, entry.dtype) for entry in parse_structure(update.payload or b"")]
            shapes = shapes or [spec.shape for spec in specs]
            if len(specs) != len(shapes):
                raise ValueError(f"{len(specs)} layers, but the model has {len(shapes)}")
            for j, (spec, shape) in enumerate(zip(specs, shapes)):
                if spec.shape != shape:
                    raise ValueError(f"layer {j} has shape {spec.shape}, but the model's is {shape}")
            expected = dtypes.setdefault(update.payload is not None, [spec.dtype for spec in specs])
            for j, (spec, dtype) in enumerate(zip(specs, expected)):
                if spec.dtype != dtype:
                    raise TypeError(f"layer {j} has dtype {spec.dtype}, but the other clients' is {dtype}")
        except (DecodeError, ValueError, TypeError) as error:
            mismatches[k] = str(error)
    return mismatches


def _with_delta(global_layer: np.ndarray, delta: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """``global + delta`` as ``dtype``: exactly for integers, through float64 for floats, with float16
    saturating at its range as decoding a float16 tensor does (quantization error can carry weights
    near the edge past it)."""
    spec = LayerSpec(np.shape(global_layer), dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        exact = np.asarray(global_layer).astype(object).reshape(-1) + np.asarray(delta).astype(object).reshape(-1)
        clipped = [min(max(value, info.min), info.max) for value in exact.tolist()]
        return np.array(clipped, dtype=dtype).reshape(spec.shape)
    values = np.asarray(global_layer, np.float64) + delta
    return cast_to_layer(saturate_float16(values) if dtype == np.float16 else values, spec)


def _decoded(payload: bytes, global_weights: Sequence[np.ndarray], dtypes: list[np.dtype[Any]]) -> list[np.ndarray]:
    """A client's weights from its compressed delta: the global weights plus the decoded delta."""
    return [_with_delta(g, entry.decode(), dtype) for g, entry, dtype in zip(global_weights, parse(payload), dtypes)]


def _client_weights(
    update: ClientUpdate, global_weights: Sequence[np.ndarray] | None, dtypes: list[np.dtype[Any]]
) -> list[np.ndarray]:
    if update.arrays is not None:
        return update.arrays
    return _decoded(update.payload or b"", global_weights or [], dtypes)


def _checksum_failures(updates: list[ClientUpdate], positions: list[int]) -> dict[int, str]:
    """The compressed updates among ``positions`` whose payload does not verify, with the error."""
    failures = {}
    for k in positions:
        try:
            parse(updates[k].payload or b"")
        except DecodeError as error:
            failures[k] = str(error)
    return failures


#: Aggregates clients' weights (lists of arrays) with their weights under a non-finite policy.
Aggregate = Callable[[list[list[np.ndarray]], list[float], NonFinite], Screened]


def aggregate_updates(
    updates: list[ClientUpdate],
    global_weights: Sequence[np.ndarray] | None,
    aggregate: Aggregate | None,
    non_finite: NonFinite,
) -> RoundAggregate:
    """Checks every update against the round's layout, then aggregates the ones that fit.

    ``aggregate`` does the aggregation (``None``: fastfed's weighted mean, which averages
    compressed updates without decoding them when all of them are compressed). The layout is that
    of ``global_weights`` when the strategy knows them (it saw configure_fit/configure_train), else
    that of the first plain update.
    """
    non_finite = check_non_finite_policy(non_finite)
    if global_weights is None and any(update.payload is not None for update in updates):
        raise ValueError("compressed updates need the round's global weights (configure_fit/train was not called)")
    dropped = _layout_mismatches(updates, global_weights)
    while True:
        kept = [k for k in range(len(updates)) if k not in dropped]
        if not kept:
            return RoundAggregate(None, dropped)
        weights = [updates[k].weight for k in kept]
        compressed = [k for k in kept if updates[k].payload is not None]
        try:
            if aggregate is None and len(compressed) == len(kept):
                assert global_weights is not None  # compressed updates were checked against it
                screened = screened_mean_encoded([updates[k].payload or b"" for k in kept], weights, non_finite)
                layers = [_with_delta(g, d, np.asarray(g).dtype) for g, d in zip(global_weights, screened.layers)]
            else:
                # Compressed clients are decoded to the plain clients' dtypes (the model's, if none).
                dtypes = [np.asarray(g).dtype for g in global_weights or []]
                plain = next((updates[k].arrays for k in kept if updates[k].arrays is not None), None)
                dtypes = dtypes if plain is None else [np.asarray(a).dtype.newbyteorder("=") for a in plain]
                clients = [_client_weights(updates[k], global_weights, dtypes) for k in kept]
                screened = (aggregate or screened_mean)(clients, weights, non_finite)
                layers = screened.layers
        except AllNonFinite as error:
            dropped.update({kept[position]: "holds NaN or infinity" for position in error.clients})
            return RoundAggregate(None, dict(sorted(dropped.items())))
        except DecodeError:  # a payload's checksum: found and dropped, then the round is aggregated again
            failures = _checksum_failures(updates, compressed)
            if not failures:
                raise
            dropped.update(failures)
            continue
        for position in screened.skipped:
            dropped[kept[position]] = "holds NaN or infinity"
        return RoundAggregate(layers, dict(sorted(dropped.items())))


def refuse_other_aggregations(
    cls: type, mixin: type, root: type, method: str, weighted_means: tuple[type, ...]
) -> None:
    """Raises ``TypeError`` unless every Flower strategy that ``mixin`` stands in front of in
    ``cls``'s MRO, down to the FedAvg ``root``, aggregates by a weighted mean: the mixin replaces
    that mean, so mixed into FedMedian, Krum or any other aggregation it would silently average."""
    mro = cls.__mro__
    if root not in mro:
        raise TypeError(f"{cls.__name__}: {mixin.__name__} goes in front of a FedAvg-family strategy")
    for base in mro[mro.index(mixin) + 1 : mro.index(root)]:
        if base.__module__.startswith("flwr.") and method in vars(base) and base not in weighted_means:
            raise TypeError(
                f"{cls.__name__}: {mixin.__name__} replaces a weighted mean, but {base.__name__}.{method} "
                f"aggregates otherwise, and mixing them would silently average; use fastfed's FastFedMedian or "
                f"FastFedTrimmedAvg, or {base.__name__} without the mixin"
            )
