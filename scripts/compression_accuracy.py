"""Final accuracy and total bits of FedAvg with compressed uploads, for the README: uncompressed,
UniformQuantizer and RotatedQuantizer (independent and shared rotation) at 1, 2, 4 and 8 bits.

Scenarios (benchmarks/test_fedavg_bench.py's), on the MNIST test set:

* ``cnn``: the FedAvg CNN of McMahan et al. 2017 on 10 clients x 400 images (the first 4,000),
  batch 20, client SGD at 0.02; accuracy on the other 6,000 images.
* ``mlp-by-digit``: a 784-512-10 MLP on 10 clients each holding 1,000 images of one digit (as
  non-IID as it gets), batch 100, client SGD at 0.1; accuracy on the whole test set.

Server SGD at 1, every client every round, one local epoch. Uploads are compressed (tensors of
1,000 values or more); the broadcast is exact. Every run starts from the same weights and seed.

Usage: ``python scripts/compression_accuracy.py --scenario cnn --rounds 25 --output
docs/compression-accuracy`` writes ``.md`` (a Markdown table) and ``.png`` (accuracy against
uploaded bits). Needs TensorFlow, matplotlib and the MNIST test set (``--mnist``, default
../shared/data/mnist).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]


def codecs() -> dict[str, Any]:
    from fastfed.compression import RotatedQuantizer, UniformQuantizer

    runs: dict[str, Any] = {"float32": None}
    for bits in (1, 2, 4, 8):
        runs[f"uniform {bits}-bit"] = UniformQuantizer(bits=bits, min_size=1000)
        runs[f"rotated {bits}-bit"] = RotatedQuantizer(bits, min_size=1000)
        runs[f"rotated shared {bits}-bit"] = RotatedQuantizer(bits, shared_rotation=True, min_size=1000)
    return runs


def run(codec: Any, scenario: str, rounds: int, mnist: Path) -> dict[str, float]:
    import keras

    import fastfed
    from fastfed import data, models, optimizers

    x, y = data.load_mnist_idx(mnist)
    if scenario == "cnn":
        clients = [(x[400 * k : 400 * (k + 1)], y[400 * k : 400 * (k + 1)]) for k in range(10)]
        held_out = (x[4000:], y[4000:])
        model_fn, batch_size, learning_rate = (lambda: models.cnn((28, 28))), 20, 0.02
    else:
        flat = x.reshape(len(x), 784)
        clients = data.partition_by_label(flat, y, per_client=1000).all()
        held_out = (flat, y)
        model_fn, batch_size, learning_rate = (lambda: models.mlp((784,), hidden=512)), 100, 0.1
    process = fastfed.FedAvg(
        model_fn,
        client_optimizer=lambda: keras.optimizers.SGD(learning_rate=learning_rate),
        server_optimizer=optimizers.SGD(learning_rate=1.0),
        aggregator=fastfed.mean_aggregator(codec=codec),
        batch_size=batch_size,
        seed=0,
    )
    state = process.initialize()
    started = time.perf_counter()
    for _ in range(rounds):
        state, metrics = process.next(state, clients)
    accuracy = fastfed.evaluate(process.model_fn, state.weights, [held_out])["accuracy"]
    return {
        "accuracy": float(accuracy),
        "upload_mbit": state.aggregate_bits_total / 1e6,
        "total_mbit": (state.aggregate_bits_total + state.broadcast_bits_total) / 1e6,
        "train_accuracy": float(metrics["train_accuracy"]),
        "seconds": time.perf_counter() - started,
    }


def table(results: dict[str, dict[str, float]]) -> str:
    base = results["float32"]
    header = "| uploads | held-out accuracy | vs float32 | uploaded Mbit | total Mbit (uploads + broadcast) |"
    lines = [header, "|---|---|---|---|---|"]
    for name, result in results.items():
        difference = 100 * (result["accuracy"] - base["accuracy"])
        lines.append(
            f"| {name} | {100 * result['accuracy']:.2f}% | {difference:+.2f} pt | {result['upload_mbit']:.1f} "
            f"| {result['total_mbit']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for family, marker in (("uniform", "s"), ("rotated", "o"), ("rotated shared", "^")):
        points = [results[f"{family} {bits}-bit"] for bits in (1, 2, 4, 8)]
        axis.plot(
            [p["upload_mbit"] for p in points], [100 * p["accuracy"] for p in points], marker=marker, label=family
        )
        for bits, point in zip((1, 2, 4, 8), points):
            axis.annotate(f"{bits}b", (point["upload_mbit"], 100 * point["accuracy"]), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")  # fmt: skip
    base = results["float32"]
    axis.scatter([base["upload_mbit"]], [100 * base["accuracy"]], color="black", marker="*", s=80, label="float32")
    axis.set_xscale("log")
    axis.set_xlabel("uploaded Mbit, all rounds (log scale)")
    axis.set_ylabel("held-out accuracy (%)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=["cnn", "mlp-by-digit"], default="cnn")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--mnist", type=Path, default=REPOSITORY.parent / "shared" / "data" / "mnist")
    parser.add_argument("--output", type=Path, default=REPOSITORY / "docs" / "compression-accuracy")
    parser.add_argument("--only", nargs="*", help="run these codecs only (names as in the table)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = {}
    for name, codec in codecs().items():
        if args.only and name not in args.only and name != "float32":
            continue
        results[name] = run(codec, args.scenario, args.rounds, args.mnist)
        print(f"{name}: {results[name]}", flush=True)
    text = f"After {args.rounds} rounds:\n\n" + table(results)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text(text)
    if not args.only:
        titles = {
            "cnn": "FedAvg CNN, 10 clients x 400 MNIST images",
            "mlp-by-digit": "FedAvg MLP, one MNIST digit per client",
        }
        plot(results, f"{titles[args.scenario]}, {args.rounds} rounds", args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
