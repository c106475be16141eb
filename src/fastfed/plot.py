"""Plots of ``fastfed train`` runs: accuracy and loss per round, and accuracy against bits sent."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_runs"]


def plot_runs(runs: Sequence[str | Path], output: str | Path | None = None) -> Path:
    """Draws accuracy and loss per round, and accuracy against cumulative bits sent, for ``runs`` overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, loss_axis, bits_axis) = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        with open(Path(run) / "metrics.csv") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise SystemExit(f"{run}: metrics.csv has no rounds")
        label = Path(run).name
        rounds = [float(r["round"]) for r in rows]
        accuracy = [float(r["eval_accuracy"]) for r in rows]
        accuracy_axis.plot(rounds, accuracy, label=label)
        loss_axis.plot(rounds, [float(r["train_loss"]) for r in rows], label=label)
        sent = [(float(r["broadcast_bits_total"]) + float(r["aggregate_bits_total"])) / 2**20 for r in rows]
        bits_axis.plot(sent, accuracy, label=label)
    accuracy_axis.set(xlabel="round", ylabel="held-out accuracy", title="Accuracy per round")
    loss_axis.set(xlabel="round", ylabel="training loss", title="Loss per round")
    bits_axis.set(xlabel="cumulative Mibit sent", ylabel="held-out accuracy", title="Accuracy vs bits sent")
    for axis in (accuracy_axis, loss_axis, bits_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    output = Path(output) if output else Path(runs[0]) / "metrics.png"
    figure.savefig(output, dpi=100)
    print(f"wrote {output}")
    return output
