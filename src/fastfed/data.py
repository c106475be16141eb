"""Federated datasets: a client container, loaders and partitioners.

Loaders: scikit-learn's bundled handwritten digits (offline, the default), and MNIST IDX files from
a directory. Partitioners: by label (client d holds digit d, as in TFF's tutorial), Dirichlet label
skew (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution"), and IID.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "ClientData",
    "load_digits",
    "load_mnist_idx",
    "partition_by_label",
    "partition_dirichlet",
    "partition_iid",
]

Arrays = tuple[np.ndarray, np.ndarray]


class ClientData:
    """Per-client ``(x, y)`` arrays with ids, and seeded sampling of clients for a round."""

    def __init__(self, clients: dict[str, Arrays]) -> None:
        if not clients:
            raise ValueError("ClientData needs at least one client")
        for client_id, (x, y) in clients.items():
            if len(x) != len(y):
                raise ValueError(f"client {client_id!r}: {len(x)} inputs but {len(y)} labels")
        self._clients = dict(clients)

    @property
    def client_ids(self) -> list[str]:
        return list(self._clients)

    def __len__(self) -> int:
        return len(self._clients)

    def __getitem__(self, client_id: str) -> Arrays:
        return self._clients[client_id]

    def sample(self, count: int, rng: np.random.Generator) -> list[Arrays]:
        """``count`` distinct clients chosen uniformly with ``rng``."""
        if not 1 <= count <= len(self._clients):
            raise ValueError(f"cannot sample {count} of {len(self._clients)} clients")
        ids = self.client_ids
        return [self._clients[ids[i]] for i in sorted(rng.choice(len(ids), size=count, replace=False))]

    def all(self) -> list[Arrays]:
        return list(self._clients.values())


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


def partition_by_label(x: np.ndarray, y: np.ndarray, per_client: int | None = None) -> ClientData:
    """Client ``d`` holds (the first ``per_client``) examples of label ``d``, as in TFF's MNIST tutorial."""
    clients = {}
    for label in np.unique(y):
        index = np.flatnonzero(y == label)[:per_client]
        clients[str(label)] = (x[index], y[index])
    return ClientData(clients)


def partition_iid(x: np.ndarray, y: np.ndarray, num_clients: int, seed: int = 0) -> ClientData:
    """Shuffles and deals the examples into ``num_clients`` near-equal shards."""
    order = np.random.default_rng(seed).permutation(len(x))
    return ClientData({str(k): (x[part], y[part]) for k, part in enumerate(np.array_split(order, num_clients))})


def partition_dirichlet(x: np.ndarray, y: np.ndarray, num_clients: int, alpha: float, seed: int = 0) -> ClientData:
    """Label skew: each label's examples are split over clients by proportions drawn from Dir(alpha)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(y):
        index = rng.permutation(np.flatnonzero(y == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(index)).astype(int)[:-1]
        for client, part in enumerate(np.split(index, cuts)):
            shards[client].extend(part.tolist())
    clients = {str(k): (x[np.array(s, int)], y[np.array(s, int)]) for k, s in enumerate(shards) if s}
    return ClientData(clients)


def stack_clients(clients: Sequence[Arrays]) -> Arrays:
    """All clients' examples as one dataset (for centralized evaluation)."""
    return np.concatenate([c[0] for c in clients]), np.concatenate([c[1] for c in clients])
