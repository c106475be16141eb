"""The training loop as a library function, the shape of TFF's ``run_training_process``: sample
clients each round, run the round, evaluate held-out clients every N rounds, log metrics (CSV and
TensorBoard), checkpoint, resume, and call back.

A run folder holds ``metrics.csv``, ``tensorboard/`` and ``checkpoints/``. The metrics history saved
in each checkpoint is the record: on resume, the CSV and TensorBoard logs are rewritten from it, so
rounds logged after the last checkpoint are redone rather than duplicated.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import CheckpointError, load_checkpoint, round_folders, save_checkpoint
from .fedavg import FedAvg, FedAvgState
from .inputs import client_arrays

__all__ = ["RunExistsError", "TrainingInterrupted", "TrainingResult", "run_training"]

log = logging.getLogger("fastfed")

SAMPLING_STREAM = 0x5A4D504C  # distinguishes client sampling from the training seeds of a round
RUN_FILES = ("metrics.csv", "tensorboard", "checkpoints", "weights.npz")

Callback = Callable[[FedAvgState, dict[str, float]], None]


class RunExistsError(FileExistsError):
    """The run folder already holds a run, and neither resuming nor overwriting it was asked for."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_training`, after the last completed round was checkpointed.

    ``state`` is that round's state (its round number is ``state.round``); ``run_dir`` is where it
    was saved, or ``None`` when the run writes no files.
    """

    def __init__(self, state: FedAvgState, run_dir: Path | None) -> None:
        super().__init__(f"interrupted after round {state.round}")
        self.state, self.run_dir = state, run_dir


@dataclass
class TrainingResult:
    """The final state and every round's metrics (training, and evaluation where it ran)."""

    state: FedAvgState
    history: list[dict[str, float]] = field(default_factory=list)


def holds_run(run_dir: Path) -> bool:
    """Whether a folder already holds a run's files."""
    return run_dir.is_dir() and any((run_dir / name).exists() for name in RUN_FILES)


class _RunLog:
    """metrics.csv and TensorBoard scalars of a run, rewritten whole from a history on resume."""

    def __init__(self, run_dir: Path, history: list[dict[str, float]]) -> None:
        self.csv_path = run_dir / "metrics.csv"
        self.columns: list[str] = []
        self.rows = list(history)
        self._rewrite_csv()
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        self._writer: Any = None
        self.tensorboard = run_dir / "tensorboard"
        for row in history:
            self._scalars(row)

    def _scalars(self, row: dict[str, float]) -> None:
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.tensorboard))
        with self._writer.as_default(step=int(row["round"])):
            for name, value in row.items():
                tf.summary.scalar(name, value)
        self._writer.flush()

    def _rewrite_csv(self) -> None:
        """The whole CSV from the history, atomically; columns in order of first appearance."""
        self.columns = list(dict.fromkeys(name for row in self.rows for name in row))
        temporary = self.csv_path.with_suffix(".csv.tmp")
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(temporary, self.csv_path)

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        if set(row) - set(self.columns):  # a new column (evaluation's first round): rewrite with it
            self._rewrite_csv()
        else:
            with open(self.csv_path, "a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.columns).writerow(row)
        self._scalars(row)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _sample(clients: Any, count: int, rng: np.random.Generator) -> Any:
    """``count`` of the clients, chosen with ``rng``; of a ClientData, a ClientData (its ids name failures)."""
    from ..data import ClientData

    if isinstance(clients, ClientData):
        return clients.subset(clients.sample_ids(count, rng))
    return [clients[i] for i in sorted(rng.choice(len(clients), size=count, replace=False))]


def run_training(
    process: FedAvg,
    clients: Any,
    *,
    rounds: int,
    clients_per_round: int | None = None,
    evaluation_clients: Any = None,
    evaluate_every: int = 1,
    run_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    keep_checkpoints: int = 3,
    resume: bool = False,
    overwrite: bool = False,
    config: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool | None = None,
) -> TrainingResult:
    """Trains ``process`` for ``rounds`` rounds in total (TFF's ``run_training_process``).

    Args:
      process: the :class:`fastfed.FedAvg` process.
      clients: the training clients, a :class:`fastfed.data.ClientData` or a list of clients (each
        in any form :meth:`FedAvg.next` accepts).
      rounds: the round to stop after; a resumed run continues up to it.
      clients_per_round: clients sampled per round (seeded by the process's seed and the round);
        ``None`` trains every client every round.
      evaluation_clients: held-out clients evaluated with :meth:`FedAvg.evaluate` every
        ``evaluate_every`` rounds and after the last one, logged as ``eval_<metric>``.
      run_dir: where ``metrics.csv``, ``tensorboard/`` and ``checkpoints/`` go; ``None`` writes nothing.
      checkpoint_every: checkpoint every this many rounds and after the last one (0: never).
      keep_checkpoints: the newest checkpoints kept.
      resume: continue from the newest good checkpoint in ``run_dir`` (a fresh start if none was
        written); raises :class:`fastfed.CheckpointError` if checkpoints exist and none verifies, and
        ``ValueError`` if the run was trained with another seed, model, server optimizer or aggregator.
      overwrite: start afresh in a ``run_dir`` that holds a run, deleting it. Without ``resume`` or
        ``overwrite``, such a folder raises :class:`RunExistsError`: runs are never overwritten silently.
      config: saved in every checkpoint, e.g. the settings a command line used.
      callbacks: called as ``callback(state, metrics)`` after every round.
      progress: a per-round progress bar; ``None`` shows one only on a terminal.

    Returns:
      The final state and the whole metrics history (restored ones included).

    Raises:
      TrainingInterrupted: on Ctrl-C, once the last completed round is checkpointed.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    if evaluate_every < 1 or checkpoint_every < 0 or keep_checkpoints < 1:
        raise ValueError("evaluate_every and keep_checkpoints must be positive, checkpoint_every non-negative")
    folder = None if run_dir is None else Path(run_dir)
    state, history = _starting_point(process, folder, resume, overwrite)
    pool = clients if _is_client_data(clients) else client_arrays(clients)
    per_round = len(pool) if clients_per_round is None else clients_per_round
    if not 1 <= per_round <= len(pool):
        raise ValueError(f"clients_per_round must be between 1 and the {len(pool)} clients, got {per_round}")
    run_log = None if folder is None else _RunLog(folder, history)
    # A round is in or out as a whole: its state and its metrics are committed by one assignment,
    # so that Ctrl-C at any moment leaves a consistent pair to checkpoint.
    committed = (state, history)
    try:
        while committed[0].round < rounds:
            state, history = committed
            rng = np.random.default_rng([process.seed, state.round, SAMPLING_STREAM])
            selected = _sample(pool, per_round, rng)
            bar = _progress_bar(len(selected), state.round + 1, progress)
            try:
                state, metrics = process.next(state, selected, progress=None if bar is None else bar.update)
            finally:
                if bar is not None:
                    bar.close()
            if evaluation_clients is not None and (state.round % evaluate_every == 0 or state.round == rounds):
                evaluation = process.evaluate(state, evaluation_clients)
                metrics.update({f"eval_{name}": value for name, value in evaluation.items()})
            committed = (state, [*history, metrics])
            if run_log is not None:
                run_log.append(metrics)
            for callback in callbacks:
                callback(state, metrics)
            due = checkpoint_every and (state.round % checkpoint_every == 0 or state.round == rounds)
            if folder is not None and due:
                save_checkpoint(folder, state, seed=process.seed, metrics_history=committed[1], config=config,
                                keep=keep_checkpoints)  # fmt: skip
    except KeyboardInterrupt:
        state, history = committed
        if folder is not None and checkpoint_every:
            save_checkpoint(folder, state, seed=process.seed, metrics_history=history, config=config,
                            keep=keep_checkpoints)  # fmt: skip
        raise TrainingInterrupted(state, folder) from None
    finally:
        if run_log is not None:
            run_log.close()
    state, history = committed
    return TrainingResult(state, history)


def _is_client_data(clients: object) -> bool:
    from ..data import ClientData

    return isinstance(clients, ClientData)


def _starting_point(
    process: FedAvg, folder: Path | None, resume: bool, overwrite: bool
) -> tuple[FedAvgState, list[dict[str, float]]]:
    if folder is not None and holds_run(folder) and not resume:
        if not overwrite:
            raise RunExistsError(f"{folder} already holds a run; resume it or overwrite it")
        for name in RUN_FILES:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    if resume and folder is not None and (folder / "checkpoints").is_dir():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                checkpoint = load_checkpoint(folder)
            except CheckpointError:
                if round_folders(folder / "checkpoints"):  # written, and none verifies: not overwritten
                    raise
                checkpoint = None
        for warning in caught:
            log.warning("%s", warning.message)
        if checkpoint is not None:
            if checkpoint.seed != process.seed:
                raise ValueError(f"{folder} was trained with seed {checkpoint.seed}, this process has {process.seed}")
            try:
                process.check_state(checkpoint.state)
            except ValueError as error:
                raise ValueError(f"{folder} was trained with other settings: {error}") from None
            return checkpoint.state, list(checkpoint.metrics_history)
    return process.initialize(), []


def _progress_bar(total: int, round_number: int, show: bool | None) -> Any:
    """A per-round progress bar over clients (tqdm, when installed), or None."""
    if show is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # disable=None: no bar where stderr is not a terminal, so that logs stay clean.
    disable = None if show is None else False
    return tqdm(total=total, desc=f"round {round_number}", leave=False, unit="client", disable=disable)
