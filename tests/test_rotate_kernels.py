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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block", [2, 8, 64, 8192, 65536])
def test_walsh_hadamard_matches_reference_and_is_its_own_inverse_up_to_scale(
    backend: str, dtype: type, block: int
) -> None:
    x = np.random.default_rng(block).standard_normal(3 * block).astype(dtype)
    want, got = x.copy(), x.copy()
    _require("numpy").rotate.walsh_hadamard(want, block)
    _require(backend).rotate.walsh_hadamard(got, block)
    np.testing.assert_array_equal(got, want)
    _require(backend).rotate.walsh_hadamard(got, block)
    np.testing.assert_allclose(got / block, x, atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize(("n", "block", "rounds"), [(1, 64, 1), (130, 64, 2), (5_000, 1024, 1), (70_000, 65536, 2)])
def test_rotate_blocks_matches_reference_and_inverts(backend: str, n: int, block: int, rounds: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    padded = -(-n // block) * block
    keys = [17, 2**64 - 5][:rounds]
    want, got = np.empty(padded, np.float32), np.empty(padded, np.float32)
    _require("numpy").rotate.rotate_blocks(x, block, keys, want)
    _require(backend).rotate.rotate_blocks(x, block, keys, got)
    np.testing.assert_array_equal(got, want)
    # Two rounds are orthonormal; one round is orthonormal times 2^(k/2 - ceil(k/2)).
    k = block.bit_length() - 1
    gain = 1.0 if rounds == 2 else 2.0 ** (k / 2 - (k + 1) // 2)
    np.testing.assert_allclose(np.linalg.norm(got), gain * np.linalg.norm(x.astype(np.float64)), rtol=1e-5)
    restored, reference = np.empty(n, np.float32), np.empty(n, np.float32)
    _require(backend).rotate.unrotate_blocks(got.copy(), block, keys, restored)
    _require("numpy").rotate.unrotate_blocks(got.copy(), block, keys, reference)
    np.testing.assert_array_equal(restored, reference)
    np.testing.assert_allclose(restored, x, atol=2e-6 * max(1.0, float(np.abs(x).max())))


def test_rotate_blocks_rejects_bad_arguments(backend: str) -> None:
    kernel = _require(backend).rotate
    x = np.ones(100, np.float32)
    with pytest.raises(ValueError, match="power of two >= 64"):
        kernel.rotate_blocks(x, 32, [1], np.empty(128, np.float32))
    with pytest.raises(ValueError, match="one or two rotation keys"):
        kernel.rotate_blocks(x, 128, [1, 2, 3], np.empty(128, np.float32))
    with pytest.raises(ValueError, match="float32"):
        kernel.rotate_blocks(x.astype(np.float64), 128, [1], np.empty(128, np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        kernel.unrotate_blocks(np.empty(256, np.float32), 128, [1], np.empty(100, np.float32))
