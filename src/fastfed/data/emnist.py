"""TFF's federated EMNIST (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings"): one
client per writer, from a local copy in either of TFF's layouts, or downloaded.

Layouts:
- SQLite (current TFF, ``emnist_all.sqlite``): table ``examples(split_name, client_id,
  serialized_example_proto)`` of ``tf.train.Example`` protos with float ``pixels`` (28x28) and int64
  ``label``; splits ``digits_only_train``, ``digits_only_test``, ``all_train``, ``all_test``.
- HDF5 (older TFF, ``fed_emnist[_digitsonly]_{train,test}.h5``): ``/examples/<client_id>/pixels``
  (float32, n x 28 x 28) and ``/examples/<client_id>/label``.

In both, 1.0 is the background and 0.0 the ink. ``invert=True`` (the default) returns ``1 - pixels``
so that EMNIST matches MNIST's convention and models trained on either transfer.
"""

from __future__ import annotations

import lzma
import shutil
import sqlite3
import urllib.request
from pathlib import Path

import numpy as np

from .clients import ClientData

__all__ = ["EMNIST_URL", "download_emnist", "load_emnist"]

EMNIST_URL = "https://storage.googleapis.com/tff-datasets-public/emnist_all.sqlite.lzma"
_SPLITS = {(True, "train"): "digits_only_train", (True, "test"): "digits_only_test",
           (False, "train"): "all_train", (False, "test"): "all_test"}  # fmt: skip


def download_emnist(cache_dir: str | Path | None = None, *, origin: str = EMNIST_URL) -> Path:
    """Downloads TFF's ``emnist_all.sqlite`` (LZMA-compressed, about 170 MB) once and returns its path.

    The file is decompressed while it streams into a temporary file that is renamed into place only
    when complete, so an interrupted download never leaves a truncated database behind.
    """
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".fastfed" / "datasets"
    cache.mkdir(parents=True, exist_ok=True)
    name = origin.rsplit("/", 1)[-1]
    if not name.endswith(".lzma"):
        raise ValueError(f"origin must name an .lzma file, got {origin!r}")
    target = cache / name[: -len(".lzma")]
    if target.exists():
        return target
    partial = target.with_suffix(target.suffix + ".part")
    decompressor = lzma.LZMADecompressor()
    with urllib.request.urlopen(origin) as response, open(partial, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(decompressor.decompress(chunk))
    if not decompressor.eof:
        partial.unlink()
        raise OSError(f"download of {origin} ended before the end of the LZMA stream")
    shutil.move(partial, target)
    return target


def _from_sqlite(path: Path, split_name: str) -> dict[str, list[tuple[np.ndarray, int]]]:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "examples" not in tables:
            raise ValueError(f"{path}: no 'examples' table; not a TFF SQLite client-data file")
        # Only a real TFF file needs TensorFlow, for its tf.train.Example protos.
        from tensorflow.core.example import example_pb2

        rows = connection.execute(
            "SELECT client_id, serialized_example_proto FROM examples WHERE split_name = ? ORDER BY rowid",
            (split_name,),
        )
        clients: dict[str, list[tuple[np.ndarray, int]]] = {}
        for client_id, serialized in rows:
            features = example_pb2.Example.FromString(serialized).features.feature
            pixels = np.asarray(features["pixels"].float_list.value, dtype=np.float32)
            if pixels.size != 784:
                raise ValueError(f"{path}: client {client_id!r} has an example with {pixels.size} pixels, expected 784")
            clients.setdefault(client_id, []).append(
                (pixels.reshape(28, 28), int(features["label"].int64_list.value[0]))
            )
    finally:
        connection.close()
    return clients


def _from_h5(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import h5py

    clients = {}
    with h5py.File(path, "r") as handle:
        if "examples" not in handle:
            raise ValueError(f"{path}: no '/examples' group; not a TFF federated EMNIST h5 file")
        for client_id, group in handle["examples"].items():
            pixels = np.asarray(group["pixels"], dtype=np.float32)
            labels = np.asarray(group["label"]).astype(np.int64).reshape(-1)
            if pixels.shape[1:] != (28, 28) or len(pixels) != len(labels):
                raise ValueError(f"{path}: client {client_id!r} has pixels {pixels.shape} and {len(labels)} labels")
            clients[client_id] = (pixels, labels)
    return clients


def load_emnist(path: str | Path, *, split: str = "train", only_digits: bool = True, invert: bool = True) -> ClientData:
    """Federated EMNIST from a local ``.sqlite`` file or ``.h5`` file (or a folder holding TFF's h5 files).

    Args:
      path: ``emnist_all.sqlite``, one ``fed_emnist*.h5`` file, or the folder TFF's h5 archive unpacks to.
      split: ``"train"`` or ``"test"``.
      only_digits: the 10-class digits subset (3,383 writers) instead of all 62 classes.
      invert: return ``1 - pixels`` (ink = 1.0, as in MNIST) instead of TFF's background = 1.0.

    Returns:
      :class:`ClientData` keyed by writer id, images float32 (n, 28, 28), labels int64.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    if path.is_dir():
        name = f"fed_emnist{'_digitsonly' if only_digits else ''}_{split}.h5"
        path = path / name
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; download_emnist() fetches the SQLite file")
    if path.suffix in (".h5", ".hdf5"):
        arrays = _from_h5(path)
    else:
        rows = _from_sqlite(path, _SPLITS[(only_digits, split)])
        arrays = {
            cid: (np.stack([p for p, _ in ex]), np.array([lab for _, lab in ex], np.int64)) for cid, ex in rows.items()
        }
    if not arrays:
        raise ValueError(f"{path}: no clients in split {split!r}")
    if invert:
        arrays = {cid: (1.0 - x, y) for cid, (x, y) in arrays.items()}
    return ClientData(dict(sorted(arrays.items())))
