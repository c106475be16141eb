"""Many NumPy arrays handed to Numba kernels as raw addresses, for the kernels that read K clients.

Numba's ways of passing a variable number of arrays cost per array and per use: building a typed
list takes tens of microseconds per array, and every item taken out of it (or sliced) updates the
array's shared reference count atomically, which at many threads costs more than the arithmetic.
The kernels therefore take the arrays' data addresses and read them through views that own no
reference. The caller keeps the arrays alive for the duration of the call.

Reading an address from Python costs microseconds per array too (``array.ctypes.data``), so the
addresses are read in compiled code from the array objects themselves: NumPy's ``PyArrayObject``
keeps its data pointer right after the object header. That offset is found on probe arrays when
this module loads and checked on several kinds of arrays; if the check fails, the slow,
documented ``__array_interface__`` is used instead.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

__all__ = ["client_view", "data_addresses"]


@intrinsic
def _pointer(typingctx, address, dtype):  # type: ignore[no-untyped-def]
    """The integer ``address`` as a pointer to ``dtype`` values."""
    pointer_type = types.CPointer(dtype.dtype)

    def codegen(context, builder, signature, arguments):  # type: ignore[no-untyped-def]
        return builder.inttoptr(arguments[0], context.get_value_type(pointer_type))

    return pointer_type(address, dtype), codegen


@numba.njit(inline="always")
def client_view(addresses, k, example, begin, end):  # type: ignore[no-untyped-def]
    """Elements [begin, end) of the k-th array, whose dtype is ``example``'s, as a view without a reference."""
    start = addresses[k] + begin * example.itemsize
    return numba.carray(_pointer(start, example.dtype), (end - begin,))


@numba.njit(cache=True)
def _read_words(object_addresses, offset, out):  # type: ignore[no-untyped-def]
    word = np.empty(0, np.uintp)
    for k in range(object_addresses.shape[0]):
        out[k] = client_view(object_addresses, k, word, offset // word.itemsize, offset // word.itemsize + 1)[0]


def _data_pointer_offset() -> int | None:
    """The byte offset of the data pointer inside a NumPy array object, or None if not found."""
    probes: list[np.ndarray] = [np.empty(3), np.arange(9, dtype=np.int8)[3:], np.zeros((4, 5)).T, np.empty(0)]
    header = (ctypes.c_size_t * 8).from_address(id(probes[0]))
    data = probes[0].__array_interface__["data"][0]
    offsets = [8 * i for i, word in enumerate(header) if word == data]
    if len(offsets) != 1:
        return None
    found = np.empty(len(probes), np.uintp)
    _read_words(np.fromiter(map(id, probes), np.uintp, len(probes)), offsets[0], found)
    expected = [probe.__array_interface__["data"][0] for probe in probes]
    return offsets[0] if found.tolist() == expected else None


_OFFSET = _data_pointer_offset()


def data_addresses(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The arrays' data addresses as uintp, read in one compiled pass over the array objects."""
    if _OFFSET is None:  # pragma: no cover - an interpreter whose array objects are laid out otherwise
        return np.array([array.__array_interface__["data"][0] for array in arrays], dtype=np.uintp)
    addresses = np.empty(len(arrays), np.uintp)
    _read_words(np.fromiter(map(id, arrays), np.uintp, len(arrays)), _OFFSET, addresses)
    return addresses
