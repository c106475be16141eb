"""What every aggregation path checks and shares: layer specs, weights, and the cast back to a layer's dtype.

An update is what Keras ``get_weights()``, Flower ``NDArrays`` or a NumPy-converted PyTorch
``state_dict`` give: a list of arrays, one per layer. Bad input raises an exception that names the
client and the layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["LayerSpec", "cast_to_layer", "check_update", "check_weight", "kernel_output", "layers_of", "match_specs"]

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


def check_weight(weight: Any, client: int) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise TypeError(f"weight of client {client} is {weight!r}; expected a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"weight of client {client} is {value}; weights must be finite and non-negative")
    return value


def _as_array(layer: ArrayLike, client: int, index: int) -> np.ndarray:
    try:
        return np.asarray(layer)
    except (TypeError, ValueError) as error:
        raise TypeError(f"client {client}, layer {index}: not convertible to an array ({error})") from None


def as_flat_layer(array: ArrayLike, client: int, layer: int) -> np.ndarray:
    """A 1-D, C-contiguous, aligned, native-byte-order view (or copy) of one layer of one client."""
    # The common case first: with a hundred clients of a few layers each, these checks run
    # thousands of times per aggregation, and np.require alone would cost a millisecond.
    if type(array) is np.ndarray and array.dtype.kind in "fiu" and array.dtype.isnative:
        flags = array.flags
        if flags.c_contiguous and flags.aligned:
            return array.reshape(-1)
    array = _as_array(array, client, layer)
    if array.dtype.kind not in "fiu":
        raise TypeError(
            f"client {client}, layer {layer}: dtype {array.dtype} cannot be averaged; expected a float or integer array"
        )
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    flat: np.ndarray = np.require(array, requirements=("C", "A")).reshape(-1)  # as the kernels require
    return flat


def layers_of(update: object, client: int) -> list[ArrayLike]:
    if isinstance(update, np.ndarray) or not isinstance(update, Sequence) or isinstance(update, (str, bytes)):
        raise TypeError(f"client {client}: expected a list of arrays (one per layer), got {type(update).__name__}")
    return list(update)


def match_specs(specs: list[LayerSpec], expected: list[LayerSpec] | None, client: int) -> None:
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


def check_update(
    update: Update, client: int, expected: list[LayerSpec] | None
) -> tuple[list[np.ndarray], list[LayerSpec]]:
    """Normalises one client's layers and checks them against ``expected`` (the first client's)."""
    layers = layers_of(update, client)
    flat: list[np.ndarray] = []
    shapes: list[tuple[int, ...]] = []
    for j, layer in enumerate(layers):
        array = layer if type(layer) is np.ndarray else _as_array(layer, client, j)
        shapes.append(array.shape)
        flat.append(as_flat_layer(array, client, j))
    # Compared field by field first: building a LayerSpec per client and layer costs more.
    if expected is not None and len(expected) == len(layers):
        pairs = zip(shapes, flat, expected)
        if all(shape == want.shape and values.dtype == want.dtype for shape, values, want in pairs):
            return flat, expected
    specs = [LayerSpec(shape, values.dtype.newbyteorder("=")) for shape, values in zip(shapes, flat)]
    match_specs(specs, expected, client)
    return flat, specs


def cast_to_layer(values: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """Casts a float64 mean to the layer's dtype and shape; integers round to nearest (half to even).

    Always returns an array, a 0-d one for scalar layers.
    """
    if spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return np.asarray(values).astype(spec.dtype, copy=False).reshape(spec.shape)


def kernel_output(spec: LayerSpec, as_sum: bool) -> np.ndarray:
    # float32 means are written by the kernel directly; everything else goes through float64.
    dtype = np.float32 if spec.dtype == np.float32 and not as_sum else np.float64
    return np.empty(spec.size, dtype=dtype)
