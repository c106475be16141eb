"""Client data as fastfed trains and evaluates on it: one pair of NumPy arrays ``(x, y)`` per client.

Accepted for each client: an ``(x, y)`` pair of arrays; a ``{"x": ..., "y": ...}`` dict; or a
``tf.data.Dataset`` whose elements are ``(x, y)`` tuples or ``{"x", "y"}`` dicts, as TFF's
``ClientData.create_tf_dataset_for_client`` gives after a ``map``. A dataset is read into memory
once; if it is already batched (``.batch(...)``, also when mapped, prefetched, zipped or
concatenated afterwards), its batches are joined back into examples, and fastfed batches them with
its own ``batch_size`` and reshuffles them every round, as TFF's tutorials do with
``.shuffle().batch()``. A
:class:`fastfed.data.ClientData` stands for all of its clients, in the order of its ids.

Each client is then conformed to the model: inputs to the model's input dtype, integer labels of
any width (or of shape ``(n, 1)``) to flat int64 labels, float labels to float32. A client that
cannot be conformed raises :class:`ClientDataError` with one line naming the client and the mismatch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ClientDataError", "DataSpec", "client_arrays", "declared_outputs"]

ClientArrays = tuple[np.ndarray, np.ndarray]


class ClientDataError(ValueError):
    """A client's data cannot be used with the model; the message names the client and the mismatch."""

    def __init__(self, client: int, reason: str) -> None:
        super().__init__(f"client {client}: {reason}")
        self.client, self.reason = client, reason


def _is_dataset(value: object) -> bool:
    return type(value).__module__.startswith("tensorflow") and hasattr(value, "element_spec")


# tf.data's batching transformations (batch with or without num_parallel_calls, padded_batch,
# rebatch).
_BATCHING = {"_BatchDataset", "_ParallelBatchDataset", "_PaddedBatchDataset", "_RebatchDataset"}
# tf.data's transformations whose elements join those of several datasets.
_JOINING = {"_ZipDataset", "_ConcatenateDataset"}


def _pair(spec: Any) -> tuple[Any, Any] | None:
    """The x and y components of an element spec: a pair, or a dict with 'x' and 'y'."""
    if isinstance(spec, Mapping) and {"x", "y"} <= set(spec):
        return spec["x"], spec["y"]
    return (spec[0], spec[1]) if isinstance(spec, tuple) and len(spec) == 2 else None


def _batched(dataset: Any) -> bool:
    """Whether a dataset's elements are batches. Where batches lie upstream (no unbatch() after
    them), they are if x and y still have the batch's rank and leading dimension: batch(...,
    drop_remainder=True) then map() or prefetch() keeps them, a map that turns each batch into one
    example (the windowing recipe, ``batch(n + 1).map(lambda c: (c[:-1], c[1:]))``) does not.
    Otherwise, if x's leading dimension is unknown."""
    element = _pair(dataset.element_spec)
    if element is None:
        return False
    source = _batch_source(dataset)
    if source is not None:
        batch = _pair(source.element_spec)
        return batch is not None and all(
            now.shape.rank is not None and now.shape.rank == then.shape.rank > 0 and now.shape[0] == then.shape[0]
            for now, then in zip(element, batch)
        )
    x_shape = element[0].shape
    return x_shape.rank is not None and x_shape.rank > 0 and x_shape[0] is None


def _batch_source(dataset: Any) -> Any | None:
    """The nearest dataset at or upstream of this one, with no unbatch() between, whose elements
    are batches: a batching step, or a zip or concatenation of datasets that each keep their own
    batches (``Dataset.zip((xs.batch(n), ys.batch(n)))``)."""
    node = dataset
    while True:
        kind = type(node).__name__
        if kind in _BATCHING:
            return node
        inputs = node._inputs() if kind != "_UnbatchDataset" and hasattr(node, "_inputs") else []
        if kind in _JOINING:
            return node if inputs and all(_keeps_batches(joined) for joined in inputs) else None
        if len(inputs) != 1:  # a source, an unbatch, or another transformation of several datasets
            return None
        node = inputs[0]


def _keeps_batches(dataset: Any) -> bool:
    """Whether every component of a dataset's elements has the leading dimension of its batches."""
    import tensorflow as tf

    source = _batch_source(dataset)
    if source is None:
        return False
    size = tf.nest.flatten(source.element_spec)[0].shape
    components = tf.nest.flatten(dataset.element_spec)
    return (
        size.rank is not None
        and size.rank > 0
        and all(spec.shape.rank is not None and spec.shape.rank > 0 and spec.shape[0] == size[0] for spec in components)
    )


def _from_dataset(index: int, dataset: Any) -> ClientArrays:
    spec = dataset.element_spec
    if _pair(spec) is None:
        if isinstance(spec, Mapping):
            raise ClientDataError(
                index,
                f"dataset elements are dicts with keys {sorted(spec)}; expected 'x' and 'y' "
                "(map them, e.g. dataset.map(lambda e: (e['pixels'], e['label'])))",
            )
        raise ClientDataError(index, "dataset elements must be (x, y) pairs or dicts with 'x' and 'y'")
    if isinstance(spec, Mapping):
        dataset = dataset.map(lambda element: (element["x"], element["y"]))
    try:
        if _batched(dataset):
            dataset = dataset.unbatch()
        chunks = list(dataset.batch(4096).as_numpy_iterator())  # read in large batches: per element is slow
    except Exception as error:  # the client's own pipeline failed (a missing file, a bad map): name the client
        raise ClientDataError(index, f"the dataset could not be read: {first_line(error)}") from error
    if not chunks:
        raise ClientDataError(index, "the dataset is empty")
    return np.concatenate([x for x, _ in chunks]), np.concatenate([y for _, y in chunks])


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message; of a TensorFlow runtime error, the line of its cause,
    without the name of the function it ran in."""
    text = [line for line in str(error).strip().splitlines() if line.strip()]
    if text and text[0].endswith("execution error:"):
        # TensorFlow's runtime errors give their cause last, after where the failing op was defined.
        causes = [line for line in text[1:] if not line[0].isspace() and not line.startswith("Detected at node")]
        text = causes[-1:] or text
    line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text[0]) if text else type(error).__name__
    return line[:limit]


def _one_client(index: int, client: object) -> ClientArrays:
    if _is_dataset(client):
        return _from_dataset(index, client)
    if isinstance(client, Mapping):
        if not {"x", "y"} <= set(client):
            raise ClientDataError(index, f"a dict client needs 'x' and 'y', got keys {sorted(client)}")
        client = (client["x"], client["y"])
    if not (isinstance(client, Sequence) and len(client) == 2):
        raise ClientDataError(
            index, f"expected (x, y) arrays, a dict with 'x' and 'y', or a tf.data.Dataset; got {type(client).__name__}"
        )
    x, y = np.asarray(client[0]), np.asarray(client[1])
    if x.ndim == 0 or y.ndim == 0:
        raise ClientDataError(index, "x and y must hold one row per example")
    if len(x) != len(y):
        raise ClientDataError(index, f"{len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise ClientDataError(index, "has no examples")
    return x, y


def client_arrays(clients: object) -> list[ClientArrays]:
    """Every client's ``(x, y)`` arrays, from any accepted form (see the module documentation)."""
    from ..data import ClientData

    if isinstance(clients, ClientData):
        clients = clients.all()
    if _is_dataset(clients) or isinstance(clients, (Mapping, np.ndarray)) or not isinstance(clients, Sequence):
        raise TypeError(
            f"clients: expected a list of clients (each (x, y), a dict or a tf.data.Dataset) or a ClientData, "
            f"got {type(clients).__name__}"
        )
    if len(clients) == 0:
        raise ValueError("clients: a round needs at least one client")
    return [_one_client(index, client) for index, client in enumerate(clients)]


def _describe(shape: tuple[int, ...], dtype: np.dtype[Any]) -> str:
    return f"shape {shape} {dtype}" if shape else f"scalar {dtype}"


def declared_outputs(model: Any) -> list[Any] | None:
    """A model's declared outputs (Keras tensors), or ``None`` where it declares none (subclassed)."""
    try:
        return list(model.outputs)
    except (AttributeError, ValueError, TypeError):
        return None


class DataSpec:
    """The per-example shapes and dtypes the model is trained on: inputs from the model where it
    declares them, labels from the first client; later clients are converted to them."""

    def __init__(self, x_shape: tuple[int | None, ...] | None, x_dtype: np.dtype[Any] | None) -> None:
        self.x_shape, self.x_dtype = x_shape, x_dtype
        self.y_shape: tuple[int, ...] | None = None
        self.y_dtype: np.dtype[Any] | None = None

    @classmethod
    def of_model(cls, model: Any) -> DataSpec:
        inputs, outputs = getattr(model, "inputs", None), declared_outputs(model)
        if (inputs and len(inputs) > 1) or (outputs and len(outputs) > 1):
            raise ValueError(
                f"fastfed trains models of one input and one output; this model has {len(inputs or [None])} "
                f"input(s) and {len(outputs or [None])} output(s)"
            )
        if inputs and len(inputs) == 1:
            return cls(tuple(inputs[0].shape[1:]), np.dtype(inputs[0].dtype))
        return cls(None, None)  # a subclassed model: the first client decides

    def tensor_specs(self) -> tuple[Any, Any]:
        """``tf.TensorSpec`` of a batch of inputs and of labels (known once a client was conformed)."""
        import tensorflow as tf

        if self.x_shape is None or self.y_shape is None:
            raise RuntimeError("the data spec is fixed by the first client; conform one first")
        return (
            tf.TensorSpec((None, *self.x_shape), self.x_dtype),
            tf.TensorSpec((None, *self.y_shape), self.y_dtype),
        )

    def conform(self, index: int, x: Any, y: Any) -> ClientArrays:
        x, y = np.asarray(x), np.asarray(y)
        if self.x_shape is None:
            self.x_shape = x.shape[1:]
            self.x_dtype = np.dtype(np.float32) if x.dtype.kind in "fiub" else x.dtype
        expected = self.x_shape
        if len(x.shape) - 1 != len(expected) or any(w is not None and w != d for w, d in zip(expected, x.shape[1:])):
            wanted = tuple("?" if w is None else w for w in expected)
            raise ClientDataError(
                index, f"inputs have {_describe(x.shape[1:], x.dtype)} per example; the model takes {wanted}"
            )
        if x.dtype.kind not in "fiub":
            raise ClientDataError(index, f"inputs of dtype {x.dtype} cannot be converted to {self.x_dtype}")
        y = self._labels(index, y)
        return np.ascontiguousarray(x, dtype=self.x_dtype), y

    def _labels(self, index: int, y: np.ndarray) -> np.ndarray:
        original = y
        if y.dtype.kind in "iub" and self.y_dtype is not None and self.y_dtype.kind == "f":
            # Integer labels beside a first client's float ones (integral floats, say): floats too.
            y = original = y.astype(np.float32)
        if y.ndim == 2 and y.shape[1] == 1 and y.dtype.kind in "iubf":
            y = y.reshape(-1)  # (n, 1) labels, as Keras's losses accept them
        integer_spec = self.y_dtype is not None and self.y_dtype.kind == "i"
        if y.dtype.kind in "iub" or (y.dtype.kind == "f" and integer_spec and y.ndim == 1 and _integral(y)):
            y = y.astype(np.int64)
        elif y.dtype.kind == "f":
            y = y.astype(np.float32) if original.ndim != 2 or original.shape[1] != 1 else original.astype(np.float32)
        else:
            raise ClientDataError(index, f"labels of dtype {y.dtype} are not numbers")
        if self.y_dtype is None:
            self.y_shape, self.y_dtype = y.shape[1:], y.dtype
        elif (y.shape[1:], y.dtype) != (self.y_shape, self.y_dtype):
            raise ClientDataError(
                index,
                f"labels have {_describe(original.shape[1:], original.dtype)} per example; "
                f"the first client's have {_describe(self.y_shape or (), self.y_dtype)}",
            )
        return np.ascontiguousarray(y)


def _integral(values: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(values)) and np.array_equal(values, np.round(values)))
