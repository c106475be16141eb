// Randomized Walsh-Hadamard rotation: y = H D x blockwise, with D seeded random signs and H the
// orthonormal Walsh-Hadamard transform of a power-of-two block (Suresh et al. 2017, "Distributed
// Mean Estimation with Limited Communication", Section 4). A rotation spreads a vector's energy
// evenly over its coordinates, which makes low-bit quantization far more accurate.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../common/parallel.hpp"
#include "../common/random.hpp"

namespace fastfed::rotate {

// In-place fast Walsh-Hadamard transform of a power-of-two block, scaled by 1/sqrt(length) so that
// it is orthonormal and its own inverse.
inline void hadamard_block(double* x, std::size_t length) {
    for (std::size_t half = 1; half < length; half *= 2) {
        for (std::size_t start = 0; start < length; start += 2 * half) {
            for (std::size_t j = start; j < start + half; ++j) {
                const double a = x[j], b = x[j + half];
                x[j] = a + b;
                x[j + half] = a - b;
            }
        }
    }
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

}  // namespace fastfed::rotate
