"""What every aggregation path checks and shares: layer specs, weights, and the cast back to a layer's dtype.

An update is what Keras ``get_weights()``, Flower ``NDArrays`` or a NumPy-converted PyTorch
``state_dict`` give: a list of arrays, one per layer. Bad input raises an exception that names the
client and the layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

__all__ = [
    "AllNonFinite",
    "LayerSpec",
    "NonFinite",
    "Screened",
    "cast_to_layer",
    "check_non_finite_policy",
    "check_update",
    "check_updates",
    "check_weight",
    "check_weights",
    "exact_integer_mean",
    "exact_weight",
    "first_non_finite_layer",
    "is_exact_integer",
    "kernel_output",
    "layers_of",
    "match_specs",
    "non_finite_error",
    "normalized_weights",
    "refuse_masked",
    "rounded_quotient",
]

ArrayLike = Any
Update = Sequence[ArrayLike]

#: What to do with a client whose update holds NaN or infinity: ``"raise"`` a ``ValueError`` naming
#: the client and layer, ``"skip"`` the client (its weight does not count), or ``"propagate"`` the
#: values into the result as IEEE arithmetic does.
NonFinite = Literal["raise", "skip", "propagate"]
NON_FINITE_POLICIES = ("raise", "skip", "propagate")


class Screened(NamedTuple):
    """An aggregate and the clients that ``non_finite="skip"`` left out of it (by position)."""

    layers: list[np.ndarray]
    skipped: list[int]


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


def check_non_finite_policy(policy: object) -> NonFinite:
    if policy not in NON_FINITE_POLICIES:
        raise ValueError(f"non_finite must be one of {', '.join(map(repr, NON_FINITE_POLICIES))}, got {policy!r}")
    return policy  # type: ignore[return-value]


class AllNonFinite(ValueError):
    """Under ``non_finite="skip"``, every client that could contribute holds NaN or infinity;
    ``clients`` are their positions."""

    def __init__(self, message: str, clients: list[int]) -> None:
        super().__init__(message)
        self.clients = clients


def non_finite_error(client: int, layer: int) -> ValueError:
    return ValueError(
        f"client {client}, layer {layer}: holds NaN or infinity; pass non_finite='skip' to leave such "
        "clients out, or non_finite='propagate' to keep them"
    )


def refuse_masked(value: object, what: str) -> None:
    """Masked arrays are refused: ``np.asarray`` would drop their masks and average the hidden values."""
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{what}: masked arrays are refused, their masks would be lost; fill them first (np.ma.filled)")


def check_weight(weight: Any, client: int) -> float:
    refuse_masked(weight, f"weight of client {client}")
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise TypeError(f"weight of client {client} is {weight!r}; expected a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"weight of client {client} is {value}; weights must be finite and non-negative")
    return value


def _as_array(layer: ArrayLike, client: int, index: int) -> np.ndarray:
    refuse_masked(layer, f"client {client}, layer {index}")
    try:
        return np.asarray(layer)
    except (TypeError, ValueError) as error:
        raise TypeError(f"client {client}, layer {index}: not convertible to an array ({error})") from None


def check_weights(weights: object, count: int, what: str = "client updates") -> list[float]:
    """K finite, non-negative weights as floats; ``None`` weighs the ``count`` clients equally."""
    if weights is None:
        return [1.0] * count
    refuse_masked(weights, "weights")
    if isinstance(weights, np.ndarray):
        weight_list = list(weights.reshape(-1))
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        weight_list = list(weights)
    else:
        raise TypeError(f"weights: expected a sequence of numbers, got {type(weights).__name__}")
    if len(weight_list) != count:
        raise ValueError(f"got {count} {what} but {len(weight_list)} weights")
    return [check_weight(w, k) for k, w in enumerate(weight_list)]


def normalized_weights(weights: Sequence[float]) -> tuple[np.ndarray, float, int]:
    """``(scaled, total, exponent)``: the weights times ``2**-exponent``, with their total in [0.5, 1).

    Scaling by a power of two is exact, so a mean computed from the scaled weights has the same bits
    as one computed from the weights themselves, but no weight product or total can overflow
    (weights of 1e308) or lose precision to subnormals (weights of 1e-300). The exception: values
    that are themselves subnormal (below 2.2e-308 in float64), whose products with weights below 1
    can lose their last bits.
    """
    largest = max(weights, default=0.0)
    if largest == 0.0:
        return np.zeros(len(weights)), 0.0, 0
    exponent = math.frexp(largest)[1]
    exponent += math.frexp(math.fsum(math.ldexp(w, -exponent) for w in weights))[1]
    scaled = [math.ldexp(w, -exponent) for w in weights]
    return np.array(scaled, dtype=np.float64), math.fsum(scaled), exponent


def first_non_finite_layer(layers: Sequence[np.ndarray]) -> int | None:
    """The index of the first float layer holding NaN or infinity, or ``None``."""
    for j, values in enumerate(layers):
        if values.dtype.kind != "f" or values.size == 0:
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            quick = values.sum()  # one fast pass; a finite sum proves every value finite
        if not np.isfinite(quick) and not np.isfinite(values).all():
            return j
    return None


# Every finite float64 is a multiple of 2**-1074, so weights times 2**1074 are exact integers.
_WEIGHT_SCALE_BITS = 1074


def exact_weight(weight: float) -> int:
    """``weight * 2**1074`` as an exact integer."""
    numerator, denominator = float(weight).as_integer_ratio()
    return numerator * ((1 << _WEIGHT_SCALE_BITS) // denominator)


def is_exact_integer(spec: LayerSpec) -> bool:
    """64-bit integer layers are averaged exactly: float64 cannot hold their values (2**63 - 1)."""
    return spec.dtype.kind in "iu" and spec.dtype.itemsize == 8


def rounded_quotient(numerators: np.ndarray, denominator: int, dtype: np.dtype[Any]) -> np.ndarray:
    """``numerators / denominator`` (Python integers) rounded to nearest, half to even, as ``dtype``."""
    quotients = numerators // denominator
    twice_remainders = 2 * (numerators - quotients * denominator)
    round_up = (twice_remainders > denominator) | ((twice_remainders == denominator) & (quotients % 2 == 1))
    quotients = quotients + round_up
    return np.array(quotients.tolist(), dtype=dtype).reshape(numerators.shape)


def exact_integer_mean(values: Sequence[np.ndarray], weights: Sequence[float], dtype: np.dtype[Any]) -> np.ndarray:
    """The weighted mean of integer arrays in exact integer arithmetic, rounded half to even.

    Python integers at Python speed: used for 64-bit integer layers (step counters), whose values
    float64 would round (the mean of ``[2**63 - 1]`` must be ``2**63 - 1``).
    """
    scaled = [exact_weight(w) for w in weights]
    numerators = np.zeros(values[0].shape, dtype=object)
    for weight, array in zip(scaled, values):
        if weight:
            numerators += weight * array.astype(object)
    return rounded_quotient(numerators, sum(scaled), dtype)


def as_flat_layer(array: ArrayLike, client: int, layer: int) -> np.ndarray:
    """A 1-D, C-contiguous, aligned, native-byte-order view (or copy) of one layer of one client."""
    # The common case first: with a hundred clients of a few layers each, these checks run
    # thousands of times per aggregation, and np.require alone would cost a millisecond.
    if type(array) is np.ndarray and array.dtype.kind in "fiu" and array.dtype.isnative and array.dtype.itemsize <= 8:
        flags = array.flags
        if flags.c_contiguous and flags.aligned:
            return array.reshape(-1)
    array = _as_array(array, client, layer)
    if array.dtype.kind not in "fiu" or array.dtype.itemsize > 8:  # long double: no kernel reads it
        raise TypeError(
            f"client {client}, layer {layer}: dtype {array.dtype} cannot be averaged; expected a float16, float32, "
            "float64 or integer array"
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
    refuse_masked(update, f"client {client}")
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


def check_updates(updates: object) -> tuple[list[list[np.ndarray]], list[LayerSpec]]:
    """K client updates, normalised and checked against the first one's layer specs.

    Typed as object: this is the boundary where anything a user passes is checked.
    """
    if isinstance(updates, np.ndarray) or not isinstance(updates, Sequence):
        raise TypeError(f"updates: expected a sequence of client updates, got {type(updates).__name__}")
    if len(updates) == 0:
        raise ValueError("updates: expected at least one client update, got none")
    specs: list[LayerSpec] | None = None
    clients: list[list[np.ndarray]] = []
    for k, update in enumerate(updates):
        flat, own = check_update(update, k, specs)
        specs = specs or own
        clients.append(flat)
    assert specs is not None
    return clients, specs


def cast_to_layer(values: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """Casts a float64 mean to the layer's dtype and shape; integers round to nearest (half to even).

    Always returns an array, a 0-d one for scalar layers.
    """
    if spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        rounded = np.asarray(np.rint(values))
        # float(2**63 - 1) is 2**63, which would wrap: values at or past the limits (as floats) take
        # the integer limits themselves.
        high, low = rounded >= float(info.max), rounded <= float(info.min)
        result = np.where(high | low, 0.0, rounded).astype(spec.dtype)
        result[high], result[low] = info.max, info.min
        return result.reshape(spec.shape)
    return np.asarray(values).astype(spec.dtype, copy=False).reshape(spec.shape)


def kernel_output(spec: LayerSpec, as_sum: bool) -> np.ndarray:
    # float32 means are written by the kernel directly; everything else goes through float64.
    dtype = np.float32 if spec.dtype == np.float32 and not as_sum else np.float64
    return np.empty(spec.size, dtype=dtype)
