"""fastfed.learning.run_training, in-process: sampling, evaluation every N rounds, logs, callbacks,
checkpoints, an interrupted run resumed to the same bits, and run folders that are never overwritten."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import fastfed
from fastfed import data, models
from fastfed.learning import RunExistsError, TrainingInterrupted, run_training


def _data() -> tuple[data.ClientData, tuple[np.ndarray, np.ndarray]]:
    (x, y), test = data.load_digits(seed=0)
    return data.partition_dirichlet(x, y, 12, alpha=0.5, seed=0), test


def _process(**options: Any) -> fastfed.FedAvg:
    return fastfed.FedAvg(
        lambda: models.mlp((64,), hidden=16),
        client_optimizer=lambda: keras.optimizers.SGD(learning_rate=0.1),
        batch_size=16,
        seed=4,
        **options,
    )


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_rounds_sample_evaluate_log_and_call_back(tmp_path: Path) -> None:
    clients, test = _data()
    seen: list[tuple[int, dict[str, Any]]] = []
    result = run_training(
        _process(), clients, rounds=5, clients_per_round=4, evaluation_clients=[test], evaluate_every=2,
        run_dir=tmp_path, checkpoint_every=2, callbacks=[lambda state, metrics: seen.append((state.round, metrics))],
    )  # fmt: skip
    assert result.state.round == 5 and [r for r, _ in seen] == [1, 2, 3, 4, 5]
    evaluated = [m["round"] for m in result.history if "eval_accuracy" in m]
    assert evaluated == [2, 4, 5]  # every second round, and after the last
    assert all(m["num_clients"] == 4 for m in result.history)
    rows = _rows(tmp_path)
    assert [row["round"] for row in rows] == ["1", "2", "3", "4", "5"]
    assert rows[0]["eval_accuracy"] == "" and float(rows[1]["eval_accuracy"]) > 0.1
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["round-000002", "round-000004", "round-000005"]
    assert any((tmp_path / "tensorboard").iterdir())
    with pytest.raises(RunExistsError, match="already holds a run"):
        run_training(_process(), clients, rounds=1, run_dir=tmp_path)


def test_an_interrupted_run_resumes_to_the_same_bits(tmp_path: Path) -> None:
    clients, test = _data()
    reference = run_training(_process(), clients, rounds=4, clients_per_round=5, evaluation_clients=[test])

    def interrupt_after_round_2(state: fastfed.FedAvgState, metrics: dict[str, float]) -> None:
        if state.round == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as interrupted:
        run_training(_process(), clients, rounds=4, clients_per_round=5, evaluation_clients=[test],
                     run_dir=tmp_path, callbacks=[interrupt_after_round_2])  # fmt: skip
    assert interrupted.value.state.round == 2 and interrupted.value.run_dir == tmp_path
    assert fastfed.load_checkpoint(tmp_path).round == 2
    resumed = run_training(_process(), clients, rounds=4, clients_per_round=5, evaluation_clients=[test],
                           run_dir=tmp_path, resume=True)  # fmt: skip
    assert [m["round"] for m in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(resumed.state.weights, reference.state.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [m["train_loss"] for m in resumed.history] == [m["train_loss"] for m in reference.history]
    assert [row["round"] for row in _rows(tmp_path)] == ["1", "2", "3", "4"]
    extended = run_training(_process(), clients, rounds=6, clients_per_round=5, run_dir=tmp_path, resume=True)
    assert extended.state.round == 6 and len(extended.history) == 6


def test_a_resume_refuses_other_settings_and_unreadable_checkpoints(tmp_path: Path) -> None:
    # It used to fail deep inside the first round with a KeyError, or start over silently and write
    # over a run whose every checkpoint failed verification.
    clients, _ = _data()
    run_training(_process(), clients, rounds=2, clients_per_round=5, run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"trained with other settings: .*Adam.* keeps \['m', 'v'\]"):
        run_training(_process(server_optimizer=fastfed.optimizers.Adam()), clients, rounds=3, clients_per_round=5,
                     run_dir=tmp_path, resume=True)  # fmt: skip
    for saved in (tmp_path / "checkpoints").iterdir():
        arrays = saved / "arrays.npz"
        corrupted = bytearray(arrays.read_bytes())
        corrupted[-10] ^= 1
        arrays.write_bytes(bytes(corrupted))
    with pytest.raises(fastfed.CheckpointError, match="no usable checkpoint"):
        run_training(_process(), clients, rounds=3, clients_per_round=5, run_dir=tmp_path, resume=True)
    assert len(_rows(tmp_path)) == 2  # the run's log is as it was
