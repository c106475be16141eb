"""Federated datasets: the client container, partitioners, and loaders (bundled digits, MNIST IDX,
TFF's federated EMNIST)."""

from __future__ import annotations

from .clients import ClientData, partition_by_label, partition_dirichlet, partition_iid, stack_clients
from .emnist import download_emnist, load_emnist
from .loaders import load_digits, load_mnist_idx

__all__ = [
    "ClientData",
    "download_emnist",
    "load_digits",
    "load_emnist",
    "load_mnist_idx",
    "partition_by_label",
    "partition_dirichlet",
    "partition_iid",
    "stack_clients",
]
