"""Crash-safe checkpoints of a FedAvg run: npz arrays plus JSON, no pickle, atomic, checksummed.

Layout: ``RUN_DIR/checkpoints/round-000012/`` holds ``arrays.npz`` (weights and server optimizer
state) and ``state.json`` (round, seed, bit totals, adaptive-bound estimates, metrics history, run
configuration, and the SHA-256 of ``arrays.npz``; the JSON carries a SHA-256 of its own content).
A checkpoint is written into a temporary directory, every file and the directory are fsynced, and
the directory is renamed into place, so a crash leaves either the whole checkpoint or none of it.

Every random choice of a run derives from (seed, round, client index), so (seed, round) is the
complete RNG state: a resumed run is bitwise identical to an uninterrupted one as long as the
arithmetic is deterministic (see :func:`fastfed.learning.client.enable_determinism`).

Loading trusts nothing in the folder: checkpoints are ordered by the round number their folder name
parses to; only real directories and regular files inside the run folder are read (no symlinks, no
devices or FIFOs), each read once and in full; the arrays are parsed from the very bytes whose
SHA-256 was checked, never unpickled, and their headers cannot ask for more memory than the file
holds; and the round stored inside must be the one the folder is named for. A checkpoint failing
any of this is skipped with a warning, and the newest one that passes is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._npy import npy_view
from .fedavg import FedAvgState

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "round_folders", "save_checkpoint"]

FORMAT = "fastfed-checkpoint"
VERSION = 1
ROUND_FOLDER = re.compile(r"round-(\d+)")
MAX_STATE_BYTES = 1 << 28  # state.json: metrics and configuration, far below this


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
    saved = [path for path, _ in round_folders(root) if path.is_dir() and not path.is_symlink()]  # no links
    for old in saved[keep:]:
        shutil.rmtree(old)
    return final


def round_folders(root: Path) -> list[tuple[Path, int]]:
    """The ``round-N`` entries of ``root``, newest round first (by number: round 1,000,000 is newer
    than round 999,999, whatever their names sort as)."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = ROUND_FOLDER.fullmatch(entry.name)
        if match:
            found.append((entry, int(match.group(1))))
    return sorted(found, key=lambda item: item[1], reverse=True)


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def _read_regular_file(path: Path, limit: int | None = None) -> bytes:
    """All bytes of a regular file, opened without following a symlink and without blocking on a
    FIFO; devices, FIFOs and symlinks are refused, and at most its size (or ``limit``) is read."""
    name = path.name
    try:
        descriptor = os.open(path, _OPEN_FLAGS)
    except OSError as error:
        raise CheckpointError(f"{path.parent}: {name} cannot be opened as a regular file ({error})") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path.parent}: {name} is not a regular file")
        if limit is not None and info.st_size > limit:
            raise CheckpointError(f"{path.parent}: {name} is {info.st_size} bytes, more than the {limit} allowed")
        chunks, remaining = [], info.st_size
        while remaining > 0:
            chunk = os.read(descriptor, min(remaining, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        if remaining or os.read(descriptor, 1):
            raise CheckpointError(f"{path.parent}: {name} changed while it was read")
        return b"".join(chunks)
    except OSError as error:
        raise CheckpointError(f"{path.parent}: {name} is unreadable ({error})") from None
    finally:
        os.close(descriptor)


def _arrays_of(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an ``np.savez`` archive, parsed from these bytes: stored members only, each a
    ``.npy`` whose header must match its size (so no header can ask for more memory), no pickle."""
    arrays = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise ValueError(f"member {info.filename!r} is not a stored .npy array")
            arrays[info.filename[: -len(".npy")]] = npy_view(archive.read(info)).copy()
    return arrays


def _read(path: Path, folder_round: int, run_dir: Path) -> Checkpoint:
    if path.is_symlink() or not path.is_dir():
        raise CheckpointError(f"{path}: not a directory of the run (symlinks are not followed)")
    if not path.resolve().is_relative_to(run_dir):
        raise CheckpointError(f"{path}: lies outside the run folder {run_dir}")
    try:
        document = json.loads(_read_regular_file(path / "state.json", MAX_STATE_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: state.json is unreadable ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("content"), dict):
        raise CheckpointError(f"{path}: state.json has no content")
    content = document["content"]
    if _sha256(json.dumps(content, sort_keys=True).encode()) != document.get("sha256"):
        raise CheckpointError(f"{path}: state.json checksum mismatch")
    if content.get("format") != FORMAT or content.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a version {VERSION} fastfed checkpoint")
    if content.get("round") != folder_round:
        raise CheckpointError(f"{path}: holds round {content.get('round')!r}, not the round {folder_round} of its name")
    array_bytes = _read_regular_file(path / "arrays.npz")
    if _sha256(array_bytes) != content.get("arrays_sha256"):
        raise CheckpointError(f"{path}: arrays.npz checksum mismatch (truncated or corrupted)")
    try:
        # The arrays come from the bytes just hashed: a file swapped since cannot slip in.
        arrays = _arrays_of(array_bytes)
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
    except (KeyError, TypeError, ValueError, AttributeError, zipfile.BadZipFile, EOFError) as error:
        # A missing field, a pickled or malformed array: corruption, like a checksum mismatch.
        reason = f"{type(error).__name__}: {error}"
        raise CheckpointError(f"{path}: arrays.npz or state.json is malformed ({reason})") from None


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The newest checkpoint of ``run_dir`` that verifies; corrupted newer ones are skipped with a warning.

    Raises :class:`CheckpointError` if the run has no checkpoint that verifies.
    """
    run = Path(run_dir).resolve()
    skipped: list[tuple[Path, str]] = []
    for path, folder_round in round_folders(Path(run_dir) / "checkpoints"):
        try:
            checkpoint = _read(path, folder_round, run)
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
