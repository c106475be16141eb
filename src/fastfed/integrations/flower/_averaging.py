"""The averaging both Flower APIs share: stream results into a fastfed Accumulator, plain or compressed."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence

import numpy as np

from ...aggregation import LayerSpec, cast_to_layer, weighted_mean, weighted_mean_encoded, weighted_sum
from ...compression import Codec, encode
from ...compression.quantizer import mix64

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


NUMPY_STYPE = "numpy.ndarray"  # Flower's serialization type for .npy bytes


def npy_view(data: bytes) -> np.ndarray:
    """A read-only, zero-copy view of one ``.npy``-serialized array (what Flower puts on the wire).

    ``np.load`` copies every tensor out of its bytes; aggregation only needs to read it once. The
    header is parsed by NumPy's own safe reader, and object dtypes (which would need pickle) are refused.
    """
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as error:
        raise ValueError(f"not a .npy array: {error}") from None
    if dtype.hasobject:
        raise ValueError("object arrays are refused: reading them would need pickle")
    count = math.prod(shape)
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f".npy data is {len(data) - offset} bytes, expected {count * dtype.itemsize} for {shape}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


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
    delta = [np.asarray(new) - np.asarray(old) for new, old in zip(updated, received)]
    return encode(delta, codec, seed=seed, rotation_seed=rotation_seed)


def average_results(
    plain: list[tuple[list[np.ndarray], float]],
    encoded: list[tuple[bytes, float]],
    global_weights: Sequence[np.ndarray] | None,
) -> list[np.ndarray]:
    """The weighted mean of a round's results: client weights (``plain``) and/or fastfed-encoded deltas
    from ``global_weights`` (``encoded``), in one batched pass over each kind.

    Flower hands the strategy every result at once, and zero-copy views of them cost no memory, so
    the batched kernels (tiled, many clients per sweep) read each byte once.
    """
    if not encoded:
        return weighted_mean([arrays for arrays, _ in plain], [weight for _, weight in plain])
    if global_weights is None:
        raise ValueError("compressed updates need the round's global weights (configure_fit/train was not called)")
    mean_delta = weighted_mean_encoded([payload for payload, _ in encoded], [weight for _, weight in encoded])
    # Each compressed client's weights are global + delta, so their mean is global + mean(delta).
    rebased = [np.asarray(g, np.float64) + d for g, d in zip(global_weights, mean_delta)]
    if plain:
        encoded_total = math.fsum(weight for _, weight in encoded)
        plain_total = math.fsum(weight for _, weight in plain)
        plain_sums = weighted_sum([arrays for arrays, _ in plain], [weight for _, weight in plain])
        rebased = [(s + r * encoded_total) / (plain_total + encoded_total) for s, r in zip(plain_sums, rebased)]
    return [
        cast_to_layer(values, LayerSpec(np.shape(g), np.asarray(g).dtype)) for values, g in zip(rebased, global_weights)
    ]
