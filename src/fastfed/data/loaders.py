"""Offline loaders: scikit-learn's bundled handwritten digits, and MNIST from its IDX files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

__all__ = ["load_digits", "load_mnist_idx"]

Arrays = tuple[np.ndarray, np.ndarray]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[Arrays, Arrays]:
    """scikit-learn's 1,797 8x8 handwritten digits (shipped with it, no network), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    split = int(len(x) * (1 - test_fraction))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    rank = data[3]
    shape = struct.unpack_from(f">{rank}I", data, 4)
    offset = 4 + 4 * rank
    count = int(np.prod(shape))
    if len(data) != offset + count:
        raise ValueError(f"{path}: expected {count} values for shape {shape}, found {len(data) - offset}")
    return np.frombuffer(data, np.uint8, count, offset).reshape(shape)


def load_mnist_idx(directory: str | Path, split: str = "t10k") -> Arrays:
    """MNIST from the official IDX files (``{split}-images-idx3-ubyte[.gz]`` and labels) in ``directory``.

    Returns images as float32 in [0, 1] with shape (n, 28, 28) and int64 labels.
    """
    directory = Path(directory)

    def find(kind: str) -> Path:
        for name in (f"{split}-{kind}-ubyte.gz", f"{split}-{kind}-ubyte"):
            if (directory / name).exists():
                return directory / name
        raise FileNotFoundError(f"no {split}-{kind}-ubyte[.gz] in {directory}")

    images = _read_idx(find("images-idx3"))
    labels = _read_idx(find("labels-idx1"))
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels in {directory}")
    return (images.astype(np.float32) / 255.0), labels.astype(np.int64)
