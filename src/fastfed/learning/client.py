"""Client training: one Keras model per worker, reused across clients and rounds, and a client's
local epochs in one compiled call.

Each call trains one client on all its local epochs inside a single ``tf.function``: a
``tf.while_loop`` over batches gathered from the client's arrays by index, with the shuffle order
(derived from the seed, the round and the client) passed in as a tensor. Python is involved once
per client, not once per batch. Every batch has ``batch_size`` rows: a client's last, short batch
is filled up with rows that are masked out of the loss, the gradients and the metrics (layers that
use batch statistics, such as BatchNormalization, do see them). One batch shape means the kernels
of a step are prepared once, not once per client size. With ``jit_compile=True`` the loop is
compiled by XLA, and clients are also padded to a few bucket sizes so that clients of different
sizes share compilations. Metrics are updated inside the loop, so, as in TFF, training metrics are
measured during local training and weighted by examples.

How a client trains can be changed with a :class:`ClientStep`: FedProx (Li et al. 2020,
"Federated Optimization in Heterogeneous Networks") is one, adding a proximal term to the loss.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .inputs import ClientDataError, DataSpec, first_line
from .losses import output_width, per_example_loss, resolve_loss, resolve_metrics

__all__ = ["ClientResult", "ClientStep", "ClientTrainer", "FedProx", "enable_determinism"]

log = logging.getLogger("fastfed")


def enable_determinism() -> None:
    """Deterministic TensorFlow kernels: with a fixed seed, runs (and resumed runs) repeat bit for bit."""
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()


@dataclass
class ClientResult:
    weights: list[np.ndarray]
    num_examples: int
    num_batches: int
    loss_sum: float


class ClientStep:
    """What a client minimises and how its gradients are used; the default is plain local SGD.

    Subclass it and pass an instance as ``FedAvg(client_step=...)`` to change local training. Both
    methods run inside the compiled training loop, once per batch, so they must use TensorFlow or
    ``keras.ops`` operations on their tensor arguments. The instance is pickled to Ray workers and
    shared by the local executor's client threads, so it should hold no state that training changes.
    """

    def objective(self, batch_loss: Any, trainable: Sequence[Any], start: Sequence[Any]) -> Any:
        """The scalar to minimise for one batch.

        Args:
          batch_loss: the model's loss on the batch (mean over its examples, plus the model's own
            regularization losses).
          trainable: the model's trainable variables.
          start: the values they had when the client started, i.e. the global model of the round.
        """
        return batch_loss

    def gradients(self, gradients: Sequence[Any], trainable: Sequence[Any], start: Sequence[Any]) -> Sequence[Any]:
        """The gradients to apply, given those of :meth:`objective` (e.g. to clip them)."""
        return gradients


@dataclass(frozen=True)
class FedProx(ClientStep):
    """FedProx's local objective (Li et al. 2020): the loss plus ``mu / 2 * ||w - w_global||^2``,
    which keeps heterogeneous clients close to the global model."""

    mu: float

    def __post_init__(self) -> None:
        if not (self.mu >= 0 and math.isfinite(self.mu)):
            raise ValueError(f"mu must be a non-negative number, got {self.mu!r}")

    def objective(self, batch_loss: Any, trainable: Sequence[Any], start: Sequence[Any]) -> Any:
        import tensorflow as tf

        distance = tf.add_n([tf.reduce_sum(tf.square(w - w0)) for w, w0 in zip(trainable, start)])
        return batch_loss + 0.5 * self.mu * distance


def _bucket(rows: int, batch_size: int) -> int:
    """Rows a client is padded to under XLA: a whole number of batches, rounded up to a power of two
    of batches, so that clients of any size share a handful of compiled shapes."""
    batches = -(-rows // batch_size)
    return batch_size * (1 << (batches - 1).bit_length())


class ClientTrainer:
    """Trains clients one after another on one Keras model.

    Args:
      jit_compile: compile the local-training loop with XLA. ``None`` (the default) decides by
        device: XLA on GPUs, where it fuses the many small kernels of a step, and a plain graph on
        CPUs, where TensorFlow's own kernels are as fast and XLA would compile each new client size.
        A model that XLA cannot compile falls back to a plain graph, with a log line.
      clients_per_call: how many clients :meth:`train_together` trains in one call, vectorized over
        them (see :mod:`fastfed.learning.together`). ``None`` (the default): 8 on GPUs, where it pays,
        1 on CPUs, where batched products are no faster. Clients whose optimizer or model it cannot
        handle are trained one at a time, with a log line.
    """

    def __init__(
        self,
        model_fn: Callable[[], Any],
        optimizer_fn: Callable[[], Any],
        loss: Any,
        batch_size: int,
        local_epochs: int,
        metrics: Sequence[Any] | None = None,
        step: ClientStep | None = None,
        jit_compile: bool | None = None,
        model: Any = None,
        clients_per_call: int | None = None,
    ) -> None:
        import keras
        import tensorflow as tf

        self._tf = tf
        self._factories = (model_fn, optimizer_fn, loss)  # as given: a sibling builds its own from them
        self.model = model_fn() if model is None else model
        self.optimizer = optimizer_fn()
        self.optimizer.build(self.model.trainable_variables)
        # Keras 3 keeps the learning rate among the variables, so a reset restores values, not zeros.
        self._fresh_optimizer = [keras.ops.convert_to_numpy(v) for v in self.optimizer.variables]
        self.loss = resolve_loss(loss, self.model)
        self.batch_size = batch_size
        self.local_epochs = local_epochs
        self.step = step or ClientStep()
        self.spec = DataSpec.of_model(self.model)
        self._metric_names = metrics
        self.metrics: list[Any] = []
        self._start = [
            tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name=f"start_{i}")
            for i, v in enumerate(self.model.trainable_variables)
        ]
        # The random state of dropout and other random layers, set per client from the client's seed
        # so that what a client draws depends on nothing trained before it (or beside it).
        self._seed_states = [v for v in self.model.variables if v.name == "seed_generator_state"]
        accelerated = bool(tf.config.list_physical_devices("GPU"))
        self.jit_compile = accelerated if jit_compile is None else jit_compile
        self.clients_per_call = (8 if accelerated else 1) if clients_per_call is None else clients_per_call
        self._together: Any = None
        self._loop: Any = None
        self._solo_reason: str | None = None  # why clients cannot train beside this trainer's, once known
        self._solo_told = False
        self._traces = 0
        self._converted: tuple[list[np.ndarray], list[Any]] | None = None

    def sibling(self) -> ClientTrainer | None:
        """Another trainer of the same settings on its own model, optimizer and metrics, sharing this
        one's data spec (one per thread, for training clients side by side); ``None``, with a log
        line once, where that is not possible."""
        if self._solo_reason is None:
            other, self._solo_reason = self._independent_sibling()
            if other is not None:
                return other
        self.trains_alone()
        return None

    def trains_alone(self) -> bool:
        """Whether clients are known to be unable to train beside this trainer's (see
        :meth:`sibling`); the first time, a log line says why."""
        if self._solo_reason is None:
            return False
        if not self._solo_told:
            log.info("training clients one at a time: %s", self._solo_reason)
            self._solo_told = True
        return True

    def _independent_sibling(self) -> tuple[ClientTrainer | None, str | None]:
        import keras

        model_fn, optimizer_fn, loss = self._factories
        metrics = self._metric_names
        try:  # metric objects given by the user would be shared: each trainer gets its own copy
            own_metrics = None if metrics is None else [
                type(m).from_config(m.get_config()) if isinstance(m, keras.metrics.Metric) else m for m in metrics
            ]  # fmt: skip
        except Exception as error:
            return None, f"a metric could not be copied for a second thread ({describe_failure(error)})"
        try:
            other = ClientTrainer(
                model_fn, optimizer_fn, loss, self.batch_size, self.local_epochs, own_metrics, self.step,
                self.jit_compile, clients_per_call=self.clients_per_call,
            )  # fmt: skip
        except Exception as error:  # e.g. one optimizer object given for two models
            return None, f"a second model and optimizer could not be built ({describe_failure(error)})"
        mine = {id(v) for v in [*self.model.variables, *self.optimizer.variables]}
        if any(id(v) in mine for v in [*other.model.variables, *other.optimizer.variables]):
            return None, "model_fn or client_optimizer returns the same object on every call; threads need their own"
        other.spec = self.spec
        loop = self._loop  # read once: a worker thread falling back from XLA may reset it meanwhile
        if loop is not None:
            other._resolve_metrics()
            try:
                other._loop = other._loop_on_own_state(self, loop)
            except Exception as error:  # it traces its own instead
                log.debug("a client thread traces its own loop: %s", describe_failure(error))
        return other, None

    def _state(self) -> list[Any]:
        """The variables the training loop reads and writes, in an order that siblings share."""
        metric_variables = [v for metric in self.metrics for v in metric.variables]
        return [*self.model.variables, *self.optimizer.variables, *self._start, *metric_variables]

    def _loop_on_own_state(self, leader: ClientTrainer, loop: Any) -> Any:
        """``leader``'s traced ``loop`` run on this trainer's variables: the same graph, called with
        this trainer's variable handles in place of the leader's, so that threads share one trace and
        one instantiation (a few hundred milliseconds each). ``None`` where the two states do not
        correspond one to one, the optimizers are configured differently (their settings are
        constants of the graph, as are the fresh optimizer's values), or the loop captures state not
        among them; this trainer then traces its own, as it also does where TensorFlow's concrete
        functions cannot be called with other captures (``_call_flat(inputs, captured_inputs)``,
        TensorFlow 2.13 and later)."""
        tf = self._tf
        if "captured_inputs" not in inspect.signature(getattr(loop, "_call_flat", lambda: None)).parameters:
            return None
        mine, theirs = [_tf_variable(v) for v in self._state()], [_tf_variable(v) for v in leader._state()]
        if len(mine) != len(theirs) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(mine, theirs)):
            return None
        if not all(np.array_equal(a, b) for a, b in zip(self._fresh_optimizer, leader._fresh_optimizer)):
            return None
        if _settings(self.optimizer) != _settings(leader.optimizer):
            return None
        own_handles = {id(b.handle): a.handle for a, b in zip(mine, theirs)}
        captures = []
        for captured in loop.captured_inputs:
            if id(captured) in own_handles:
                captures.append(own_handles[id(captured)])
            elif captured.dtype == tf.resource:
                return None
            else:  # a constant: the same for every trainer
                captures.append(captured)
        return _LoopWithCaptures(loop, captures)

    def ready(self) -> None:
        """Builds (traces) the compiled loop that :meth:`train` or :meth:`train_together` will call,
        in the calling thread; the data spec must be known (a client prepared by this trainer or the
        one it is a sibling of)."""
        self._resolve_metrics()
        if self.clients_per_call > 1 and self._together is None:
            self._build_together()
        if self._loop is None:
            self._trace_loop()

    def _trace_loop(self) -> None:
        self._loop = self._build_loop(xla=self.jit_compile)
        self._traces += 1
        if self._solo_reason is None:  # whether clients may train beside this trainer's, once
            self._solo_reason = self._shared_state()

    def _shared_state(self) -> str | None:
        """Why the traced loop cannot run beside a sibling's, or ``None``: it touches variables that
        are not this trainer's (e.g. Keras's global seed generator, behind random ops given no seed
        generator), or draws from stateful random ops, whose draws would depend on thread timing."""
        from tensorflow.python.framework import op_def_registry

        handles = {id(_tf_variable(v)) for v in self._state()}
        foreign = [v.name for v in self._loop.variables if id(v) not in handles]
        if foreign:
            return f"the training step uses state shared beyond one model ({', '.join(foreign[:3])})"
        graph = self._loop.graph.as_graph_def()
        kinds = {node.op for node in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
        stateful = sorted(
            kind for kind in kinds
            if not kind.startswith("Stateless") and ("Random" in kind or "Rng" in kind or "Multinomial" in kind)
            and (op_def_registry.get(kind) is None or op_def_registry.get(kind).is_stateful)
        )  # fmt: skip
        if stateful:
            return f"the training step draws from stateful random operations ({', '.join(stateful[:3])})"
        return None

    def reset_metrics(self) -> None:
        for metric in self.metrics:
            metric.reset_state()

    def metric_states(self) -> list[list[np.ndarray]]:
        """The metrics' state variables. Keras metrics keep running sums, so states of different
        clients (or workers) add up to the state of all their examples together; FedAvg reads the
        summed states back through metrics of the same kind."""
        import keras

        return [[keras.ops.convert_to_numpy(v) for v in metric.variables] for metric in self.metrics]

    @property
    def traces(self) -> int:
        """How many times the training loop has been traced (1 once a client has trained)."""
        return self._traces

    def prepare(self, index: int, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """A client's arrays in the dtypes and shapes the compiled loop was built for, or
        :class:`ClientDataError` naming the client and the mismatch."""
        x, y = self.spec.conform(index, x, y)
        self._resolve_metrics()
        return x, y

    def _resolve_metrics(self) -> None:
        """The metrics, once the data spec is fixed by a first client: the meaning of "accuracy"
        follows its labels."""
        if not self.metrics:
            self.metrics = resolve_metrics(self._metric_names, self.spec.y_shape or (), output_width(self.model))

    def _build_loop(self, xla: bool) -> Any:
        tf = self._tf
        model, optimizer, step, metrics = self.model, self.optimizer, self.step, self.metrics
        loss, batch_size, start = self.loss, self.batch_size, self._start
        trainable = model.trainable_variables
        # Where each trainable variable sits among model.weights, the order weights come in.
        positions = {id(variable): index for index, variable in enumerate(model.weights)}
        trainable_positions = [positions[id(variable)] for variable in trainable]
        fresh = [tf.constant(value) for value in self._fresh_optimizer]

        seed_states = self._seed_states

        def loop(weights: Any, x: Any, y: Any, order: Any, n: Any, epochs: Any, seeds: Any) -> Any:
            # The client's start: the round's weights, and a fresh optimizer as in FedAvg; set inside
            # the compiled call, not by one eager operation per variable.
            for variable, value in zip(model.weights, weights):
                variable.assign(value)
            for position, variable in enumerate(seed_states):
                variable.assign(seeds[position])
            for variable, position in zip(start, trainable_positions):
                variable.assign(weights[position])
            for variable, value in zip(optimizer.variables, fresh):
                variable.assign(value)
            batches = (n + batch_size - 1) // batch_size

            def train_batch(position: Any, loss_sum: Any) -> Any:
                epoch, first = position // batches, (position % batches) * batch_size
                index = tf.slice(order, [epoch, first], [1, batch_size])[0]
                mask = tf.cast(first + tf.range(batch_size) < n, tf.float32)  # the last batch's fill: 0
                batch_x, batch_y = tf.gather(x, index), tf.gather(y, index)
                with tf.GradientTape() as tape:
                    predictions = model(batch_x, training=True)
                    losses = per_example_loss(loss, batch_y, predictions) * mask
                    batch_loss = tf.reduce_sum(losses) / tf.reduce_sum(mask)
                    if model.losses:
                        batch_loss += tf.add_n([tf.cast(term, tf.float32) for term in model.losses])
                    objective = step.objective(batch_loss, trainable, start)
                gradients = step.gradients(tape.gradient(objective, trainable), trainable, start)
                optimizer.apply_gradients(zip(gradients, trainable))
                for metric in metrics:
                    metric.update_state(batch_y, predictions, sample_weight=mask)
                return position + 1, loss_sum + tf.reduce_sum(losses)

            _, loss_sum = tf.while_loop(
                lambda position, _: position < epochs * batches, train_batch, (tf.constant(0), tf.constant(0.0))
            )
            return loss_sum, [tf.identity(variable) for variable in model.weights]

        signature = [
            [tf.TensorSpec(variable.shape, variable.dtype) for variable in model.weights],
            *self.spec.tensor_specs(),
            tf.TensorSpec((None, None), tf.int32),
            tf.TensorSpec((), tf.int32),
            tf.TensorSpec((), tf.int32),
            tf.TensorSpec((len(seed_states), 2), tf.int64),
        ]
        # The concrete function, called directly: the polymorphic wrapper would re-bind every argument
        # on every call, which costs milliseconds per client.
        return tf.function(loop, input_signature=signature, jit_compile=xla, autograph=False).get_concrete_function()

    def train(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> ClientResult:
        """Trains on one client's prepared arrays (see :meth:`prepare`) from ``weights``."""
        orders = [rng.permutation(len(x)) for _ in range(self.local_epochs)]
        seeds = np.zeros((len(self._seed_states), 2), np.int64)
        seeds[:, 0] = rng.integers(0, 2**62, len(seeds))  # drawn after the orders, which stay as they were
        try:
            loss_sum, trained = self._run(weights, x, y, orders, seeds)
        except (self._tf.errors.InvalidArgumentError, self._tf.errors.UnimplementedError) as error:
            if not self.jit_compile or "XLA" not in str(error):
                raise
            log.warning("XLA cannot compile this model's training loop; training without XLA (%s)", first_line(error))
            self.jit_compile, self._loop = False, None
            loss_sum, trained = self._run(weights, x, y, orders, seeds)
        batches = self.local_epochs * -(-len(x) // self.batch_size)
        return ClientResult(trained, len(x) * self.local_epochs, batches, loss_sum)

    def train_together(
        self, weights: list[np.ndarray], clients: list[tuple[np.ndarray, np.ndarray, np.random.Generator]]
    ) -> list[ClientResult]:
        """Trains several clients' prepared arrays from ``weights`` in one vectorized call (or one by
        one where that is not possible); the same shuffle orders as :meth:`train` for each."""
        if self._together is None:
            self._build_together()
        if self._together is False:
            return [self.train(weights, x, y, rng) for x, y, rng in clients]
        ordered = [(x, y, [rng.permutation(len(x)) for _ in range(self.local_epochs)]) for x, y, rng in clients]
        loss_sums, trained = self._together(weights, ordered, self.batch_size)
        return [
            ClientResult(values, len(x) * self.local_epochs, self.local_epochs * -(-len(x) // self.batch_size), loss)
            for (x, _, _), values, loss in zip(clients, trained, loss_sums)
        ]

    def _build_together(self) -> None:
        from .together import TogetherLoop, sgd_settings

        sgd = sgd_settings(self.optimizer)
        if sgd is None or self.model.non_trainable_variables:
            why = "the optimizer is not plain keras SGD" if sgd is None else "the model has non-trainable variables"
            log.warning("training clients one at a time: %s", why)
            self.clients_per_call, self._together = 1, False
        else:
            self._together = TogetherLoop(self, sgd)

    def _start_tensors(self, weights: list[np.ndarray]) -> list[Any]:
        """The round's weights as tensors, converted once for all the clients that start from them."""
        if self._converted is None or self._converted[0] is not weights:
            self._converted = (weights, [self._tf.convert_to_tensor(w) for w in weights])
        return self._converted[1]

    def _run(
        self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, orders: list[np.ndarray], seeds: np.ndarray
    ) -> tuple[float, list[np.ndarray]]:
        if self._loop is None:
            self._trace_loop()
        n = len(x)
        # The shuffle orders fill the last batch with row 0 (masked out); under XLA the data is padded
        # too, to a bucket size, so that clients of nearby sizes share one compilation.
        rows = _bucket(n, self.batch_size) if self.jit_compile else -(-n // self.batch_size) * self.batch_size
        order = np.zeros((len(orders), rows), np.int32)
        order[:, :n] = orders
        if self.jit_compile and rows > n:
            x = np.concatenate([x, np.zeros((rows - n, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros((rows - n, *y.shape[1:]), y.dtype)])
        loss_sum, trained = self._loop(
            self._start_tensors(weights), x, y, order, np.int32(n), np.int32(len(orders)), seeds
        )  # fmt: skip
        return float(loss_sum), [value.numpy() for value in trained]


def _settings(optimizer: Any) -> Any:
    """An optimizer's configuration without its name (Keras's ``get_config``), for comparing two."""
    config = dict(optimizer.get_config())
    config.pop("name", None)
    return config


def _tf_variable(variable: Any) -> Any:
    """The ``tf.Variable`` behind a Keras variable (or the variable itself)."""
    import tensorflow as tf

    return variable if isinstance(variable, tf.Variable) else variable.value


class _LoopWithCaptures:
    """A traced loop called with other captured inputs (another trainer's variable handles)."""

    def __init__(self, loop: Any, captures: list[Any]) -> None:
        self._loop, self._captures = loop, captures

    def __call__(self, *args: Any) -> Any:
        import tensorflow as tf

        flat = [
            tf.convert_to_tensor(value, placeholder.dtype)
            for value, placeholder in zip(tf.nest.flatten(args), self._loop.inputs)
        ]
        return self._loop._call_flat(flat, self._captures)


def describe_failure(error: BaseException) -> str:
    """One line for a client's failure: the error's kind and the first line of its message."""
    if isinstance(error, ClientDataError):
        return error.reason
    return f"{type(error).__name__}: {first_line(error)}"
