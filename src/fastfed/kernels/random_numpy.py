"""NumPy reference for ``cpp/common/random.hpp``: counter-based random numbers.

Element ``i`` of the stream ``key`` is splitmix64's output function (Steele et al. 2014, "Fast
Splittable Pseudorandom Number Generators") applied to ``key + (i + 1) * golden``, so every backend
reproduces every value and none depends on threading.

Where a coordinate needs fewer than 64 random bits, one draw serves several coordinates: a draw gives
the random signs of 64 coordinates (:func:`sign_flips`), the 32-bit coins of two
(:func:`random_halves`) or the 16-bit coins of four (:func:`random_quarters`), which cuts the cost of
the randomness by that factor.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "GOLDEN",
    "MIX1",
    "MIX2",
    "random_bits",
    "random_coins",
    "random_halves",
    "random_quarters",
    "random_signs",
    "sign_flips",
]

# splitmix64's increment and multipliers (Steele et al. 2014); every backend and the seed
# derivation in fastfed.compression use these.
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return np.asarray(z ^ (z >> np.uint64(31)))


def random_bits(key: int, start: int, count: int) -> np.ndarray:
    """splitmix64 outputs for indices ``start .. start+count-1`` of the stream ``key``."""
    index = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    return _mix64(np.uint64(key) + index * GOLDEN)


def random_signs(key: int, count: int) -> np.ndarray:
    return np.where(random_bits(key, 0, count) >> np.uint64(63) == 1, 1.0, -1.0)


def sign_flips(key: int, count: int) -> np.ndarray:
    """Whether coordinate ``i`` changes sign: bit ``i % 64`` of draw ``i // 64`` (bool array)."""
    words = random_bits(key, 0, -(-count // 64)).astype("<u8")
    return np.unpackbits(words.view(np.uint8), count=count, bitorder="little").astype(bool)


def random_halves(key: int, count: int) -> np.ndarray:
    """32-bit coins: coordinate ``i`` takes the low (even ``i``) or high (odd ``i``) half of draw ``i // 2``."""
    words = random_bits(key, 0, -(-count // 2)).astype("<u8")
    return words.view("<u4")[:count].astype(np.uint32)


def random_coins(key: int, count: int) -> np.ndarray:
    """The coins of :func:`random_halves` as float64 fractions in [0, 1): ``half * 2^-32``."""
    return random_halves(key, count).astype(np.float64) * 2.0**-32


def random_quarters(key: int, count: int) -> np.ndarray:
    """16-bit coins (uint32): four draws, read as eight 32-bit words (a draw's low half first), hold the
    coins of sixteen coordinates; coordinate ``8h + k`` of such a group takes the low (``h = 0``) or
    high (``h = 1``) 16 bits of word ``k``, which lets eight 32-bit SIMD lanes serve eight coordinates."""
    groups = -(-count // 16)
    words = random_bits(key, 0, 4 * groups).astype("<u8").view("<u4").reshape(groups, 8)
    return np.stack([words & 0xFFFF, words >> 16], axis=1).reshape(-1)[:count].astype(np.uint32)
