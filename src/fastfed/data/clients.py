"""Federated data in memory: per-client arrays and partitioners.

Partitioners: by label (client d holds digit d, as in TFF's tutorial), Dirichlet label skew (Hsu et
al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification"), and IID.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ClientData", "partition_by_label", "partition_dirichlet", "partition_iid", "stack_clients"]

Arrays = tuple[np.ndarray, np.ndarray]


class ClientData:
    """Per-client ``(x, y)`` arrays with ids, and seeded sampling of clients for a round."""

    def __init__(self, clients: dict[str, Arrays]) -> None:
        if not clients:
            raise ValueError("ClientData needs at least one client")
        for client_id, (x, y) in clients.items():
            if len(x) != len(y):
                raise ValueError(f"client {client_id!r}: {len(x)} inputs but {len(y)} labels")
            if len(x) == 0:
                raise ValueError(f"client {client_id!r} has no examples")
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
        return [self._clients[client_id] for client_id in self.sample_ids(count, rng)]

    def sample_ids(self, count: int, rng: np.random.Generator) -> list[str]:
        """The ids of ``count`` distinct clients chosen uniformly with ``rng`` (those :meth:`sample` gives)."""
        if not 1 <= count <= len(self._clients):
            raise ValueError(f"cannot sample {count} of {len(self._clients)} clients")
        ids = self.client_ids
        return [ids[i] for i in sorted(rng.choice(len(ids), size=count, replace=False))]

    def subset(self, client_ids: Sequence[str]) -> ClientData:
        """The clients of these ids, in this order."""
        return ClientData({client_id: self._clients[client_id] for client_id in client_ids})

    def all(self) -> list[Arrays]:
        return list(self._clients.values())


def _class_indices(y: np.ndarray) -> np.ndarray:
    """Each example's class: the labels themselves, or the largest entry of one-hot (or soft) labels."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        return y.reshape(-1)
    if y.ndim == 2:
        classes: np.ndarray = np.argmax(y, axis=1)
        return classes
    if y.ndim != 1:
        raise ValueError(f"y: expected one class label (or class vector) per example, got shape {y.shape}")
    return y


def _client_count(num_clients: object, examples: int) -> int:
    if not isinstance(num_clients, (int, np.integer)) or isinstance(num_clients, bool):
        raise TypeError(f"num_clients must be an integer, got {num_clients!r}")
    if not 1 <= num_clients <= examples:
        raise ValueError(f"num_clients must be from 1 to the number of examples ({examples}), got {num_clients}")
    return int(num_clients)


def partition_by_label(x: np.ndarray, y: np.ndarray, per_client: int | None = None) -> ClientData:
    """Client ``d`` holds (the first ``per_client``) examples of label ``d``, as in TFF's MNIST tutorial."""
    classes = _class_indices(y)
    clients = {}
    for label in np.unique(classes):
        index = np.flatnonzero(classes == label)[:per_client]
        clients[str(label)] = (x[index], y[index])
    return ClientData(clients)


def partition_iid(x: np.ndarray, y: np.ndarray, num_clients: int, seed: int = 0) -> ClientData:
    """Shuffles and deals the examples into ``num_clients`` near-equal shards."""
    num_clients = _client_count(num_clients, len(x))
    order = np.random.default_rng(seed).permutation(len(x))
    return ClientData({str(k): (x[part], y[part]) for k, part in enumerate(np.array_split(order, num_clients))})


def partition_dirichlet(x: np.ndarray, y: np.ndarray, num_clients: int, alpha: float, seed: int = 0) -> ClientData:
    """Label skew: each label's examples are split over clients by proportions drawn from Dir(alpha)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    num_clients = _client_count(num_clients, len(x))
    classes = _class_indices(y)
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(classes):
        index = rng.permutation(np.flatnonzero(classes == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(index)).astype(int)[:-1]
        for client, part in enumerate(np.split(index, cuts)):
            shards[client].extend(part.tolist())
    clients = {str(k): (x[np.array(s, int)], y[np.array(s, int)]) for k, s in enumerate(shards) if s}
    return ClientData(clients)


def stack_clients(clients: Sequence[Arrays]) -> Arrays:
    """All clients' examples as one dataset (for centralized evaluation)."""
    return np.concatenate([c[0] for c in clients]), np.concatenate([c[1] for c in clients])
