"""The three implementations of cpp/rotate agree bit for bit (native, Numba, NumPy reference)."""

from __future__ import annotations

import numpy as np
import pytest

from fastfed._backend import _require


@pytest.mark.parametrize("n", [5, 1000, 70_000])
@pytest.mark.parametrize("block", [1, 8, 1024])
def test_rotation_matches_reference_and_inverts(backend: str, n: int, block: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    padded = -(-n // block) * block
    want, got = np.empty(padded), np.empty(padded)
    _require("numpy").rotate.rotate(x, block, 5, want)
    kernel = _require(backend).rotate
    kernel.rotate(x, block, 5, got)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(x.astype(np.float64)), rtol=1e-12)
    restored = np.empty(n, np.float32)
    kernel.unrotate(got.copy(), block, 5, restored)
    np.testing.assert_allclose(restored, x, atol=1e-6)


def test_kernel_boundary_rejects_bad_arguments(backend: str) -> None:
    with pytest.raises(ValueError, match="power of two"):
        _require(backend).rotate.rotate(np.ones(10, np.float32), 3, 0, np.empty(12))
