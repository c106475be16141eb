"""Small federated EMNIST files in both of TFF's layouts, written by the tests (no download)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest


def make_writers(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three writers in TFF's convention: background 1.0, ink 0.0."""
    rng = np.random.default_rng(seed)
    return {
        f"f{k:04d}_{k}": (1.0 - rng.uniform(0, 1, (n, 28, 28)).astype(np.float32), rng.integers(0, 10, n))
        for k, n in enumerate([3, 1, 5])
    }


def write_h5(path: Path, writers: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as handle:
        for client_id, (pixels, labels) in writers.items():
            handle.create_dataset(f"examples/{client_id}/pixels", data=pixels)
            handle.create_dataset(f"examples/{client_id}/label", data=labels.astype(np.int32))


def write_sqlite(path: Path, splits: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> None:
    tf = pytest.importorskip("tensorflow")
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE examples (split_name TEXT, client_id TEXT, serialized_example_proto BLOB)")
    connection.execute("CREATE TABLE client_metadata (client_id TEXT, split_name TEXT, num_examples INTEGER)")
    for split_name, writers in splits.items():
        for client_id, (pixels, labels) in writers.items():
            connection.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (client_id, split_name, len(labels)))
            for image, label in zip(pixels, labels):
                example = tf.train.Example(
                    features=tf.train.Features(
                        feature={
                            "pixels": tf.train.Feature(float_list=tf.train.FloatList(value=image.reshape(-1))),
                            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
                        }
                    )
                )
                connection.execute(
                    "INSERT INTO examples VALUES (?, ?, ?)", (split_name, client_id, example.SerializeToString())
                )
    connection.commit()
    connection.close()
