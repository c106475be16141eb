"""The ``fastfed`` command as a new user meets it: bad arguments, every dataset and model, run folders,
Ctrl-C, resuming and extending, plots."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras")

from emnist_files import make_writers, write_sqlite
from fastfed.cli import main

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
# The stopped and extended runs compare with one reference run: one xdist worker runs them.
pytestmark = pytest.mark.xdist_group("cli-runs")


def _fastfed(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastfed.cli", *arguments], capture_output=True, text=True, timeout=timeout, check=False
    )


BAD_ARGUMENTS = [
    ("--rounds 0", "argument --rounds: expected at least 1, got 0"),
    ("--rounds -5", "argument --rounds: expected at least 1, got -5"),
    ("--bits 0", "argument --bits: expected from 1 to 16, got 0"),
    ("--bits 33", "argument --bits: expected from 1 to 16, got 33"),
    ("--codec rotated --bits 9", "--codec rotated needs --bits 1..8, got 9"),
    ("--codec rotated", "--codec rotated needs --bits 1..8 (or --broadcast-bits 1..8), got neither"),
    ("--broadcast-bits 0", "argument --broadcast-bits: expected from 1 to 16, got 0"),
    ("--codec rotated --bits 2 --broadcast-bits 12", "--codec rotated needs --broadcast-bits 1..8, got 12"),
    ("--clients-per-round 0", "argument --clients-per-round: expected at least 1, got 0"),
    ("--num-clients 0", "argument --num-clients: expected at least 1, got 0"),
    ("--client-lr -0.1", "argument --client-lr: expected a number above 0.0, got -0.1"),
    ("--server-lr nan", "argument --server-lr: expected a finite number, got 'nan'"),
    ("--batch-size 0", "argument --batch-size: expected at least 1, got 0"),
    ("--local-epochs 0", "argument --local-epochs: expected at least 1, got 0"),
    ("--clients-per-round 30", "--clients-per-round 30 is more than --num-clients 20"),
    ("--dataset mnist", "--dataset mnist needs --data-dir with the IDX files"),
    ("--dataset mnist --data-dir {tmp}/missing", "--data-dir {tmp}/missing does not exist"),
    ("--dataset mnist --data-dir {tmp}", "--data-dir {tmp} holds no MNIST IDX files"),
    ("--output-dir {tmp}/file/run", "cannot write to {tmp}/file/run"),
    ("--resume {tmp}/missing", "--resume {tmp}/missing: no such folder"),
    ("--resume {tmp}", "--resume {tmp}: the folder holds no checkpoints to resume from"),
    ("--model transformer", "argument --model: invalid choice: 'transformer'"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_ARGUMENTS)
def test_bad_arguments_fail_in_one_line_before_tensorflow_loads(tmp_path: Path, arguments: str, message: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    started = time.perf_counter()
    completed = _fastfed("train", *arguments.format(tmp=tmp_path).split())
    assert completed.returncode == 2 and completed.stdout == ""
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert message.format(tmp=tmp_path) in completed.stderr
    assert time.perf_counter() - started < 5  # TensorFlow alone takes longer to import


def test_bench_refuses_an_output_it_cannot_write_before_measuring(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    completed = _fastfed("bench", "--quick", "--output", str(tmp_path / "file"))
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr.strip() == f"fastfed bench: cannot write to {tmp_path / 'file'}: File exists"


def test_version_and_help_show_defaults() -> None:
    from importlib.metadata import version

    assert _fastfed("--version").stdout.strip() == f"fastfed {version('fastfed')}"
    help_text = " ".join(_fastfed("train", "--help").stdout.split())
    for default in ("(default: 30)", "(default: digits)", "(default: 20)", "(default: 0.1)", "(default: 1)"):
        assert default in help_text


@pytest.fixture(scope="module")
def emnist_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("emnist") / "emnist_all.sqlite"
    write_sqlite(path, {"digits_only_train": make_writers(5), "digits_only_test": make_writers(6)})
    return path


@pytest.mark.parametrize("model", ["mlp", "softmax", "cnn"])
@pytest.mark.parametrize("dataset", ["digits", "mnist", "emnist"])
def test_every_dataset_and_model_trains(
    dataset: str, model: str, emnist_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = {"digits": [], "mnist": ["--data-dir", str(MNIST)], "emnist": ["--data-dir", str(emnist_file)]}[dataset]
    if dataset == "mnist" and not MNIST.exists():
        pytest.skip("the real MNIST test set is not next to the repository")
    arguments = f"train --dataset {dataset} --model {model} --rounds 1 --local-epochs 1 --no-progress".split()
    sizes = ["--num-clients", "40", "--clients-per-round", "2"] if dataset != "emnist" else ["--clients-per-round", "2"]
    status = main([*arguments, *sizes, *source, "--output-dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "failed" not in out and "held-out evaluation: accuracy" in out
    if dataset == "mnist":  # the shared folder holds only the test set: the user is told
        assert "holds only MNIST's test set" in err
    with open(tmp_path / "run" / "metrics.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["round"] == "1" and row["clients_failed"] == "0" and row["num_clients"] == "2"


def test_runs_are_never_overwritten_silently_and_plots_name_their_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, other = tmp_path / "run", tmp_path / "other"
    arguments = ["train", "--rounds", "2", "--no-progress"]
    assert main([*arguments, "--output-dir", str(run)]) == 0
    first = (run / "metrics.csv").read_text()
    assert main([*arguments, "--output-dir", str(run), "--seed", "1"]) == 2
    out, err = capsys.readouterr()
    assert f"{run} already holds a run; resume it with --resume {run}, or add --overwrite" in err
    assert (run / "metrics.csv").read_text() == first  # untouched
    assert main([*arguments, "--output-dir", str(other), "--seed", "1", "--bits", "2", "--codec", "rotated"]) == 0
    out = capsys.readouterr().out
    assert f"run folder: {other}" in out and f"run saved in {other}" in out and "2-bit rotated uploads," in out
    assert main([*arguments, "--output-dir", str(run), "--overwrite", "--seed", "2", "--broadcast-bits", "8"]) == 0
    assert "uncompressed uploads and 8-bit uniform broadcast" in capsys.readouterr().out
    assert (run / "metrics.csv").read_text() != first
    # --bits quantizes the uploads alone; --broadcast-bits the model sent as well
    (uncompressed_uploads, *_), (quantized_uploads, *_) = (_rows(run), _rows(other))
    exact = int(uncompressed_uploads["aggregate_bits"])  # ten clients' float32 models
    assert exact > 32 * 10 * sum(w.size for w in _weights(other))
    assert int(quantized_uploads["broadcast_bits"]) == exact
    assert int(quantized_uploads["aggregate_bits"]) < exact / 5
    assert int(uncompressed_uploads["broadcast_bits"]) < exact / 3
    from fastfed.plot import run_labels

    assert run_labels([run, other]) == [
        "32-bit float, uniform, 8-bit broadcast, seed 2",
        "2-bit, rotated, exact broadcast, seed 1",
    ]
    assert main(["plot", str(run), str(other), "--output", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_labels_name_the_broadcast_and_read_runs_saved_before_broadcast_bits(tmp_path: Path) -> None:
    from fastfed.plot import run_labels

    settings = {"dataset": "digits", "model": "mlp", "codec": "uniform", "seed": 0}
    runs = {
        "old": {**settings, "bits": 8},  # saved before --broadcast-bits: --bits quantized the broadcast too
        "uploads": {**settings, "bits": 8, "broadcast_bits": None},
        "both": {**settings, "bits": 8, "broadcast_bits": 8},
    }
    for name, config in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    old, uploads, both = (tmp_path / name for name in runs)
    assert run_labels([old, uploads]) == ["8-bit broadcast", "exact broadcast"]
    assert run_labels([uploads]) == ["digits, mlp, 8-bit"]
    assert run_labels([both]) == ["digits, mlp, 8-bit, 8-bit broadcast"]
    assert run_labels([old, both]) == [f"digits, mlp, 8-bit, 8-bit broadcast ({name})" for name in ("old", "both")]


def _train_command(run: Path, *extra: str) -> list[str]:
    arguments = "train --rounds 4 --clients-per-round 6 --local-epochs 2 --deterministic --no-progress"
    return [sys.executable, "-m", "fastfed.cli", *arguments.split(), "--output-dir", str(run), *extra]


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def _weights(run: Path) -> list[np.ndarray]:
    with np.load(run / "weights.npz") as saved:
        return [saved[name] for name in saved.files]


def _tensorboard_steps(run: Path) -> list[int]:
    from tensorflow.core.util import event_pb2
    from tensorflow.python.lib.io import tf_record

    steps = []
    for path in sorted((run / "tensorboard").glob("events.*")):
        for record in tf_record.tf_record_iterator(str(path)):
            event = event_pb2.Event.FromString(record)
            steps += [event.step for value in event.summary.value if value.tag == "train_loss"]
    return sorted(steps)


def _wait_for(path: Path, child: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert child.poll() is None and time.monotonic() < deadline, "the run ended first"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run, for stopped and resumed runs to equal."""
    run = tmp_path_factory.mktemp("reference") / "run"
    completed = subprocess.run(_train_command(run), capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return run


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL])
def test_stopped_run_resumes_bit_for_bit(reference: Path, tmp_path: Path, stop: signal.Signals) -> None:
    run = tmp_path / "stopped"
    child = subprocess.Popen(_train_command(run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(run / "checkpoints" / "round-000002", child)
    child.send_signal(stop)
    _, err = child.communicate(timeout=120)
    assert not (run / "weights.npz").exists()
    if stop == signal.SIGINT:  # Ctrl-C: the last completed round is saved, one line says how to go on
        assert child.returncode == 130
        (line,) = err.strip().splitlines()
        assert line.startswith("interrupted at round ") and line.endswith(f"resume with: fastfed train --resume {run}")
    else:
        assert child.returncode == -signal.SIGKILL

    resumed = _fastfed("train", "--resume", str(run), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for actual, expected in zip(_weights(run), _weights(reference), strict=True):
        np.testing.assert_array_equal(actual, expected)
    assert [row["train_loss"] for row in _rows(run)] == [row["train_loss"] for row in _rows(reference)]
    assert list(_rows(run)[0]) == list(_rows(reference)[0])  # the same columns, in the same order
    assert _tensorboard_steps(run) == [1, 2, 3, 4]


def test_a_finished_run_extends_with_rounds_and_keeps_its_settings(reference: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "extended"
    shutil.copytree(reference, run)
    conflicting = _fastfed("train", "--resume", str(run), "--rounds", "6", "--bits", "8")
    assert conflicting.returncode == 2 and "--bits 8 (the run has None)" in conflicting.stderr
    extended = _fastfed("train", "--resume", str(run), "--rounds", "6", "--no-progress")
    assert extended.returncode == 0, extended.stderr[-2000:]
    assert [row["round"] for row in _rows(run)] == ["1", "2", "3", "4", "5", "6"]


def test_a_run_saved_before_broadcast_bits_existed_resumes_with_its_broadcast_quantized(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before --broadcast-bits, --bits quantized the model sent too; such a run resumes as it ran."""
    from fastfed.learning.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "old"
    assert main(["train", "--rounds", "1", "--no-progress", "--bits", "8", "--output-dir", str(run)]) == 0
    saved = load_checkpoint(run)
    old_config = {key: value for key, value in saved.config.items() if key != "broadcast_bits"}
    save_checkpoint(run, saved.state, seed=saved.seed, metrics_history=saved.metrics_history, config=old_config)
    assert main(["train", "--resume", str(run), "--rounds", "2", "--no-progress"]) == 0
    assert "8-bit uniform uploads and 8-bit uniform broadcast" in capsys.readouterr().out
    first, second = _rows(run)
    assert int(second["broadcast_bits"]) < int(second["aggregate_bits"]) * 1.01 < int(first["broadcast_bits"])


def test_bench_times_fastfed_rounds_in_a_process_of_their_own() -> None:
    """`fastfed bench` also runs the scenario's rounds in a fresh interpreter, as a user's script does,
    and reports their steady round and first/steady; a failure there is reported with its error."""
    from fastfed import bench

    clients = bench._synthetic_clients(2, 40, image=False)
    measured = bench._own_process_measurement("g", "MLP 784-512-10", clients, 20, rounds=1)
    assert measured.label == "fastfed round, own process" and 0 < measured.seconds < 60
    assert measured.info["first/steady"] > 0
    with pytest.raises(RuntimeError, match="process of their own failed"):
        bench._own_process_measurement("g", "MLP 784-512-10", clients, 0, rounds=1)  # batch size 0
