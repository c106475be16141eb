"""The kernel signatures every backend implements, as Protocols that mypy checks each twin against.

``fastfed._core`` (its stub ``_core.pyi``), the Numba modules and the NumPy modules must all satisfy
these, so a signature changed in one place and not the others fails type checking.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["AggregateKernels", "QuantizeKernels", "RotateKernels"]


class AggregateKernels(Protocol):
    """``cpp/aggregate``: weighted sums of float buffers and of packed quantized levels; coordinate-wise
    median and trimmed mean."""

    def weighted_sum_layer(
        self, sources: list[np.ndarray], weights: npt.NDArray[np.float64], divisor: float, out: np.ndarray
    ) -> None: ...

    def accumulate(self, acc: npt.NDArray[np.float64], source: np.ndarray, weight: float) -> None: ...

    def weighted_sum_quantized(
        self,
        packed: list[npt.NDArray[np.uint8]],
        bits: int,
        scales: npt.NDArray[np.float32],
        offset: float,
        divisor: float,
        out: np.ndarray,
        checksums: npt.NDArray[np.uint32],
    ) -> None: ...

    def median(self, sources: list[np.ndarray], out: np.ndarray, non_finite: npt.NDArray[np.uint8]) -> None: ...

    def trimmed_mean(
        self, sources: list[np.ndarray], cut: int, out: np.ndarray, non_finite: npt.NDArray[np.uint8]
    ) -> None: ...

    def weighted_sum_levels(
        self,
        packed: list[npt.NDArray[np.uint8]],
        bits: int,
        scales: npt.NDArray[np.float32],
        block: int,
        table: npt.NDArray[np.float32] | None,
        rows: npt.NDArray[np.uint32],
        offsets: npt.NDArray[np.float64] | None,
        divisor: float,
        out: np.ndarray,
        checksums: npt.NDArray[np.uint32],
        corrections: list[npt.NDArray[np.uint8]] | None = None,
        shares: npt.NDArray[np.float32] | None = None,
        limit: float = ...,
    ) -> int: ...


class QuantizeKernels(Protocol):
    """``cpp/quantize``: range, uniform and rotated quantization, bit-packing."""

    def min_max(self, x: np.ndarray) -> tuple[float, float]: ...

    def quantize_pack(
        self,
        x: np.ndarray,
        bits: int,
        stochastic: bool,
        key: int,
        offset: float,
        scale: float,
        out: npt.NDArray[np.uint8],
    ) -> None: ...

    def unpack_dequantize(
        self, packed: npt.NDArray[np.uint8], bits: int, offset: float, step: float, out: np.ndarray
    ) -> None: ...

    def unpack_dequantize_accumulate(
        self,
        packed: npt.NDArray[np.uint8],
        bits: int,
        offset: float,
        step: float,
        weight: float,
        acc: npt.NDArray[np.float64],
    ) -> None: ...

    def encode_rotated(
        self,
        x: npt.NDArray[np.float32],
        bits: int,
        block: int,
        keys: list[int],
        boundaries: npt.NDArray[np.float32],
        magnitudes: npt.NDArray[np.float32],
        scales: npt.NDArray[np.float32],
        packed: npt.NDArray[np.uint8],
    ) -> None: ...

    def decode_rotated(
        self,
        packed: npt.NDArray[np.uint8],
        bits: int,
        block: int,
        keys: list[int],
        magnitudes: npt.NDArray[np.float32],
        scales: npt.NDArray[np.float32],
        out: npt.NDArray[np.float32],
    ) -> None: ...

    def accumulate_rotated(
        self,
        packed: npt.NDArray[np.uint8],
        bits: int,
        block: int,
        keys: list[int],
        magnitudes: npt.NDArray[np.float32],
        scales: npt.NDArray[np.float32],
        weight: float,
        acc: npt.NDArray[np.float64],
    ) -> None: ...

    def encode_shared_table(
        self,
        x: npt.NDArray[np.float32],
        bits: int,
        block: int,
        keys: list[int],
        row_offset: int,
        row_stride: int,
        table: npt.NDArray[np.float32],
        breakpoints: npt.NDArray[np.float32],
        ranks: npt.NDArray[np.int32],
        sigmas: npt.NDArray[np.float32],
        packed: npt.NDArray[np.uint8],
        outlier_index: npt.NDArray[np.uint32],
        outlier_value: npt.NDArray[np.float32],
    ) -> int: ...

    def encode_shared_dither(
        self,
        x: npt.NDArray[np.float32],
        bits: int,
        block: int,
        keys: list[int],
        row_offset: int,
        row_stride: int,
        table: npt.NDArray[np.float32],
        support: float,
        sigmas: npt.NDArray[np.float32],
        packed: npt.NDArray[np.uint8],
        outlier_index: npt.NDArray[np.uint32],
        outlier_value: npt.NDArray[np.float32],
    ) -> int: ...

    def dequantize_shared(
        self,
        packed: npt.NDArray[np.uint8],
        bits: int,
        block: int,
        row_offset: int,
        row_stride: int,
        table: npt.NDArray[np.float32],
        scales: npt.NDArray[np.float32],
        out: npt.NDArray[np.float32],
    ) -> None: ...


class RotateKernels(Protocol):
    """``cpp/rotate``: the fast Walsh-Hadamard transform and the randomized rotations built on it."""

    def rotate(self, x: np.ndarray, chunk: int, key: int, out: npt.NDArray[np.float64]) -> None: ...

    def unrotate(self, y: npt.NDArray[np.float64], chunk: int, key: int, out: np.ndarray) -> None: ...

    def walsh_hadamard(self, x: np.ndarray, block: int) -> None: ...

    def rotate_blocks(
        self, x: npt.NDArray[np.float32], block: int, keys: list[int], out: npt.NDArray[np.float32]
    ) -> None: ...

    def unrotate_blocks(
        self, y: npt.NDArray[np.float32], block: int, keys: list[int], out: npt.NDArray[np.float32]
    ) -> None: ...
