// The unnormalized fast Walsh-Hadamard transform of a power-of-two block, in float32 or float64.
//
// Stage h (h = 1, 2, 4, ...) replaces every pair (x[j], x[j + h]) inside groups of 2h values by
// (a + b, a - b). Any schedule that respects the stages' dependencies computes the same additions of
// the same operands, so the result is bit-identical to the plain stage-by-stage loop of
// fastfed.kernels.rotate_numpy whatever the blocking. Here: the stages within one SIMD vector are
// done in registers, then stages are taken two at a time (radix 4: one load and one store per value
// for two stages) over chunks that stay in L1, and the remaining stages over the whole block, which
// stays in L2 (Ailon & Chazelle 2009 use this transform for fast random rotations).
//
// signed_hadamard first multiplies value i by scale (a power of two, so exactly) and flips its sign
// where bit i % 64 of the random draw i / 64 is set (common/random.hpp), fused into its first pass.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../common/cpu.hpp"
#include "../common/random.hpp"

#if defined(FASTFED_X86_DISPATCH)
#include <immintrin.h>
#endif

namespace fastfed::rotate {

// Values per chunk whose stages run in L1 (16 KiB of float, 32 KiB of double).
inline constexpr std::size_t kL1Chunk = 4096;

// Stages half and 2 * half over x[0, length) (4 * half divides length).
template <class T>
inline void radix4_stages(T* x, std::size_t length, std::size_t half) {
    for (std::size_t start = 0; start < length; start += 4 * half) {
        for (std::size_t j = start; j < start + half; ++j) {
            T* p = x + j;
            const T a = p[0], b = p[half], c = p[2 * half], d = p[3 * half];
            const T s0 = a + b, s1 = a - b, s2 = c + d, s3 = c - d;
            p[0] = s0 + s2;
            p[half] = s1 + s3;
            p[2 * half] = s0 - s2;
            p[3 * half] = s1 - s3;
        }
    }
}

template <class T>
inline void radix2_stage(T* x, std::size_t length, std::size_t half) {
    for (std::size_t start = 0; start < length; start += 2 * half) {
        for (std::size_t j = start; j < start + half; ++j) {
            const T a = x[j], b = x[j + half];
            x[j] = a + b;
            x[j + half] = a - b;
        }
    }
}

// Stages first, 2 first, ... below `last` over x[0, length), two at a time.
template <class T>
inline void stages_between(T* x, std::size_t length, std::size_t first, std::size_t last) {
    std::size_t half = first;
    for (; 4 * half <= last; half *= 4) radix4_stages(x, length, half);
    if (half < last) radix2_stage(x, length, half);
}

#if defined(FASTFED_X86_DISPATCH)
FASTFED_TARGET("avx2") inline void radix4_stages_avx2(float* x, std::size_t length, std::size_t half) {
    for (std::size_t start = 0; start < length; start += 4 * half) {
        for (std::size_t j = start; j < start + half; j += 8) {
            float* p = x + j;
            const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + half);
            const __m256 c = _mm256_loadu_ps(p + 2 * half), d = _mm256_loadu_ps(p + 3 * half);
            const __m256 s0 = _mm256_add_ps(a, b), s1 = _mm256_sub_ps(a, b), s2 = _mm256_add_ps(c, d), s3 = _mm256_sub_ps(c, d);
            _mm256_storeu_ps(p, _mm256_add_ps(s0, s2));
            _mm256_storeu_ps(p + half, _mm256_add_ps(s1, s3));
            _mm256_storeu_ps(p + 2 * half, _mm256_sub_ps(s0, s2));
            _mm256_storeu_ps(p + 3 * half, _mm256_sub_ps(s1, s3));
        }
    }
}

FASTFED_TARGET("avx2") inline void radix2_stage_avx2(float* x, std::size_t length, std::size_t half) {
    for (std::size_t start = 0; start < length; start += 2 * half) {
        for (std::size_t j = start; j < start + half; j += 8) {
            const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + half);
            _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
            _mm256_storeu_ps(x + j + half, _mm256_sub_ps(a, b));
        }
    }
}

FASTFED_TARGET("avx2") inline void radix4_stages_avx2(double* x, std::size_t length, std::size_t half) {
    for (std::size_t start = 0; start < length; start += 4 * half) {
        for (std::size_t j = start; j < start + half; j += 4) {
            double* p = x + j;
            const __m256d a = _mm256_loadu_pd(p), b = _mm256_loadu_pd(p + half);
            const __m256d c = _mm256_loadu_pd(p + 2 * half), d = _mm256_loadu_pd(p + 3 * half);
            const __m256d s0 = _mm256_add_pd(a, b), s1 = _mm256_sub_pd(a, b), s2 = _mm256_add_pd(c, d), s3 = _mm256_sub_pd(c, d);
            _mm256_storeu_pd(p, _mm256_add_pd(s0, s2));
            _mm256_storeu_pd(p + half, _mm256_add_pd(s1, s3));
            _mm256_storeu_pd(p + 2 * half, _mm256_sub_pd(s0, s2));
            _mm256_storeu_pd(p + 3 * half, _mm256_sub_pd(s1, s3));
        }
    }
}

FASTFED_TARGET("avx2") inline void radix2_stage_avx2(double* x, std::size_t length, std::size_t half) {
    for (std::size_t start = 0; start < length; start += 2 * half) {
        for (std::size_t j = start; j < start + half; j += 4) {
            const __m256d a = _mm256_loadu_pd(x + j), b = _mm256_loadu_pd(x + j + half);
            _mm256_storeu_pd(x + j, _mm256_add_pd(a, b));
            _mm256_storeu_pd(x + j + half, _mm256_sub_pd(a, b));
        }
    }
}

template <class T>
FASTFED_TARGET("avx2")
inline void stages_between_avx2(T* x, std::size_t length, std::size_t first, std::size_t last) {
    std::size_t half = first;
    for (; 4 * half <= last; half *= 4) radix4_stages_avx2(x, length, half);
    if (half < last) radix2_stage_avx2(x, length, half);
}

// Stages 1, 2 and 4 of eight floats in one register: each stage adds the lanes to a permuted copy
// (lane j + h for lane j) and subtracts for the upper lanes, then blends.
FASTFED_TARGET("avx2") inline __m256 vector_stages(__m256 v) {
    __m256 t = _mm256_permute_ps(v, 0xB1);  // (b, a, d, c, ...)
    v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xAA);
    t = _mm256_permute_ps(v, 0x4E);  // (c, d, a, b, ...)
    v = _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xCC);
    t = _mm256_permute2f128_ps(v, v, 0x01);  // halves swapped
    return _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), 0xF0);
}

FASTFED_TARGET("avx2") inline __m256d vector_stages(__m256d v) {
    __m256d t = _mm256_permute_pd(v, 0x5);
    v = _mm256_blend_pd(_mm256_add_pd(v, t), _mm256_sub_pd(t, v), 0xA);
    t = _mm256_permute2f128_pd(v, v, 0x01);
    return _mm256_blend_pd(_mm256_add_pd(v, t), _mm256_sub_pd(t, v), 0xC);
}

// The sign flips of values i..i+7 (i a multiple of 8) as a mask of float sign bits.
FASTFED_TARGET("avx2") inline __m256 sign_mask_avx2(std::uint64_t word, std::size_t i) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i byte = _mm256_set1_epi32(static_cast<int>((word >> (i & 63)) & 0xFF));
    const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(byte, bit), bit);
    return _mm256_castsi256_ps(_mm256_and_si256(set, _mm256_set1_epi32(static_cast<int>(0x80000000u))));
}

// Stages h, 2h and 4h of eight vectors a[k] = x[j + k h]: radix 8, three stages per load and store.
FASTFED_TARGET("avx2") inline void butterfly8(__m256 (&a)[8]) {
    for (int h = 1; h < 8; h *= 2) {
        for (int k = 0; k < 8; ++k) {
            if (k & h) continue;
            const __m256 low = a[k], high = a[k + h];
            a[k] = _mm256_add_ps(low, high);
            a[k + h] = _mm256_sub_ps(low, high);
        }
    }
}

FASTFED_TARGET("avx2") inline void radix8_stages_avx2(float* x, std::size_t length, std::size_t half) {
    for (std::size_t start = 0; start < length; start += 8 * half) {
        for (std::size_t j = start; j < start + half; j += 8) {
            __m256 a[8];
            for (std::size_t k = 0; k < 8; ++k) a[k] = _mm256_loadu_ps(x + j + k * half);
            butterfly8(a);
            for (std::size_t k = 0; k < 8; ++k) _mm256_storeu_ps(x + j + k * half, a[k]);
        }
    }
}

// Stages first, 2 first, ... below `last` of floats, three at a time where they fit.
FASTFED_TARGET("avx2") inline void float_stages_avx2(float* x, std::size_t length, std::size_t first, std::size_t last) {
    std::size_t half = first;
    for (; 8 * half <= last; half *= 8) radix8_stages_avx2(x, length, half);
    stages_between_avx2(x, length, half, last);
}

// The values a first pass reads: x itself, ...
struct plain_values {
    const float* x;
    FASTFED_TARGET("avx2") __m256 operator()(std::size_t i) const { return _mm256_loadu_ps(x + i); }
};

// ... or source[0, valid) padded with zeros, scaled and sign-flipped by the random draws of `key`
// (runs of 64 values start at multiples of 64 of the stream, so each run reads one draw).
struct signed_values {
    const float* source;
    std::size_t valid;
    std::uint64_t key;
    std::size_t first_index;
    float scale;
    std::uint64_t word = 0;

    FASTFED_TARGET("avx2") __m256 operator()(std::size_t i) {
        const std::size_t index = first_index + i;
        if (index % 64 == 0) word = random::bits(key, index / 64);
        __m256 v;
        if (i + 8 <= valid) {
            v = _mm256_loadu_ps(source + i);
        } else {
            alignas(32) float tail[8] = {};
            for (std::size_t j = i; j < valid && j < i + 8; ++j) tail[j - i] = source[j];
            v = _mm256_load_ps(tail);
        }
        return _mm256_xor_ps(_mm256_mul_ps(v, _mm256_set1_ps(scale)), sign_mask_avx2(word, index));
    }
};

// The first six stages of each run of 64 floats, whose values come from load(i) (eight at x + i):
// three inside each register, three across eight registers.
template <class Load>
FASTFED_TARGET("avx2")
void first_stages_avx2(float* x, std::size_t length, Load& load) {
    for (std::size_t i = 0; i < length; i += 64) {
        __m256 a[8];
        for (std::size_t k = 0; k < 8; ++k) a[k] = vector_stages(load(i + 8 * k));
        butterfly8(a);
        for (std::size_t k = 0; k < 8; ++k) _mm256_storeu_ps(x + i + 8 * k, a[k]);
    }
}

// The stages after the first six: within L1-sized chunks, then across the whole block.
FASTFED_TARGET("avx2") inline void later_stages_avx2(float* x, std::size_t length) {
    const std::size_t chunk = std::min(length, kL1Chunk);
    for (std::size_t start = 0; start < length; start += chunk) float_stages_avx2(x + start, chunk, 64, chunk);
    float_stages_avx2(x, length, chunk, length);
}

FASTFED_TARGET("avx2") inline void hadamard_avx2(float* x, std::size_t length) {
    if (length < 64) {
        for (std::size_t i = 0; i < length; i += 8) _mm256_storeu_ps(x + i, vector_stages(_mm256_loadu_ps(x + i)));
        stages_between_avx2(x, length, 8, length);
        return;
    }
    plain_values load{x};
    first_stages_avx2(x, length, load);
    later_stages_avx2(x, length);
}

FASTFED_TARGET("avx2") inline void hadamard_avx2(double* x, std::size_t length) {
    for (std::size_t i = 0; i < length; i += 4) _mm256_storeu_pd(x + i, vector_stages(_mm256_loadu_pd(x + i)));
    const std::size_t chunk = std::min(length, kL1Chunk);
    for (std::size_t start = 0; start < length; start += chunk) stages_between_avx2(x + start, chunk, 4, chunk);
    stages_between_avx2(x, length, chunk, length);
}

FASTFED_TARGET("avx2")
inline void signed_hadamard_avx2(const float* source, std::size_t valid, float* x, std::size_t length, std::uint64_t key,
                                 std::size_t first_index, float scale) {
    signed_values load{source, valid, key, first_index, scale};
    first_stages_avx2(x, length, load);
    later_stages_avx2(x, length);
}
#endif

#if defined(FASTFED_X86_DISPATCH)
FASTFED_TARGET("avx2")
inline void apply_signs_avx2(float* x, std::size_t length, std::uint64_t key, std::size_t first_index, float scale) {
    const __m256 factor = _mm256_set1_ps(scale);
    std::uint64_t word = 0;
    for (std::size_t i = 0; i < length; i += 8) {
        const std::size_t index = first_index + i;
        if (i == 0 || index % 64 == 0) word = random::bits(key, index / 64);
        _mm256_storeu_ps(x + i, _mm256_xor_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), factor), sign_mask_avx2(word, index)));
    }
}
#endif

// In place: x[i] * scale, sign-flipped by bit (first_index + i) % 64 of draw (first_index + i) / 64
// of `key`; length and first_index are multiples of 8.
inline void apply_signs(float* x, std::size_t length, std::uint64_t key, std::size_t first_index, float scale) {
#if defined(FASTFED_X86_DISPATCH)
    if (active_isa() >= isa::avx2) {
        apply_signs_avx2(x, length, key, first_index, scale);
        return;
    }
#endif
    std::uint64_t word = 0;
    for (std::size_t i = 0; i < length; ++i) {
        const std::size_t index = first_index + i;
        if (i == 0 || index % 64 == 0) word = random::bits(key, index / 64);
        const float value = x[i] * scale;
        x[i] = (word >> (index & 63)) & 1 ? -value : value;
    }
}

// In place: the unnormalized transform of x[0, length), length a power of two.
template <class T>
void hadamard(T* x, std::size_t length) {
#if defined(FASTFED_X86_DISPATCH)
    constexpr std::size_t lanes = 32 / sizeof(T);
    if (active_isa() >= isa::avx2 && length >= lanes) {
        hadamard_avx2(x, length);
        return;
    }
#endif
    const std::size_t chunk = std::min(length, kL1Chunk);
    for (std::size_t start = 0; start < length; start += chunk) stages_between(x + start, chunk, 1, chunk);
    stages_between(x, length, chunk, length);
}

// x[0, length) = the transform of (source[i] * scale, sign-flipped by draw bits of `key` at
// first_index + i), where source holds `valid` values and the rest are zero. source may equal x.
// length is a power of two >= 8 and first_index a multiple of 8.
inline void signed_hadamard(const float* source, std::size_t valid, float* x, std::size_t length, std::uint64_t key,
                            std::size_t first_index, float scale) {
#if defined(FASTFED_X86_DISPATCH)
    if (active_isa() >= isa::avx2 && length >= 64 && first_index % 64 == 0) {
        signed_hadamard_avx2(source, valid, x, length, key, first_index, scale);
        return;
    }
#endif
    std::uint64_t word = 0;
    for (std::size_t i = 0; i < length; ++i) {
        const std::size_t index = first_index + i;
        if (i == 0 || index % 64 == 0) word = random::bits(key, index / 64);
        const float value = i < valid ? source[i] * scale : 0.0f;
        x[i] = (word >> (index & 63)) & 1 ? -value : value;
    }
    hadamard(x, length);
}

}  // namespace fastfed::rotate
