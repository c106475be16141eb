// Counter-based random numbers: splitmix64's output function (Steele et al. 2014, "Fast Splittable
// Pseudorandom Number Generators") applied to key + (index + 1) * golden.
//
// Element i of a stream depends only on (key, i), so results do not depend on threading or on the
// order in which elements are visited, and fastfed.kernels.random_numpy reproduces every value.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastfed::random {

inline constexpr std::uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// splitmix64's output function: a bijective 64-bit mixer.
inline std::uint64_t mix64(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

inline std::uint64_t bits(std::uint64_t key, std::uint64_t index) { return mix64(key + (index + 1) * kGolden); }

// A uniform double in [0, 1) from the top 53 bits.
inline double uniform(std::uint64_t key, std::uint64_t index) { return static_cast<double>(bits(key, index) >> 11) * 0x1.0p-53; }

// +1.0 if the top bit is set, else -1.0.
inline double sign(std::uint64_t key, std::size_t index) { return (bits(key, index) >> 63) ? 1.0 : -1.0; }

}  // namespace fastfed::random
