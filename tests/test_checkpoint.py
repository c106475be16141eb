"""Checkpoints that cannot be fooled: round order, the bytes that were hashed, names, links, special
files, pickles and missing fields. (Round trips through training are in test_reliability.py.)"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fastfed
from fastfed import CheckpointError, FedAvgState
from fastfed.learning import checkpoint as checkpoint_module


def _state(round_number: int) -> FedAvgState:
    weights = [np.full((2, 3), round_number, np.float32), np.array(round_number, np.int64)]
    return FedAvgState(weights=weights, round=round_number, optimizer_state={"m": [np.zeros(3)]})


def _save(run: Path, *rounds: int, keep: int = 10) -> Path:
    for round_number in rounds:
        fastfed.save_checkpoint(run, _state(round_number), keep=keep)
    return run / "checkpoints"


def _rewrite(folder: Path, arrays: bytes | None = None, **changes: object) -> None:
    """Replaces a checkpoint's arrays and/or state fields, with valid checksums: only the content is wrong."""
    document = json.loads((folder / "state.json").read_text())
    content = document["content"]
    if arrays is not None:
        (folder / "arrays.npz").write_bytes(arrays)
        content["arrays_sha256"] = hashlib.sha256(arrays).hexdigest()
    for key, value in changes.items():
        if value is None:
            del content[key]
        else:
            content[key] = value
    document["sha256"] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    (folder / "state.json").write_text(json.dumps(document))


def _npz(**arrays: object) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def test_rounds_are_ordered_by_number_past_a_million(tmp_path: Path) -> None:
    root = _save(tmp_path, 999_998, 999_999, 1_000_000, 1_000_001, keep=3)
    # As strings, "round-1000000" sorts before "round-999998": pruning used to delete the newest.
    assert sorted(p.name for p in root.iterdir()) == ["round-1000000", "round-1000001", "round-999999"]
    assert fastfed.load_checkpoint(tmp_path).round == 1_000_001


def test_arrays_are_parsed_from_the_bytes_that_were_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _save(tmp_path, 1, 2)
    arrays = root / "round-000002" / "arrays.npz"
    original, impostor = arrays.read_bytes(), (root / "round-000001" / "arrays.npz").read_bytes()
    hash_bytes = checkpoint_module._sha256

    def swap_after_hashing(data: bytes) -> str:
        digest = hash_bytes(data)
        if data == original:  # the file is replaced between the check and the load
            arrays.write_bytes(impostor)
        return digest

    monkeypatch.setattr(checkpoint_module, "_sha256", swap_after_hashing)
    restored = fastfed.load_checkpoint(tmp_path)
    assert restored.round == 2 and restored.weights[0][0, 0] == 2.0


def test_a_folder_whose_name_disagrees_with_its_round_is_skipped(tmp_path: Path) -> None:
    root = _save(tmp_path, 3, 4)
    shutil.copytree(root / "round-000003", root / "round-000007")  # an old checkpoint copied in as newer
    with pytest.warns(RuntimeWarning, match="round-000007.*using round-000004.*holds round 3, not the round 7"):
        restored = fastfed.load_checkpoint(tmp_path)
    assert restored.round == 4


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX symlinks and FIFOs")
def test_links_out_of_the_run_and_special_files_are_not_followed(tmp_path: Path) -> None:
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    root = _save(run, 1, 2, 3, 4)
    other = _save(elsewhere, 9)
    (root / "round-000009").symlink_to(other / "round-000009", target_is_directory=True)
    zero = root / "round-000004" / "arrays.npz"
    zero.unlink()
    zero.symlink_to("/dev/zero")  # would be read forever
    fifo = root / "round-000003" / "state.json"
    fifo.unlink()
    os.mkfifo(fifo)  # would block forever
    (root / "round-000002" / "arrays.npz").unlink()
    (root / "round-000002" / "arrays.npz").symlink_to(root / "round-000001" / "arrays.npz")
    result: list[object] = []
    loader = threading.Thread(target=lambda: result.append(_load_quietly(run)), daemon=True)
    loader.start()
    loader.join(timeout=10)
    assert not loader.is_alive(), "load_checkpoint hung on a special file"
    restored, skipped = result[0]  # type: ignore[misc]
    assert restored.round == 1
    reasons = dict((path.name, reason) for path, reason in skipped)
    assert "not a directory of the run" in reasons["round-000009"]
    assert "cannot be opened as a regular file" in reasons["round-000004"]
    assert "not a regular file" in reasons["round-000003"]
    assert "cannot be opened as a regular file" in reasons["round-000002"]
    # Pruning never deletes through a link.
    fastfed.save_checkpoint(run, _state(5), keep=1)
    assert (other / "round-000009" / "arrays.npz").exists()


def _load_quietly(run: Path) -> tuple[fastfed.Checkpoint, list[tuple[Path, str]]]:
    with pytest.warns(RuntimeWarning, match="skipped corrupted checkpoint"):
        restored = fastfed.load_checkpoint(run)
    return restored, restored.skipped


def test_pickles_missing_fields_and_hostile_archives_are_skipped_like_corruption(tmp_path: Path) -> None:
    root = _save(tmp_path, 1, 2, 3, 4, 5, 6)
    weights = {"weights/0": np.zeros((2, 3), np.float32), "weights/1": np.array(6), "optimizer/m/0": np.zeros(3)}
    _rewrite(root / "round-000006", _npz(**{**weights, "weights/0": np.array([{"a": 1}], dtype=object)}))
    _rewrite(root / "round-000005", seed=None)  # a field missing
    huge = io.BytesIO()
    with zipfile.ZipFile(huge, "w") as archive:  # a header asking for 8 TB, in a 200-byte member
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
        archive.writestr("weights/0.npy", header.getvalue())
    _rewrite(root / "round-000004", huge.getvalue())
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, value in weights.items():
            member = io.BytesIO()
            np.save(member, value)
            archive.writestr(f"{name}.npy", member.getvalue())
    _rewrite(root / "round-000003", deflated.getvalue())  # a compressed member could expand without bound
    _rewrite(root / "round-000002", num_weights="two")
    with pytest.warns(RuntimeWarning, match="round-000006, round-000005, round-000004, round-000003, round-000002"):
        restored = fastfed.load_checkpoint(tmp_path)
    assert restored.round == 1
    reasons = [reason for _, reason in restored.skipped]
    assert "object arrays are refused" in reasons[0]
    assert "KeyError: 'seed'" in reasons[1]
    assert "expected 8000000000000" in reasons[2]
    assert "not a stored .npy array" in reasons[3]
    assert "TypeError" in reasons[4]
    for path in root.iterdir():
        if path.name != "round-000001":
            shutil.rmtree(path)
    (root / "round-000001" / "arrays.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        fastfed.load_checkpoint(tmp_path)
