"""Plots of ``fastfed train`` runs: accuracy and loss per round, and accuracy against bits sent.

Runs are named in the legend by the settings that tell them apart (from each run's config.json),
so two runs with default settings but different seeds read "seed 0" and "seed 1", not two folder
names. Bits count both directions for all of a round's clients: every client's upload plus the
broadcast each client receives, headers included.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_runs", "run_labels"]

# Settings worth naming in a legend, in order, and how.
_LABELLED = {
    "dataset": "{}",
    "model": "{}",
    "bits": "{}-bit",
    "codec": "{}",
    "broadcast_bits": "{}-bit broadcast",
    "clients_per_round": "{} clients/round",
    "local_epochs": "{} epochs",
    "batch_size": "batch {}",
    "client_lr": "client lr {}",
    "server_lr": "server lr {}",
    "proximal_mu": "mu {}",
    "partition": "{}",
    "alpha": "alpha {}",
    "clip": "clip {}",
    "zeroing": "zeroing {}",
    "seed": "seed {}",
}


def saved_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A ``fastfed train`` run's saved settings as this version reads them (also for ``--resume``):
    runs saved before ``--broadcast-bits`` existed quantized the broadcast with ``--bits`` too."""
    if "bits" in config and "broadcast_bits" not in config:
        return {**config, "broadcast_bits": config["bits"]}
    return dict(config)


def _config(run: Path) -> dict[str, Any]:
    try:
        loaded = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return saved_settings(loaded) if isinstance(loaded, dict) else {}


def run_labels(runs: Sequence[Path]) -> list[str]:
    """A legend entry per run: the settings on which the runs differ (for one run: dataset, model, bits,
    and a quantized broadcast's bits)."""
    configs = [_config(run) for run in runs]
    differing = [key for key in _LABELLED if len({json.dumps(c.get(key)) for c in configs}) > 1]
    keys = differing or [key for key in ("dataset", "model", "bits") if any(key in c for c in configs)]
    if not differing and any(c.get("broadcast_bits") is not None for c in configs):
        keys.append("broadcast_bits")
    labels = []
    for run, config in zip(runs, configs):
        parts = []
        for key in keys:
            value = config.get(key)
            if key == "bits" and value is None:
                parts.append("32-bit float")
            elif key == "broadcast_bits" and value is None:
                parts.append("exact broadcast")
            elif key == "codec" and config.get("bits") is None and config.get("broadcast_bits") is None:
                continue  # uncompressed: no codec
            elif value is not None:
                parts.append(_LABELLED[key].format(value))
        labels.append(", ".join(parts) or run.name)
    if len(set(labels)) < len(labels):  # identical settings: the folders tell them apart
        labels = [f"{label} ({run.name})" for label, run in zip(labels, runs)]
    return labels


def _read(run: Path) -> list[dict[str, str]]:
    path = run / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no metrics.csv (is it a folder written by fastfed train?)")
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{run}: metrics.csv has no rounds")
    return rows


def _series(rows: list[dict[str, str]], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(float(row[x]), float(row[y])) for row in rows if row.get(x) and row.get(y)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def plot_runs(runs: Sequence[str | Path], output: str | Path | None = None) -> Path:
    """Draws training accuracy and loss per round, held-out accuracy per round where the runs
    evaluated, and accuracy against cumulative bits sent (log scale), for ``runs`` overlaid."""
    from ._extras import require

    require("matplotlib", "plot", "fastfed plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folders = [Path(run) for run in runs]
    tables = [_read(run) for run in folders]
    evaluated = any("eval_accuracy" in rows[0] for rows in tables)
    accuracy = "eval_accuracy" if evaluated else "train_accuracy"
    panels = ["train", "loss", *(["eval"] if evaluated else []), "bits"]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    axis = dict(zip(panels, axes))
    for label, rows in zip(run_labels(folders), tables):
        axis["train"].plot(*_series(rows, "round", "train_accuracy"), label=label)
        axis["loss"].plot(*_series(rows, "round", "train_loss"), label=label)
        if evaluated:
            axis["eval"].plot(*_series(rows, "round", "eval_accuracy"), marker=".", label=label)
        sent = [(float(r["broadcast_bits_total"]) + float(r["aggregate_bits_total"])) for r in rows]
        axis["bits"].plot(sent, [float(r[accuracy]) if r.get(accuracy) else float("nan") for r in rows], label=label)
    axis["train"].set(xlabel="round", ylabel="training accuracy", title="Training accuracy (during local training)")
    axis["loss"].set(xlabel="round", ylabel="training loss", title="Training loss")
    if evaluated:
        axis["eval"].set(xlabel="round", ylabel="held-out accuracy", title="Held-out accuracy")
    axis["bits"].set(
        xscale="log",
        xlabel="cumulative bits sent (uploads + broadcasts, all clients)",
        ylabel="held-out accuracy" if evaluated else "training accuracy",
        title="Accuracy vs bits sent",
    )
    for panel in axes:
        panel.grid(alpha=0.3)
        panel.legend(fontsize="small")
    figure.tight_layout()
    destination = Path(output) if output else folders[0] / "metrics.png"
    figure.savefig(destination, dpi=100)
    plt.close(figure)
    print(f"wrote {destination}")
    return destination
