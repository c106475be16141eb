"""Datasets: partitioners, the MNIST IDX loader, and TFF's federated EMNIST in both layouts."""

from __future__ import annotations

import lzma
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from emnist_files import make_writers, write_h5, write_sqlite
from fastfed import data

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _assert_same(loaded: data.ClientData, writers: dict[str, tuple[np.ndarray, np.ndarray]], invert: bool) -> None:
    assert loaded.client_ids == sorted(writers)
    for client_id, (pixels, labels) in writers.items():
        x, y = loaded[client_id]
        assert x.dtype == np.float32 and x.shape == pixels.shape and y.dtype == np.int64
        np.testing.assert_array_equal(x, 1.0 - pixels if invert else pixels)
        np.testing.assert_array_equal(y, labels)


def test_emnist_h5_layout(tmp_path: Path) -> None:
    writers = make_writers()
    write_h5(tmp_path / "fed_emnist_digitsonly_train.h5", writers)
    _assert_same(data.load_emnist(tmp_path, split="train"), writers, invert=True)
    _assert_same(data.load_emnist(tmp_path / "fed_emnist_digitsonly_train.h5", invert=False), writers, invert=False)
    with pytest.raises(FileNotFoundError, match="fed_emnist_digitsonly_test.h5"):
        data.load_emnist(tmp_path, split="test")


def test_emnist_sqlite_layout_and_splits(tmp_path: Path) -> None:
    train, test, everything = make_writers(1), make_writers(2), make_writers(3)
    path = tmp_path / "emnist_all.sqlite"
    write_sqlite(path, {"digits_only_train": train, "digits_only_test": test, "all_train": everything})
    _assert_same(data.load_emnist(path), train, invert=True)
    _assert_same(data.load_emnist(path, split="test", invert=False), test, invert=False)
    _assert_same(data.load_emnist(path, only_digits=False), everything, invert=True)
    with pytest.raises(ValueError, match="no clients in split 'test'"):
        data.load_emnist(path, split="test", only_digits=False)


def test_emnist_download_streams_lzma_into_the_cache(tmp_path: Path) -> None:
    # The real download code, fed by a local file URL: no network.
    source = tmp_path / "source.sqlite"
    writers = make_writers(4)
    write_sqlite(source, {"digits_only_train": writers})
    archive = tmp_path / "emnist_all.sqlite.lzma"
    archive.write_bytes(lzma.compress(source.read_bytes()))
    cache = tmp_path / "cache"
    path = data.download_emnist(cache, origin=archive.as_uri())
    assert path == cache / "emnist_all.sqlite" and path.read_bytes() == source.read_bytes()
    assert data.download_emnist(cache, origin="file:///nonexistent/emnist_all.sqlite.lzma") == path  # cached
    _assert_same(data.load_emnist(path), writers, invert=True)
    truncated = tmp_path / "short" / "emnist_all.sqlite.lzma"
    truncated.parent.mkdir()
    truncated.write_bytes(archive.read_bytes()[:-20])
    with pytest.raises((OSError, lzma.LZMAError)):
        data.download_emnist(tmp_path / "cache2", origin=truncated.as_uri())
    assert not (tmp_path / "cache2" / "emnist_all.sqlite").exists()


def test_emnist_rejects_other_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("tensorflow", "tensorflow.core.example"):  # neither check needs TensorFlow
        monkeypatch.setitem(sys.modules, module, None)
    sqlite3.connect(tmp_path / "other.sqlite").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ValueError, match="no 'examples' table"):
        data.load_emnist(tmp_path / "other.sqlite")
    with pytest.raises(ValueError, match="split must be"):
        data.load_emnist(tmp_path / "other.sqlite", split="validation")


def test_partitioners() -> None:
    x = np.arange(100, dtype=np.float32).reshape(100, 1)
    y = np.repeat(np.arange(10), 10)
    by_label = data.partition_by_label(x, y, per_client=4)
    assert len(by_label) == 10
    assert all(set(by_label[c][1]) == {int(c)} and len(by_label[c][1]) == 4 for c in by_label.client_ids)
    iid = data.partition_iid(x, y, 7, seed=1)
    assert sorted(np.concatenate([c[0][:, 0] for c in iid.all()]).tolist()) == x[:, 0].tolist()
    skewed = data.partition_dirichlet(x, y, 5, alpha=0.1, seed=1)
    assert sorted(np.concatenate([c[0][:, 0] for c in skewed.all()]).tolist()) == x[:, 0].tolist()
    first = [len(c[0]) for c in iid.sample(3, np.random.default_rng(0))]
    assert first == [len(c[0]) for c in iid.sample(3, np.random.default_rng(0))]
    with pytest.raises(ValueError, match="cannot sample 8 of 7"):
        iid.sample(8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="alpha must be positive"):
        data.partition_dirichlet(x, y, 5, alpha=0.0)
    # One-hot labels partition by their class; client counts that would leave clients empty are refused.
    one_hot = np.eye(10, dtype=np.float32)[y]
    assert [len(c[0]) for c in data.partition_by_label(x, one_hot, per_client=4).all()] == [4] * 10
    assert sum(len(c[0]) for c in data.partition_dirichlet(x, one_hot, 5, alpha=0.1, seed=1).all()) == 100
    with pytest.raises(ValueError, match=r"num_clients must be from 1 to the number of examples \(100\), got 101"):
        data.partition_iid(x, y, 101)
    with pytest.raises(ValueError, match="got 0"):
        data.partition_dirichlet(x, y, 0, alpha=0.5)
    with pytest.raises(TypeError, match="num_clients must be an integer, got 2.5"):
        data.partition_iid(x, y, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="client 'a' has no examples"):
        data.ClientData({"a": (x[:0], y[:0])})


@pytest.mark.skipif(not MNIST.exists(), reason="the real MNIST test set is not next to the repository")
def test_mnist_idx_loader_reads_the_real_test_set() -> None:
    images, labels = data.load_mnist_idx(MNIST)
    assert images.shape == (10_000, 28, 28) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert np.bincount(labels).tolist()[5] == 892


def test_mnist_idx_loader_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") * 3 + b"\x00" * 7)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match="expected 8 values"):
        data.load_mnist_idx(tmp_path)
    with pytest.raises(FileNotFoundError, match="train-images-idx3"):
        data.load_mnist_idx(tmp_path, split="train")
