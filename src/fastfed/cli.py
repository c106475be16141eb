"""The ``fastfed`` command: ``fastfed train`` runs FedAvg, ``fastfed plot`` draws runs' metrics,
``fastfed bench`` measures fastfed against its baselines.

Every argument is checked before TensorFlow is imported: a bad one prints one line on stderr and
exits with status 2 (``--debug`` shows tracebacks of unexpected errors). Ctrl-C during training
saves the last completed round and exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

DATASETS = ("digits", "mnist", "emnist")
MODELS = ("mlp", "softmax", "cnn")
# What a resumed run may change; every other setting is the saved run's.
RESUMABLE = ("rounds", "no_progress", "debug", "checkpoint_every", "keep_checkpoints")


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not None, not an off switch) and the help names none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _number(kind: type, minimum: float | None = None, maximum: float | None = None, above: float | None = None) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if kind is float and not np.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"expected a number above {above}, got {text}")
        return value

    return parse


POSITIVE_INT = _number(int, minimum=1)
NON_NEGATIVE_INT = _number(int, minimum=0)
POSITIVE = _number(float, above=0.0)


def _parser(defaults: bool = True) -> _Parser:
    """The command line; ``defaults=False`` leaves out every default, to see what a user typed."""
    from . import __version__

    parser = _Parser(prog="fastfed", description="Fast federated averaging and update compression.")
    parser.add_argument("--version", action="version", version=f"fastfed {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="run FedAvg", formatter_class=_DefaultsShown)
    data = train.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="digits", help="digits is bundled with scikit-learn")
    data.add_argument("--data-dir", default=None, help="MNIST IDX folder, or TFF's EMNIST .sqlite file or h5 folder")
    data.add_argument("--download", action="store_true", help="download TFF's federated EMNIST if needed")
    data.add_argument(
        "--partition", choices=["iid", "dirichlet", "label"], default="dirichlet", help="split (EMNIST: by writer)"
    )
    data.add_argument("--alpha", type=POSITIVE, default=1.0, help="Dirichlet concentration (label skew)")
    data.add_argument("--num-clients", type=POSITIVE_INT, default=20, help="clients to split digits/MNIST into")
    model = train.add_argument_group("model and training")
    model.add_argument("--model", choices=MODELS, default="mlp", help="Keras model")
    model.add_argument("--hidden", type=POSITIVE_INT, default=128, help="hidden units of the MLP")
    model.add_argument("--rounds", type=POSITIVE_INT, default=30, help="rounds in total (with --resume: extend to)")
    model.add_argument("--clients-per-round", type=POSITIVE_INT, default=10, help="clients sampled per round")
    model.add_argument("--local-epochs", type=POSITIVE_INT, default=2, help="client epochs per round")
    model.add_argument("--batch-size", type=POSITIVE_INT, default=20, help="client batch size")
    model.add_argument("--client-lr", type=POSITIVE, default=0.1, help="client SGD learning rate")
    model.add_argument("--server-lr", type=POSITIVE, default=1.0, help="server SGD learning rate")
    model.add_argument("--proximal-mu", type=_number(float, minimum=0.0), default=0.0, help="FedProx mu (0: FedAvg)")
    model.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seed of everything random")
    model.add_argument("--deterministic", action="store_true", help="deterministic TensorFlow kernels")
    codec = train.add_argument_group("compression")
    codec.add_argument("--bits", type=_number(int, 1, 16), default=None, help="quantize client uploads to 1..16 bits")
    codec.add_argument(
        "--broadcast-bits",
        type=_number(int, 1, 16),
        default=None,
        help="also quantize the model the server sends (the weights themselves, not a change: keep it at 8 or more)",
    )
    codec.add_argument(
        "--codec",
        choices=["uniform", "rotated"],
        default="uniform",
        help="uniform: min/max levels (UniformQuantizer); rotated: EDEN-grade error, 1..8 bits (RotatedQuantizer)",
    )
    codec.add_argument("--min-size", type=NON_NEGATIVE_INT, default=1000, help="smallest tensor that is quantized")
    robust = train.add_argument_group("robustness")
    robust.add_argument("--clip", type=POSITIVE, default=None, help="clip client updates to this L2 norm")
    robust.add_argument(
        "--adaptive-clip",
        type=_number(float, above=0.0, maximum=1.0),
        default=None,
        metavar="QUANTILE",
        help="adapt the clipping bound to this quantile of update norms",
    )
    robust.add_argument("--zeroing", type=POSITIVE, default=None, help="zero client updates above this L2 norm")
    robust.add_argument("--min-clients", type=POSITIVE_INT, default=1, help="fewest updates a round must aggregate")
    run = train.add_argument_group("run folder")
    run.add_argument("--output-dir", default=None, help="run folder (default: a new runs/<dataset>-<model>-<time>)")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    run.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run; --rounds extends it")
    run.add_argument("--evaluate-every", type=POSITIVE_INT, default=1, help="evaluate held-out data every N rounds")
    run.add_argument("--checkpoint-every", type=NON_NEGATIVE_INT, default=1, help="checkpoint every N rounds, 0: never")
    run.add_argument("--keep-checkpoints", type=POSITIVE_INT, default=3, help="recent checkpoints kept")
    run.add_argument("--no-progress", action="store_true", help="hide the per-round progress bar")
    run.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    plot = commands.add_parser("plot", help="plot metrics of one or more runs")
    plot.add_argument("runs", nargs="+", help="run folders written by fastfed train")
    plot.add_argument("--output", default=None, help="PNG path (default: metrics.png in the first run)")
    plot.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    bench = commands.add_parser("bench", help="benchmark fastfed against its baselines")
    bench.add_argument("--quick", action="store_true", help="fewer repeats: about a minute on 2 cores")
    bench.add_argument("--output", default="fastfed-bench", help="folder for the JSON and PNG results")
    bench.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    if not defaults:
        for command in (train, plot, bench):
            for action in command._actions:
                action.default = argparse.SUPPRESS
    return parser


def _fail(message: str, command: str = "train") -> NoReturn:
    raise UsageError(f"fastfed {command}: {message}")


def _check_writable(folder: Path, command: str = "train") -> None:
    """Creates ``folder`` if needed and proves it writable, before hours of training depend on it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".fastfed-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        _fail(f"cannot write to {folder}: {error.strerror or error}", command)


def _default_run_dir(args: argparse.Namespace) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{args.dataset}-{args.model}-{stamp}"
    folder, suffix = base, 1
    while folder.exists():
        suffix += 1
        folder = base.with_name(f"{base.name}-{suffix}")
    return folder


def _check_train(args: argparse.Namespace) -> None:
    """Everything that can be checked without TensorFlow; raises UsageError."""
    from .learning.training import holds_run

    if args.clients_per_round > args.num_clients and args.dataset != "emnist":
        _fail(f"--clients-per-round {args.clients_per_round} is more than --num-clients {args.num_clients}")
    if args.codec == "rotated":
        if args.bits is None and args.broadcast_bits is None:
            _fail("--codec rotated needs --bits 1..8 (or --broadcast-bits 1..8), got neither")
        for name in ("bits", "broadcast_bits"):
            if (getattr(args, name) or 0) > 8:
                _fail(f"--codec rotated needs --{name.replace('_', '-')} 1..8, got {getattr(args, name)}")
    if args.min_clients > args.clients_per_round:
        _fail(f"--min-clients {args.min_clients} is more than --clients-per-round {args.clients_per_round}")
    if args.dataset == "mnist" and not args.data_dir:
        _fail("--dataset mnist needs --data-dir with the IDX files")
    if args.dataset == "emnist" and not (args.data_dir or args.download):
        _fail("--dataset emnist needs --data-dir (the .sqlite file or h5 folder) or --download")
    if args.data_dir and not args.download and not Path(args.data_dir).exists():
        _fail(f"--data-dir {args.data_dir} does not exist")
    if args.dataset == "mnist" and not any(Path(args.data_dir).glob("*-images-idx3-ubyte*")):
        _fail(f"--data-dir {args.data_dir} holds no MNIST IDX files (train- or t10k-images-idx3-ubyte[.gz])")
    if args.output_dir is not None and holds_run(Path(args.output_dir)) and not args.overwrite:
        _fail(f"{args.output_dir} already holds a run; resume it with --resume {args.output_dir}, or add --overwrite")


def _resumed(args: argparse.Namespace, given: argparse.Namespace) -> argparse.Namespace:
    """The saved run's settings, with the few a resumed run may change; raises UsageError on conflicts."""
    from .learning.checkpoint import CheckpointError, load_checkpoint
    from .plot import saved_settings

    folder = Path(args.resume)
    if not folder.is_dir():
        _fail(f"--resume {args.resume}: no such folder")
    if not (folder / "checkpoints").is_dir():
        _fail(f"--resume {args.resume}: the folder holds no checkpoints to resume from")
    try:
        saved = load_checkpoint(folder)
    except CheckpointError as error:
        _fail(f"--resume {args.resume}: {error}")
    config = saved_settings(saved.config)
    conflicts = [
        f"--{name.replace('_', '-')} {value} (the run has {config.get(name)})"
        for name, value in vars(given).items()
        if name not in (*RESUMABLE, "resume", "command") and config.get(name, value) != value
    ]
    if conflicts:
        _fail(f"--resume {args.resume}: {', '.join(conflicts)}; a resumed run keeps its settings")
    resumed = argparse.Namespace(**{**vars(args), **config})
    for name in RESUMABLE:
        if name in vars(given):
            setattr(resumed, name, getattr(args, name))
    if "rounds" in vars(given) and args.rounds < saved.round:
        _fail(f"--resume {args.resume}: the run has {saved.round} rounds; --rounds {args.rounds} cannot extend it")
    resumed.output_dir, resumed.resume = args.resume, args.resume
    return resumed


def _load_dataset(args: argparse.Namespace) -> tuple[Any, tuple[np.ndarray, np.ndarray], tuple[int, ...]]:
    from . import data

    if args.dataset == "emnist":
        # Federated by construction: one client per writer; the test split, pooled, is held out.
        path = data.download_emnist(args.data_dir) if args.download else Path(args.data_dir)
        clients = data.load_emnist(path, split="train")
        x_test, y_test = data.stack_clients(data.load_emnist(path, split="test").all())
        return clients, (x_test, y_test), (28, 28)
    if args.dataset == "digits":
        (x, y), test = data.load_digits(seed=args.seed)
    else:
        has_train = any(Path(args.data_dir).glob("train-images-idx3-ubyte*"))
        if not has_train:
            print(
                f"note: {args.data_dir} holds only MNIST's test set; training on 80% of it, evaluating on the rest",
                file=sys.stderr,
            )
        x, y = data.load_mnist_idx(args.data_dir, "train" if has_train else "t10k")
        x = x.reshape(len(x), -1)
        if has_train:
            test = data.load_mnist_idx(args.data_dir, "t10k")
            test = (test[0].reshape(len(test[0]), -1), test[1])
        else:
            split = int(0.8 * len(x))
            (x, y), test = (x[:split], y[:split]), (x[split:], y[split:])
    if args.partition == "iid":
        clients = data.partition_iid(x, y, args.num_clients, seed=args.seed)
    elif args.partition == "dirichlet":
        clients = data.partition_dirichlet(x, y, args.num_clients, args.alpha, seed=args.seed)
    else:
        clients = data.partition_by_label(x, y)
    return clients, test, x.shape[1:]


def _model_fn(args: argparse.Namespace, input_shape: tuple[int, ...]) -> Any:
    import functools

    from . import models

    if args.model == "mlp":
        return functools.partial(models.mlp, input_shape, hidden=args.hidden)
    if args.model == "softmax":
        return functools.partial(models.softmax_regression, input_shape)
    return functools.partial(models.cnn, input_shape)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What the run saves in its checkpoints and config.json: every setting but how to show it."""
    return {k: v for k, v in vars(args).items() if k not in ("resume", "no_progress", "debug", "overwrite", "command")}


def train(args: argparse.Namespace, given: argparse.Namespace) -> int:
    if args.resume:
        args = _resumed(args, given)
    else:
        _check_train(args)
    folder = Path(args.output_dir) if args.output_dir else _default_run_dir(args)
    _check_writable(folder)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(f"run folder: {folder}", flush=True)
    from ._extras import import_tensorflow_quietly

    import_tensorflow_quietly("fastfed train")
    import keras

    from . import AdaptiveBound, FedAvg, backend, enable_determinism, mean_aggregator, optimizers
    from .compression import RotatedQuantizer, UniformQuantizer
    from .learning.training import TrainingInterrupted, run_training

    if args.deterministic:
        enable_determinism()
    clients, test, input_shape = _load_dataset(args)
    quantizer = RotatedQuantizer if args.codec == "rotated" else UniformQuantizer
    codec = quantizer(bits=args.bits, min_size=args.min_size) if args.bits else None
    broadcast_codec = quantizer(bits=args.broadcast_bits, min_size=args.min_size) if args.broadcast_bits else None
    clipping: float | AdaptiveBound | None = args.clip
    if args.adaptive_clip:
        clipping = AdaptiveBound(initial=args.clip or 1.0, target_quantile=args.adaptive_clip)
    process = FedAvg(
        _model_fn(args, input_shape),
        client_optimizer=lambda: keras.optimizers.SGD(learning_rate=args.client_lr),
        server_optimizer=optimizers.SGD(learning_rate=args.server_lr),
        aggregator=mean_aggregator(codec=codec, clipping=clipping, zeroing=args.zeroing),
        broadcast_codec=broadcast_codec,
        batch_size=args.batch_size,
        local_epochs=args.local_epochs,
        proximal_mu=args.proximal_mu,
        min_clients=args.min_clients,
        seed=args.seed,
    )
    settings = _settings(args)
    settings["output_dir"] = str(folder)
    (folder / "config.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
    per_round = min(args.clients_per_round, len(clients))
    uploads = "uncompressed uploads" if codec is None else f"{args.bits}-bit {args.codec} uploads"
    broadcast = "" if broadcast_codec is None else f" and {args.broadcast_bits}-bit {args.codec} broadcast"
    print(
        f"fastfed train: {args.dataset}, {len(clients)} clients, {per_round} per round, model {args.model}, "
        f"{uploads}{broadcast}, backend {backend()}",
        flush=True,
    )

    def report(_: Any, metrics: dict[str, float]) -> None:
        evaluated = f"  eval_accuracy {metrics['eval_accuracy']:.4f}" if "eval_accuracy" in metrics else ""
        print(
            f"round {metrics['round']:3d}  train_loss {metrics['train_loss']:.4f}  "
            f"train_accuracy {metrics['train_accuracy']:.4f}{evaluated}  "
            f"sent {(metrics['broadcast_bits'] + metrics['aggregate_bits']) / 2**20:.2f} Mibit  "
            f"{metrics['round_seconds']:.2f}s",
            flush=True,
        )

    try:
        result = run_training(
            process, clients, rounds=args.rounds, clients_per_round=per_round, evaluation_clients=[test],
            evaluate_every=args.evaluate_every, run_dir=folder, checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints, resume=bool(args.resume), overwrite=args.overwrite,
            config=settings, callbacks=[report], progress=False if args.no_progress else None,
        )  # fmt: skip
    except TrainingInterrupted as interrupted:
        saved = " (saved)" if args.checkpoint_every else " (not saved: --checkpoint-every 0)"
        print(
            f"interrupted at round {interrupted.state.round}{saved}; resume with: fastfed train --resume {folder}",
            file=sys.stderr,
        )
        return 130
    final = process.evaluate(result.state, [test])
    print(
        f"held-out evaluation: accuracy {final['accuracy']:.4f}  loss {final['loss']:.4f}  "
        f"({int(final['num_examples'])} examples)"
    )
    np.savez(folder / "weights.npz", *result.state.weights)
    print(f"run saved in {folder}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in arguments
    started = time.perf_counter()
    try:
        args = _parser().parse_args(arguments)
        given = _parser(defaults=False).parse_args(arguments)
        if args.command == "train":
            status = train(args, given)
            if status == 0:
                print(f"done in {time.perf_counter() - started:.1f}s")
            return status
        if args.command == "plot":
            from .plot import plot_runs

            plot_runs(args.runs, args.output)
            return 0
        from .bench import run_benchmarks

        _check_writable(Path(args.output), "bench")  # before minutes of measuring depend on it
        return run_benchmarks(quick=args.quick, output=Path(args.output))
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # anything else: one line, unless debugging
        if debug:
            traceback.print_exc()
        else:
            print(f"fastfed: {type(error).__name__}: {error} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
