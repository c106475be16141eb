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


class QuantizeKernels(Protocol):
    """``cpp/quantize``: range, uniform quantization and bit-packing."""

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


class RotateKernels(Protocol):
    """``cpp/rotate``: the randomized Walsh-Hadamard rotation and its inverse."""

    def rotate(self, x: np.ndarray, chunk: int, key: int, out: npt.NDArray[np.float64]) -> None: ...

    def unrotate(self, y: npt.NDArray[np.float64], chunk: int, key: int, out: np.ndarray) -> None: ...
