"""Kernel backend selection: native C++ -> Numba -> NumPy reference.

The default is the fastest backend that imports. ``FASTFED_BACKEND=native|numba|numpy`` forces one
at import time; forcing one that is missing is an error. :func:`set_backend` changes the process-wide
choice, and :func:`use_backend` overrides it for the current thread inside a ``with`` block.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from .kernels.protocols import AggregateKernels, QuantizeKernels, RotateKernels

__all__ = ["available_backends", "backend", "kernels", "set_backend", "use_backend"]

BACKENDS = ("native", "numba", "numpy")

_INSTALL_HINTS = {
    "native": "the compiled extension fastfed._core did not import; reinstall fastfed from source "
    "(`pip install .` builds it with scikit-build-core, pybind11 and a C++17 compiler)",
    "numba": "numba is not installed; `pip install fastfed[numba]` installs it",
    "numpy": "",
}


class Kernels(NamedTuple):
    """The kernel modules of one backend; each exposes the same functions with the same signatures."""

    name: str
    aggregate: AggregateKernels
    quantize: QuantizeKernels
    rotate: RotateKernels


def _load(name: str) -> Kernels:
    if name == "native":
        from . import _core

        return Kernels("native", _core.aggregate, _core.quantize, _core.rotate)
    if name == "numba":
        # Imported here: numba is an optional extra, and compiling its kernels takes a moment.
        from .kernels import aggregate_numba, quantize_numba, rotate_numba

        return Kernels("numba", aggregate_numba, quantize_numba, rotate_numba)
    from .kernels import aggregate_numpy, quantize_numpy, rotate_numpy

    return Kernels("numpy", aggregate_numpy, quantize_numpy, rotate_numpy)


_loaded: dict[str, Kernels] = {}
_import_errors: dict[str, str] = {}


def _try_load(name: str) -> Kernels | None:
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    try:
        _loaded[name] = _load(name)
    except ImportError as error:
        _import_errors[name] = f"{_INSTALL_HINTS[name]} ({error})"
        return None
    return _loaded[name]


def _require(name: str) -> Kernels:
    if name not in BACKENDS:
        raise ValueError(f"Unsupported backend {name!r}; expected one of {', '.join(BACKENDS)}")
    kernels_ = _try_load(name)
    if kernels_ is None:
        raise RuntimeError(f"fastfed backend {name!r} is not available: {_import_errors[name]}")
    return kernels_


def available_backends() -> list[str]:
    """The backends that import in this environment, fastest first."""
    return [name for name in BACKENDS if _try_load(name) is not None]


def _initial_backend() -> Kernels:
    forced = os.environ.get("FASTFED_BACKEND", "").strip().lower()
    if forced:
        return _require(forced)
    for name in BACKENDS:
        kernels_ = _try_load(name)
        if kernels_ is not None:
            return kernels_
    raise AssertionError("the NumPy backend always imports")  # pragma: no cover


_global: Kernels | None = None
_local = threading.local()


def kernels() -> Kernels:
    """The kernels of the backend in effect for this thread."""
    global _global
    override: Kernels | None = getattr(_local, "override", None)
    if override is not None:
        return override
    if _global is None:
        _global = _initial_backend()
    return _global


def backend() -> str:
    """The name of the backend in effect for this thread: ``"native"``, ``"numba"`` or ``"numpy"``."""
    return kernels().name


def set_backend(name: str) -> None:
    """Selects the backend for the whole process; raises if it is unknown or not installed."""
    global _global
    _global = _require(name)


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Uses backend ``name`` in this thread for the duration of the ``with`` block."""
    selected = _require(name)
    previous: Kernels | None = getattr(_local, "override", None)
    _local.override = selected
    try:
        yield
    finally:
        _local.override = previous
