"""FedAvg rounds in TensorFlow Federated 0.87, on clients saved by benchmarks/test_fedavg_bench.py.

Runs under the TFF interpreter of ../shared/peers/README.md (TFF 0.87 needs TensorFlow 2.14), not
fastfed's: ``python tff_rounds.py CLIENTS.npz --model mlp --batch 20 --lr 0.1 --rounds 6 [--shuffle]
[--compression]``. Prints one JSON line per round (training accuracy, loss, seconds) and a summary.
The models are those of fastfed.models (mlp: 784-512-10; cnn: the FedAvg CNN), built the same way.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


def _end() -> None:
    """TFF leaves a worker process holding our stdout: end our own children, then exit."""
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                if parent == me:
                    os.kill(int(pid), signal.SIGTERM)
            except (OSError, ValueError):
                pass
    sys.stdout.flush()
    os._exit(0)


def _model(kind: str) -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    if kind == "mlp":
        return tf.keras.Sequential([
            tf.keras.layers.InputLayer(input_shape=(784,)),
            tf.keras.layers.Dense(512, activation="relu"),
            tf.keras.layers.Dense(10, activation="softmax"),
        ])  # fmt: skip
    conv = functools.partial(tf.keras.layers.Conv2D, kernel_size=5, padding="same", activation="relu")
    pool = functools.partial(tf.keras.layers.MaxPooling2D, pool_size=2, padding="same")
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(28, 28)), tf.keras.layers.Reshape((28, 28, 1)),
        conv(filters=32), pool(), conv(filters=64), pool(), tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(512, activation="relu"), tf.keras.layers.Dense(10, activation="softmax"),
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("clients")
    parser.add_argument("--model", choices=["mlp", "cnn"], required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--shuffle", action="store_true", help="reshuffle each client's examples every round")
    parser.add_argument("--compression", action="store_true", help="TFF's 8-bit compression_aggregator")
    args = parser.parse_args()
    with np.load(args.clients) as saved:
        arrays = [(saved[f"x{k}"], saved[f"y{k}"]) for k in range(len(saved.files) // 2)]

    def datasets(round_number: int) -> list[tf.data.Dataset]:
        """The clients' datasets for a round. TFF serializes a dataset into each round's computation
        and iterates it afresh there, so a shuffle seeded once gives every round the same order:
        each round gets its own seed instead."""
        rounds_data = []
        for x, y in arrays:
            data = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int32)))
            if args.shuffle:
                data = data.shuffle(len(x), seed=round_number)
            rounds_data.append(data.batch(args.batch))
        return rounds_data

    spec = datasets(0)[0].element_spec

    def model_fn() -> tff.learning.models.VariableModel:
        return tff.learning.models.from_keras_model(
            _model(args.model), input_spec=spec, loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
        )  # fmt: skip

    extra = {"model_aggregator": tff.learning.compression_aggregator(zeroing=False, clipping=False)}
    process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn, client_optimizer_fn=tff.learning.optimizers.build_sgdm(args.lr),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0), **(extra if args.compression else {}),
    )  # fmt: skip
    state = process.initialize()
    seconds = []
    for round_number in range(1, args.rounds + 1):
        clients = datasets(round_number)
        started = time.perf_counter()
        output = process.next(state, clients)
        seconds.append(time.perf_counter() - started)
        state = output.state
        train = output.metrics["client_work"]["train"]
        accuracy = float(train["sparse_categorical_accuracy"])
        print(json.dumps({"round": round_number, "accuracy": accuracy, "seconds": seconds[-1]}), flush=True)
    print(json.dumps({"median_round_seconds": float(np.median(seconds[1:])), "first_round_seconds": seconds[0]}))
    _end()


if __name__ == "__main__":
    main()
