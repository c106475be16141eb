// Randomized Walsh-Hadamard rotations: y = H D x blockwise, with D seeded random signs and H the
// Walsh-Hadamard transform of a power-of-two block (Suresh et al. 2017, "Distributed Mean Estimation
// with Limited Communication", Section 4; Ailon & Chazelle 2009). A rotation spreads a vector's
// energy evenly over its coordinates, which makes low-bit quantization far more accurate.
//
// rotate/unrotate: one orthonormal round in float64, a signs draw per value (UniformQuantizer).
// rotate_blocks/unrotate_blocks: one or two rounds in float32, 64 signs per draw, each round scaled
// by a power of two (RotatedQuantizer); see fastfed.kernels.rotate_numpy for the exact definitions.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../common/parallel.hpp"
#include "../common/random.hpp"
#include "hadamard.hpp"

namespace fastfed::rotate {

// In-place fast Walsh-Hadamard transform of a power-of-two block, scaled by 1/sqrt(length) so that
// it is orthonormal and its own inverse.
inline void hadamard_block(double* x, std::size_t length) {
    hadamard(x, length);
    const double scale = 1.0 / std::sqrt(static_cast<double>(length));
    for (std::size_t i = 0; i < length; ++i) x[i] *= scale;
}

// out (padded length, a multiple of chunk) = H D pad(x), blockwise.
template <class Source>
void rotate(const Source* x, std::size_t n, std::size_t chunk, std::uint64_t key, double* out, std::size_t padded) {
    parallel_for(padded / chunk, 1, chunk * 8, [&](std::size_t first, std::size_t last) {
        for (std::size_t block = first; block < last; ++block) {
            double* y = out + block * chunk;
            for (std::size_t j = 0; j < chunk; ++j) {
                const std::size_t i = block * chunk + j;
                y[j] = i < n ? static_cast<double>(x[i]) * random::sign(key, i) : 0.0;
            }
            hadamard_block(y, chunk);
        }
    });
}

// out[:n] = D H y, the inverse of rotate; y is used as scratch and overwritten.
template <class Output>
void unrotate(double* y, std::size_t padded, std::size_t chunk, std::uint64_t key, Output* out, std::size_t n) {
    parallel_for(padded / chunk, 1, chunk * 8, [&](std::size_t first, std::size_t last) {
        for (std::size_t block = first; block < last; ++block) {
            double* z = y + block * chunk;
            hadamard_block(z, chunk);
            for (std::size_t j = 0; j < chunk; ++j) {
                const std::size_t i = block * chunk + j;
                if (i < n) out[i] = static_cast<Output>(z[j] * random::sign(key, i));
            }
        }
    });
}

// The power-of-two scale exponent of forward round r (0 or 1) of a block of 2^k values: ceil(k/2),
// then floor(k/2); the inverse of a round that scaled by 2^-e scales by 2^-(k - e).
inline int round_exponent(std::size_t block, std::size_t round) {
    int k = 0;
    while ((std::size_t{1} << k) < block) ++k;
    return round == 0 ? (k + 1) / 2 : k / 2;
}

inline float power_of_two(int exponent) { return std::ldexp(1.0f, exponent); }

// One block of rotate_blocks: y[0, block) = the rounds applied to source[0, valid) padded with zeros.
inline void rotate_block(const float* source, std::size_t valid, float* y, std::size_t block, const std::uint64_t* keys, std::size_t rounds,
                         std::size_t first_index) {
    signed_hadamard(source, valid, y, block, keys[0], first_index, power_of_two(-round_exponent(block, 0)));
    if (rounds == 2) signed_hadamard(y, block, y, block, keys[1], first_index, power_of_two(-round_exponent(block, 1)));
}

// One block of unrotate_blocks, in place: z = the inverse rounds of z.
inline void unrotate_block(float* z, std::size_t block, const std::uint64_t* keys, std::size_t rounds, std::size_t first_index) {
    int k = 0;
    while ((std::size_t{1} << k) < block) ++k;
    hadamard(z, block);
    if (rounds == 2) signed_hadamard(z, block, z, block, keys[1], first_index, power_of_two(round_exponent(block, 1) - k));
    apply_signs(z, block, keys[0], first_index, power_of_two(round_exponent(block, 0) - k));
}

// out (padded floats) = rotate_blocks(x[0, n)).
inline void rotate_blocks(const float* x, std::size_t n, std::size_t block, const std::uint64_t* keys, std::size_t rounds, float* out,
                          std::size_t padded) {
    parallel_for(padded / block, 1, block * 8 * rounds, [&](std::size_t first, std::size_t last) {
        for (std::size_t b = first; b < last; ++b) {
            const std::size_t begin = b * block;
            const std::size_t valid = begin < n ? std::min(block, n - begin) : 0;
            run_vectorized([&] { rotate_block(valid ? x + begin : x, valid, out + begin, block, keys, rounds, begin); });
        }
    });
}

// out[0, n) = the inverse of rotate_blocks for y (padded floats, used as scratch and overwritten).
inline void unrotate_blocks(float* y, std::size_t padded, std::size_t block, const std::uint64_t* keys, std::size_t rounds, float* out,
                            std::size_t n) {
    parallel_for(padded / block, 1, block * 8 * rounds, [&](std::size_t first, std::size_t last) {
        for (std::size_t b = first; b < last; ++b) {
            const std::size_t begin = b * block;
            float* z = y + begin;
            run_vectorized([&] { unrotate_block(z, block, keys, rounds, begin); });
            if (begin < n) std::copy(z, z + std::min(block, n - begin), out + begin);
        }
    });
}

}  // namespace fastfed::rotate
