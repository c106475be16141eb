// Counter-based random numbers: splitmix64's output function (Steele et al. 2014, "Fast Splittable
// Pseudorandom Number Generators") applied to key + (index + 1) * golden.
//
// Element i of a stream depends only on (key, i), so results do not depend on threading or on the
// order in which elements are visited, and fastfed.kernels.random_numpy reproduces every value.
//
// A draw can serve several values: its 64 bits are the random signs of 64 coordinates, the 32-bit
// coins of two or the 16-bit coins of four (fastfed.kernels.random_numpy.sign_flips, random_halves
// and random_quarters).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu.hpp"

#if defined(FASTFED_X86_DISPATCH)
#include <immintrin.h>
#endif

namespace fastfed::random {

inline constexpr std::uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// splitmix64's output function: a bijective 64-bit mixer.
inline std::uint64_t mix64(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

inline std::uint64_t bits(std::uint64_t key, std::uint64_t index) { return mix64(key + (index + 1) * kGolden); }

// +1.0 if the top bit is set, else -1.0.
inline double sign(std::uint64_t key, std::size_t index) { return (bits(key, index) >> 63) ? 1.0 : -1.0; }

// The 32-bit coin of value `index`: the low half of draw index / 2 for even index, else the high half.
inline std::uint32_t coin(std::uint64_t key, std::uint64_t index) {
    return static_cast<std::uint32_t>(bits(key, index / 2) >> (32 * (index & 1)));
}

// The coin of value `index` as a fraction in [0, 1): coin * 2^-32, exact in a double.
inline double coin_fraction(std::uint64_t key, std::uint64_t index) { return static_cast<double>(coin(key, index)) * 0x1p-32; }

// The 16-bit coin of value `index`: four draws, read as eight 32-bit words (the low half of a draw
// first), hold the coins of sixteen values; value 8h + k of such a group takes the low (h = 0) or high
// (h = 1) 16 bits of word k, so that eight lanes of 32 bits give eight values' coins without a shuffle.
inline std::uint32_t quarter_coin(std::uint64_t key, std::uint64_t index) {
    const std::uint64_t word = 8 * (index / 16) + index % 8;
    return static_cast<std::uint32_t>(bits(key, word / 2) >> (32 * (word & 1) + 16 * ((index / 8) & 1))) & 0xFFFFu;
}

#if defined(FASTFED_X86_DISPATCH)
// The low 64 bits of a * b in four lanes; AVX2 multiplies 32 x 32 -> 64 bits only, so
// a * b = a_lo b_lo + ((a_hi b_lo + a_lo b_hi) << 32) mod 2^64, with b = (b_lo, b_hi) given split.
FASTFED_TARGET("avx2") inline __m256i multiply_avx2(__m256i a, __m256i b_lo, __m256i b_hi) {
    const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), b_lo), _mm256_mul_epu32(a, b_hi));
    return _mm256_add_epi64(_mm256_mul_epu32(a, b_lo), _mm256_slli_epi64(cross, 32));
}

FASTFED_TARGET("avx2") inline __m256i mix64_avx2(__m256i z) {
    const __m256i mix1_lo = _mm256_set1_epi64x(0x1CE4E5B9), mix1_hi = _mm256_set1_epi64x(0xBF58476D);
    const __m256i mix2_lo = _mm256_set1_epi64x(0x133111EB), mix2_hi = _mm256_set1_epi64x(0x94D049BB);
    z = multiply_avx2(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), mix1_lo, mix1_hi);
    z = multiply_avx2(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), mix2_lo, mix2_hi);
    return _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
}

// Draws index .. index + 3 of the stream `key`, four at a time: next() returns them and moves on by four.
class draws_avx2 {
 public:
    FASTFED_TARGET("avx2") draws_avx2(std::uint64_t key, std::uint64_t index) {
        const std::uint64_t first = key + (index + 1) * kGolden;
        counter_ = _mm256_setr_epi64x(static_cast<long long>(first), static_cast<long long>(first + kGolden),
                                      static_cast<long long>(first + 2 * kGolden), static_cast<long long>(first + 3 * kGolden));
        step_ = _mm256_set1_epi64x(static_cast<long long>(4 * kGolden));
    }
    FASTFED_TARGET("avx2") __m256i next() {
        const __m256i out = mix64_avx2(counter_);
        counter_ = _mm256_add_epi64(counter_, step_);
        return out;
    }

 private:
    __m256i counter_, step_;
};

// The 32-bit coins of eight values as doubles in [0, 1): four draws hold eight coins, in order.
FASTFED_TARGET("avx2") inline void coins_avx2(draws_avx2& draws, __m256d& low, __m256d& high) {
    // Unsigned to double exactly: convert u - 2^31 as a signed integer, then add 2^31 back.
    const __m256i shifted = _mm256_xor_si256(draws.next(), _mm256_set1_epi32(static_cast<int>(0x80000000u)));
    const __m256d unbias = _mm256_set1_pd(0x1p31), scale = _mm256_set1_pd(0x1p-32);
    low = _mm256_mul_pd(_mm256_add_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(shifted)), unbias), scale);
    high = _mm256_mul_pd(_mm256_add_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(shifted, 1)), unbias), scale);
}

FASTFED_AVX512_BEGIN
// AVX-512DQ multiplies 64-bit lanes: eight draws, the coins of sixteen values, per step.
class draws_avx512 {
 public:
    FASTFED_TARGET("avx512f,avx512dq") draws_avx512(std::uint64_t key, std::uint64_t index) {
        const std::uint64_t first = key + (index + 1) * kGolden;
        counter_ = _mm512_add_epi64(
            _mm512_set1_epi64(static_cast<long long>(first)),
            _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(static_cast<long long>(kGolden))));
        step_ = _mm512_set1_epi64(static_cast<long long>(8 * kGolden));
    }
    // The next eight draws.
    FASTFED_TARGET("avx512f,avx512dq") __m512i next() {
        __m512i z = counter_;
        counter_ = _mm512_add_epi64(counter_, step_);
        z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)),
                               _mm512_set1_epi64(static_cast<long long>(0xBF58476D1CE4E5B9ULL)));
        z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)),
                               _mm512_set1_epi64(static_cast<long long>(0x94D049BB133111EBULL)));
        return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
    }
    // The coins of the next sixteen values as doubles in [0, 1): values 0..7 in low, 8..15 in high.
    FASTFED_TARGET("avx512f,avx512dq") void coins(__m512d& low, __m512d& high) {
        // Read as sixteen 32-bit halves, low half first, the draws are the coins in value order.
        const __m512i z = next();
        const __m512d scale = _mm512_set1_pd(0x1p-32);
        low = _mm512_mul_pd(_mm512_cvtepu32_pd(_mm512_castsi512_si256(z)), scale);
        high = _mm512_mul_pd(_mm512_cvtepu32_pd(_mm512_extracti64x4_epi64(z, 1)), scale);
    }

 private:
    __m512i counter_, step_;
};
FASTFED_AVX512_END
#endif

}  // namespace fastfed::random
