"""The ``fastfed`` command: ``fastfed train`` runs FedAvg; ``fastfed plot`` draws runs' metrics."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("mlp", "softmax", "cnn")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastfed", description="Fast federated averaging.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run FedAvg", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument(
        "--dataset", choices=["digits", "mnist", "emnist"], default="digits", help="digits is bundled (offline)"
    )
    train.add_argument("--data-dir", default=None, help="MNIST IDX folder, or TFF's EMNIST .sqlite file or h5 folder")
    train.add_argument("--download", action="store_true", help="download TFF's federated EMNIST if needed")
    train.add_argument("--partition", choices=["iid", "dirichlet", "label"], default="dirichlet")
    train.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration")
    train.add_argument("--num-clients", type=int, default=20)
    train.add_argument("--model", choices=MODELS, default="mlp")
    train.add_argument("--hidden", type=int, default=128, help="hidden units of the MLP")
    train.add_argument("--rounds", type=int, default=30)
    train.add_argument("--clients-per-round", type=int, default=10)
    train.add_argument("--local-epochs", type=int, default=2)
    train.add_argument("--batch-size", type=int, default=20)
    train.add_argument("--client-lr", type=float, default=0.1)
    train.add_argument("--server-lr", type=float, default=1.0)
    train.add_argument("--bits", type=int, default=None, help="quantize uploads and broadcast to this many bits")
    train.add_argument(
        "--codec",
        choices=["uniform", "rotated"],
        default="uniform",
        help="with --bits: UniformQuantizer or RotatedQuantizer",
    )
    train.add_argument("--min-size", type=int, default=1000, help="smallest tensor that is quantized")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--output-dir", default="runs/fastfed", help="CSV and TensorBoard logs go here")
    train.add_argument("--no-progress", action="store_true", help="hide the per-round progress bar")
    train.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N rounds (0: never)")
    train.add_argument("--keep-checkpoints", type=int, default=3, help="how many recent checkpoints to keep")
    train.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a checkpointed run")
    train.add_argument("--deterministic", action="store_true", help="deterministic TensorFlow kernels")
    train.add_argument("--clip", type=float, default=None, help="clip client updates to this L2 norm")
    train.add_argument(
        "--adaptive-clip", type=float, default=None, metavar="QUANTILE", help="adapt --clip to this norm quantile"
    )
    train.add_argument("--zeroing", type=float, default=None, help="zero client updates above this L2 norm")
    train.add_argument("--min-clients", type=int, default=1, help="fewest updates a round must aggregate")
    plot = commands.add_parser("plot", help="plot metrics of one or more runs")
    plot.add_argument("runs", nargs="+", help="run directories written by fastfed train")
    plot.add_argument("--output", default=None, help="PNG path (default: metrics.png in the first run)")
    return parser


def _load_dataset(args: argparse.Namespace) -> tuple[Any, tuple[np.ndarray, np.ndarray], tuple[int, ...]]:
    from . import data

    if args.dataset == "emnist":
        # Federated by construction: one client per writer; the test split, pooled, is held out.
        if args.download:
            path = data.download_emnist(args.data_dir)
        elif args.data_dir:
            path = Path(args.data_dir)
        else:
            raise SystemExit("--dataset emnist needs --data-dir (the .sqlite file or h5 folder) or --download")
        clients = data.load_emnist(path, split="train")
        x_test, y_test = data.stack_clients(data.load_emnist(path, split="test").all())
        return clients, (x_test, y_test), (28, 28)
    if args.dataset == "digits":
        (x, y), test = data.load_digits(seed=args.seed)
    else:
        if not args.data_dir:
            raise SystemExit("--dataset mnist needs --data-dir with the IDX files")
        has_train = any(Path(args.data_dir).glob("train-labels-idx1-ubyte*"))
        x, y = data.load_mnist_idx(args.data_dir, "train" if has_train else "t10k")
        x = x.reshape(len(x), -1)
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
    from . import models

    if args.model == "mlp":
        return lambda: models.mlp(input_shape, hidden=args.hidden)
    if args.model == "softmax":
        return lambda: models.softmax_regression(input_shape)
    if input_shape not in ((784,), (28, 28)):
        raise SystemExit(f"--model cnn needs 28x28 images (mnist or emnist); {args.dataset} has shape {input_shape}")
    return lambda: models.cnn((28, 28))


SAMPLING_STREAM = 0x5A4D504C  # distinguishes client sampling from the training seeds of a round


def _resumed_arguments(args: argparse.Namespace) -> tuple[argparse.Namespace, Any]:
    """The saved run's arguments and its newest good checkpoint (or ``None`` for a new run)."""
    from . import load_checkpoint

    if not args.resume:
        return args, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint = load_checkpoint(args.resume)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    saved = argparse.Namespace(**checkpoint.config)
    saved.output_dir, saved.resume, saved.no_progress = args.resume, args.resume, args.no_progress
    where = checkpoint.path.name if checkpoint.path is not None else args.resume
    print(f"resuming {args.resume} from round {checkpoint.round} ({where})")
    return saved, checkpoint


def _write_csv(path: Path, history: list[dict[str, float]]) -> None:
    """Rewrites the whole metrics CSV atomically (used when a resumed run restores its history)."""
    temporary = path.with_suffix(".csv.tmp")
    with open(temporary, "w", newline="") as handle:
        if history:
            rows = csv.DictWriter(handle, fieldnames=list(history[0]), extrasaction="ignore")
            rows.writeheader()
            rows.writerows(history)
    os.replace(temporary, path)


def train(args: argparse.Namespace) -> dict[str, float]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    from tqdm import tqdm

    from . import AdaptiveBound, FedAvg, enable_determinism, evaluate, mean_aggregator, optimizers, save_checkpoint
    from .compression import RotatedQuantizer, UniformQuantizer

    args, checkpoint = _resumed_arguments(args)
    if args.deterministic:
        enable_determinism()
    clients, test, input_shape = _load_dataset(args)
    quantizer = (
        RotatedQuantizer if getattr(args, "codec", "uniform") == "rotated" else UniformQuantizer
    )  # older runs: uniform
    codec = quantizer(bits=args.bits, min_size=args.min_size) if args.bits else None
    clipping: float | AdaptiveBound | None = args.clip
    if args.adaptive_clip:
        clipping = AdaptiveBound(initial=args.clip or 1.0, target_quantile=args.adaptive_clip)
    process = FedAvg(
        _model_fn(args, input_shape),
        client_optimizer=lambda: keras.optimizers.SGD(learning_rate=args.client_lr),
        server_optimizer=optimizers.SGD(learning_rate=args.server_lr),
        aggregator=mean_aggregator(codec=codec, clipping=clipping, zeroing=args.zeroing),
        broadcast_codec=codec,
        batch_size=args.batch_size,
        local_epochs=args.local_epochs,
        min_clients=args.min_clients,
        seed=args.seed,
    )
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("resume", "no_progress")}
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if checkpoint is None:
        state, history = process.initialize(), []
    else:
        state, history = checkpoint.state, list(checkpoint.metrics_history)
    # The history is the record: the logs are rewritten from it, so rounds logged after the
    # checkpoint are redone rather than duplicated.
    shutil.rmtree(output / "tensorboard", ignore_errors=True)
    _write_csv(output / "metrics.csv", history)
    writer = tf.summary.create_file_writer(str(output / "tensorboard"))
    for row in history:
        with writer.as_default(step=int(row["round"])):
            for name, value in row.items():
                tf.summary.scalar(name, value)
    per_round = min(args.clients_per_round, len(clients))
    print(
        f"fastfed train: {args.dataset}, {len(clients)} clients, {per_round} per round, model {args.model}, "
        f"{'uncompressed' if codec is None else f'{args.bits}-bit {type(codec).__name__}'}, "
        f"backend {__import__('fastfed').backend()}"
    )
    with open(output / "metrics.csv", "a", newline="") as csv_file:
        rows = csv.DictWriter(csv_file, fieldnames=list(history[0]), extrasaction="ignore") if history else None
        while state.round < args.rounds:
            selected = clients.sample(per_round, np.random.default_rng([args.seed, state.round, SAMPLING_STREAM]))
            progress = tqdm(
                total=len(selected),
                desc=f"round {state.round + 1}",
                leave=False,
                disable=args.no_progress,
                unit="client",
            )
            state, metrics = process.next(state, _Progress(selected, progress))
            progress.close()
            evaluation = evaluate(process.model_fn, state.weights, [test])
            metrics.update({f"eval_{k}": v for k, v in evaluation.items() if k != "num_examples"})
            history.append(metrics)
            if rows is None:
                rows = csv.DictWriter(csv_file, fieldnames=list(metrics), extrasaction="ignore")
                rows.writeheader()
            rows.writerow(metrics)
            csv_file.flush()
            with writer.as_default(step=state.round):
                for name, value in metrics.items():
                    tf.summary.scalar(name, value)
            writer.flush()
            if args.checkpoint_every and (state.round % args.checkpoint_every == 0 or state.round == args.rounds):
                save_checkpoint(
                    output, state, seed=args.seed, metrics_history=history, config=config, keep=args.keep_checkpoints
                )
            print(
                f"round {state.round:3d}  train_loss {metrics['train_loss']:.4f}  "
                f"train_accuracy {metrics['train_accuracy']:.4f}  eval_accuracy {metrics['eval_accuracy']:.4f}  "
                f"sent {(metrics['broadcast_bits'] + metrics['aggregate_bits']) / 2**20:.2f} Mibit  "
                f"{metrics['round_seconds']:.2f}s",
                flush=True,
            )
    writer.close()
    final = evaluate(process.model_fn, state.weights, [test])
    print(
        f"held-out evaluation: accuracy {final['accuracy']:.4f}  loss {final['loss']:.4f}  "
        f"({int(final['num_examples'])} examples)"
    )
    np.savez(output / "weights.npz", *state.weights)
    return final


class _Progress(list):  # type: ignore[type-arg]
    """A client list whose iteration advances a progress bar."""

    def __init__(self, clients: Sequence[Any], bar: Any) -> None:
        super().__init__(clients)
        self._bar = bar

    def __iter__(self) -> Any:
        for client in super().__iter__():
            yield client
            self._bar.update(1)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    if args.command == "train":
        train(args)
        print(f"done in {time.perf_counter() - started:.1f}s")
    else:
        from .plot import plot_runs

        plot_runs(args.runs, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
