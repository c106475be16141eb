"""Crash-safe checkpoints of a FedAvg run: npz arrays plus JSON, no pickle, atomic, checksummed.

Layout: ``RUN_DIR/checkpoints/round-000012/`` holds ``arrays.npz`` (weights and server optimizer
state) and ``state.json`` (round, seed, bit totals, adaptive-bound estimates, metrics history, run
configuration, and the SHA-256 of ``arrays.npz``; the JSON carries a SHA-256 of its own content).
A checkpoint is written into a temporary directory, every file and the directory are fsynced, and
the directory is renamed into place, so a crash leaves either the whole checkpoint or none of it.

Every random choice of a run derives from (seed, round, client index), so (seed, round) is the
complete RNG state: a resumed run is bitwise identical to an uninterrupted one as long as the
arithmetic is deterministic (see :func:`fastfed.learning.client.enable_determinism`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fedavg import FedAvgState

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT = "fastfed-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or corrupted."""


@dataclass
class Checkpoint:
    """A restored run: its FedAvg state and what the run recorded alongside it."""

    state: FedAvgState
    seed: int
    metrics_history: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def weights(self) -> list[np.ndarray]:
        return self.state.weights

    @property
    def round(self) -> int:
        return self.state.round


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    run_dir: str | Path,
    state: FedAvgState,
    *,
    seed: int = 0,
    metrics_history: list[dict[str, float]] | None = None,
    config: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Writes ``state`` as the checkpoint of its round and keeps only the newest ``keep`` checkpoints."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {f"weights/{i}": np.asarray(w) for i, w in enumerate(state.weights)}
    for key, values in state.optimizer_state.items():
        for i, value in enumerate(values):
            arrays[f"optimizer/{key}/{i}"] = np.asarray(value)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    array_bytes = buffer.getvalue()
    content = {
        "format": FORMAT,
        "version": VERSION,
        "round": state.round,
        "seed": seed,
        "num_weights": len(state.weights),
        "optimizer_keys": {key: len(values) for key, values in state.optimizer_state.items()},
        "broadcast_bits_total": state.broadcast_bits_total,
        "aggregate_bits_total": state.aggregate_bits_total,
        "aggregator_state": state.aggregator_state,
        "metrics_history": metrics_history or [],
        "config": config or {},
        "arrays_sha256": _sha256(array_bytes),
    }
    # The checksum covers a canonical (key-sorted) form; the file keeps insertion order, so that a
    # restored metrics history lists its columns in the order the run logged them.
    body = json.dumps(content, sort_keys=True)
    document = json.dumps({"content": content, "sha256": _sha256(body.encode())}, indent=1)
    final = root / f"round-{state.round:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".round-{state.round:06d}-", dir=root))
    try:
        _write_synced(staging / "arrays.npz", array_bytes)
        _write_synced(staging / "state.json", document.encode())
        _fsync_directory(staging)
        if final.exists():  # the same round saved again: replace it as a whole
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_directory(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in sorted(p for p in root.iterdir() if p.name.startswith("round-"))[:-keep]:
        shutil.rmtree(old)
    return final


def _read(path: Path) -> Checkpoint:
    try:
        document = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: state.json is unreadable ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("content"), dict):
        raise CheckpointError(f"{path}: state.json has no content")
    content = document["content"]
    if _sha256(json.dumps(content, sort_keys=True).encode()) != document.get("sha256"):
        raise CheckpointError(f"{path}: state.json checksum mismatch")
    if content.get("format") != FORMAT or content.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a version {VERSION} fastfed checkpoint")
    try:
        array_bytes = (path / "arrays.npz").read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: arrays.npz is unreadable ({error})") from None
    if _sha256(array_bytes) != content["arrays_sha256"]:
        raise CheckpointError(f"{path}: arrays.npz checksum mismatch (truncated or corrupted)")
    with np.load(path / "arrays.npz", allow_pickle=False) as arrays:
        weights = [arrays[f"weights/{i}"] for i in range(content["num_weights"])]
        optimizer_state = {
            key: [arrays[f"optimizer/{key}/{i}"] for i in range(count)]
            for key, count in content["optimizer_keys"].items()
        }
    state = FedAvgState(
        weights=weights,
        round=content["round"],
        optimizer_state=optimizer_state,
        broadcast_bits_total=content["broadcast_bits_total"],
        aggregate_bits_total=content["aggregate_bits_total"],
        aggregator_state=content["aggregator_state"],
    )
    return Checkpoint(state, content["seed"], content["metrics_history"], content["config"], path)


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The newest checkpoint of ``run_dir`` that verifies; corrupted newer ones are skipped with a warning.

    Raises :class:`CheckpointError` if the run has no checkpoint that verifies.
    """
    root = Path(run_dir) / "checkpoints"
    candidates = (
        sorted((p for p in root.iterdir() if p.name.startswith("round-")), reverse=True) if root.exists() else []
    )
    skipped: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            checkpoint = _read(path)
        except CheckpointError as error:
            skipped.append((path, str(error)))
            continue
        if skipped:
            names = ", ".join(p.name for p, _ in skipped)
            warnings.warn(
                f"skipped corrupted checkpoint(s) {names}; using {path.name}: {skipped[0][1]}",
                RuntimeWarning,
                stacklevel=2,
            )
        checkpoint.skipped = skipped
        return checkpoint
    reasons = "; ".join(reason for _, reason in skipped) or "none was written"
    raise CheckpointError(f"{run_dir}: no usable checkpoint ({reasons})")
