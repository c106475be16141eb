"""Reading ``.npy`` bytes without pickle and without trusting their header's sizes."""

from __future__ import annotations

import io
import math

import numpy as np

__all__ = ["npy_view"]


def npy_view(data: bytes) -> np.ndarray:
    """A read-only, zero-copy view of one ``.npy``-serialized array (what Flower puts on the wire).

    ``np.load`` copies every tensor out of its bytes; aggregation only needs to read it once. The
    header is parsed by NumPy's own safe reader, and object dtypes (which would need pickle) are refused.
    """
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as error:
        raise ValueError(f"not a .npy array: {error}") from None
    if dtype.hasobject:
        raise ValueError("object arrays are refused: reading them would need pickle")
    count = math.prod(shape)
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f".npy data is {len(data) - offset} bytes, expected {count * dtype.itemsize} for {shape}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")
