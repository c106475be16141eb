// Uniform quantization with tensor_encoding's semantics.
//
// Quantization maps x to q = round((x - min) * scale) with scale = (2^b - 1) / (max - min), where
// round is floor(v + 0.5) (nearest) or floor(v + u), u uniform on the multiples of 2^-16 in [0, 1)
// (stochastic rounding, Suresh et al. 2017, "Distributed Mean Estimation with Limited Communication";
// unbiased for v truncated to 16 fractional bits, as float32 holds v near 2^8). The sum is exact, in
// fixed point: (floor(2^16 v) + 2^16 u) >> 16. Decoding gives min + q * step with step = (max - min) /
// (2^b - 1). The u are the 16-bit coins of the counter-based stream of common/random.hpp (one draw for
// four values), so results do not depend on threading, and every formula matches
// fastfed.kernels.quantize_numpy operation for operation: all backends agree bit for bit. Levels are
// bit-packed as pack.hpp describes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include "../common/cpu.hpp"
#include "../common/pack.hpp"
#include "../common/parallel.hpp"
#include "../common/random.hpp"

#if defined(FASTFED_X86_DISPATCH)
#include <immintrin.h>
#endif

namespace fastfed::quantize {

using pack::packed_bytes;
using pack::unpack_range;

struct min_max_result {
    double minimum;
    double maximum;
    bool finite;
};

#if defined(FASTFED_X86_DISPATCH)
// min_max_range's float loop eight lanes wide; returns where it stopped.
FASTFED_TARGET("avx2")
inline std::size_t min_max_avx2(const float* x, std::size_t begin, std::size_t end, float& lo, float& hi, int& nan_seen) {
    __m256 vlo = _mm256_set1_ps(lo), vhi = vlo, vnan = _mm256_setzero_ps();
    std::size_t i = begin;
    for (; i + 8 <= end; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        vlo = _mm256_min_ps(vlo, v);
        vhi = _mm256_max_ps(vhi, v);
        vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float lanes_lo[8], lanes_hi[8];
    _mm256_store_ps(lanes_lo, vlo);
    _mm256_store_ps(lanes_hi, vhi);
    for (int j = 0; j < 8; ++j) {
        lo = lanes_lo[j] < lo ? lanes_lo[j] : lo;
        hi = lanes_hi[j] > hi ? lanes_hi[j] : hi;
    }
    nan_seen |= _mm256_movemask_ps(vnan);
    return i;
}

// The fixed-point values of x[0..7], computed as quantize_value does (loading four floats at a time
// lets the conversion to double read memory, without a shuffle).
FASTFED_TARGET("avx2") inline __m256i fixed_eight_avx2(const float* x, __m256d origin, __m256d fixed_scale, __m256d ceiling) {
    const __m256d zero = _mm256_setzero_pd();
    const __m256d low = _mm256_mul_pd(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x)), origin), fixed_scale);
    const __m256d high = _mm256_mul_pd(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + 4)), origin), fixed_scale);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm256_cvttpd_epi32(_mm256_min_pd(_mm256_max_pd(low, zero), ceiling))),
                                   _mm256_cvttpd_epi32(_mm256_min_pd(_mm256_max_pd(high, zero), ceiling)), 1);
}

// quantize_pack_range for 8-bit levels of float32, sixteen values per step with quantize_value's
// operations: 2^16 v fits an int32 (v <= 255), the coins of values 0-7 and 8-15 are the low and high
// halves of four draws' eight 32-bit words (random.hpp), and unsigned saturation when packing to bytes
// is the clamp to 255.
template <bool Stochastic>
FASTFED_TARGET("avx2")
std::size_t quantize_u8_avx2(const float* x, std::size_t begin, std::size_t end, double offset, double fixed_scale, std::uint64_t key,
                             std::uint8_t* out) {
    const __m256d origin = _mm256_set1_pd(offset), factor = _mm256_set1_pd(fixed_scale), ceiling = _mm256_set1_pd(0x1p24);
    const __m256i half = _mm256_set1_epi32(1 << 15), low_half = _mm256_set1_epi32(0xFFFF);
    const __m256i value_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    random::draws_avx2 draws(key, begin / 4);  // begin is a multiple of 16 (quantize_pack)
    std::size_t i = begin;
    for (; i + 16 <= end; i += 16) {
        __m256i coins_low = half, coins_high = half;
        if constexpr (Stochastic) {
            const __m256i words = draws.next();
            coins_low = _mm256_and_si256(words, low_half);
            coins_high = _mm256_srli_epi32(words, 16);
        }
        const __m256i q_low = _mm256_srli_epi32(_mm256_add_epi32(fixed_eight_avx2(x + i, origin, factor, ceiling), coins_low), 16);
        const __m256i q_high = _mm256_srli_epi32(_mm256_add_epi32(fixed_eight_avx2(x + i + 8, origin, factor, ceiling), coins_high), 16);
        // Packing works per 128-bit lane: the bytes come out as 32-bit groups low 0-3, high 0-3, (again), low 4-7, high 4-7.
        const __m256i words = _mm256_packus_epi32(q_low, q_high);
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words, words), value_order);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_castsi256_si128(bytes));
    }
    return i;
}

FASTFED_AVX512_BEGIN
FASTFED_TARGET("avx512f,avx512dq,avx512vl,avx512bw")
inline __m256i fixed_eight_avx512(const float* x, __m512d origin, __m512d fixed_scale, __m512d ceiling) {
    const __m512d fixed = _mm512_mul_pd(_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x)), origin), fixed_scale);
    return _mm512_cvttpd_epi32(_mm512_min_pd(_mm512_max_pd(fixed, _mm512_setzero_pd()), ceiling));
}

// quantize_u8_avx2 thirty-two values per step with AVX-512DQ's random numbers: the same coins and
// operations, so the same levels. Eight draws hold the coins of two groups of sixteen values, the
// first group's in their low 32-bit lanes, so each vector takes values 0-7 (or 8-15) of both groups.
template <bool Stochastic>
FASTFED_TARGET("avx512f,avx512dq,avx512vl,avx512bw")
inline std::size_t quantize_u8_avx512(const float* x, std::size_t begin, std::size_t end, double offset, double fixed_scale,
                                      std::uint64_t key, std::uint8_t* out) {
    const __m512d origin = _mm512_set1_pd(offset), factor = _mm512_set1_pd(fixed_scale), ceiling = _mm512_set1_pd(0x1p24);
    const __m512i half = _mm512_set1_epi32(1 << 15), low_half = _mm512_set1_epi32(0xFFFF);
    random::draws_avx512 draws(key, begin / 4);  // begin is a multiple of 16 (quantize_pack)
    std::size_t i = begin;
    for (; i + 32 <= end; i += 32) {
        __m512i coins_low = half, coins_high = half;
        if constexpr (Stochastic) {
            const __m512i words = draws.next();
            coins_low = _mm512_and_si512(words, low_half);
            coins_high = _mm512_srli_epi32(words, 16);
        }
        __m128i bytes[2];
        for (int h = 0; h < 2; ++h) {
            const float* p = x + i + 8 * h;
            const __m512i fixed = _mm512_inserti64x4(_mm512_castsi256_si512(fixed_eight_avx512(p, origin, factor, ceiling)),
                                                     fixed_eight_avx512(p + 16, origin, factor, ceiling), 1);
            const __m512i q = _mm512_srli_epi32(_mm512_add_epi32(fixed, h == 0 ? coins_low : coins_high), 16);
            bytes[h] = _mm512_cvtusepi32_epi8(q);  // values 8h..8h+7 of both groups
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm_unpacklo_epi64(bytes[0], bytes[1]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 16), _mm_unpackhi_epi64(bytes[0], bytes[1]));
    }
    return i;
}
FASTFED_AVX512_END
#endif

// Lowest, highest and whether a NaN was seen in x[begin, end), a non-empty range.
template <class Source>
void min_max_range(const Source* x, std::size_t begin, std::size_t end, Source& lo, Source& hi, bool& has_nan) {
    lo = hi = x[begin];
    int nan_seen = 0;
    std::size_t i = begin;
#if defined(__SSE2__)
    // minps/maxps ignore NaN operands in the second position, so NaNs are tracked separately.
    if constexpr (std::is_same_v<Source, float>) {
#if defined(FASTFED_X86_DISPATCH)
        if (active_isa() >= isa::avx2) i = min_max_avx2(x, i, end, lo, hi, nan_seen);
#endif
        __m128 vlo = _mm_set1_ps(lo), vhi = vlo, vnan = _mm_setzero_ps();
        for (; i + 4 <= end; i += 4) {
            const __m128 v = _mm_loadu_ps(x + i);
            vlo = _mm_min_ps(vlo, v);
            vhi = _mm_max_ps(vhi, v);
            vnan = _mm_or_ps(vnan, _mm_cmpunord_ps(v, v));
        }
        alignas(16) float lanes_lo[4], lanes_hi[4];
        _mm_store_ps(lanes_lo, vlo);
        _mm_store_ps(lanes_hi, vhi);
        for (int j = 0; j < 4; ++j) {
            lo = lanes_lo[j] < lo ? lanes_lo[j] : lo;
            hi = lanes_hi[j] > hi ? lanes_hi[j] : hi;
        }
        nan_seen |= _mm_movemask_ps(vnan);
    } else if constexpr (std::is_same_v<Source, double>) {
        __m128d vlo = _mm_set1_pd(lo), vhi = vlo, vnan = _mm_setzero_pd();
        for (; i + 2 <= end; i += 2) {
            const __m128d v = _mm_loadu_pd(x + i);
            vlo = _mm_min_pd(vlo, v);
            vhi = _mm_max_pd(vhi, v);
            vnan = _mm_or_pd(vnan, _mm_cmpunord_pd(v, v));
        }
        alignas(16) double lanes_lo[2], lanes_hi[2];
        _mm_store_pd(lanes_lo, vlo);
        _mm_store_pd(lanes_hi, vhi);
        for (int j = 0; j < 2; ++j) {
            lo = lanes_lo[j] < lo ? lanes_lo[j] : lo;
            hi = lanes_hi[j] > hi ? lanes_hi[j] : hi;
        }
        nan_seen |= _mm_movemask_pd(vnan);
    }
#endif
    for (; i < end; ++i) {
        const Source v = x[i];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
        nan_seen |= static_cast<int>(v != v);
    }
    has_nan = nan_seen != 0;
}

template <class Source>
min_max_result min_max(const Source* x, std::size_t n) {
    struct partial {
        Source lo, hi;
        bool has_nan;
    };
    constexpr std::size_t kGrain = 1 << 16;
    const std::size_t n_blocks = (n + kGrain - 1) / kGrain;
    std::vector<partial> partials(n_blocks);
    parallel_for(n_blocks, 1, kGrain, [&](std::size_t first, std::size_t last) {
        for (std::size_t block = first; block < last; ++block) {
            partial& p = partials[block];
            run_vectorized([&] { min_max_range(x, block * kGrain, std::min(n, (block + 1) * kGrain), p.lo, p.hi, p.has_nan); });
        }
    });
    // Infinities surface as the minimum or maximum; NaNs, which compare false, are flagged.
    min_max_result result{static_cast<double>(partials[0].lo), static_cast<double>(partials[0].hi), true};
    for (const auto& p : partials) {
        result.minimum = std::min(result.minimum, static_cast<double>(p.lo));
        result.maximum = std::max(result.maximum, static_cast<double>(p.hi));
        if (p.has_nan) result.finite = false;
    }
    if (!std::isfinite(result.minimum) || !std::isfinite(result.maximum)) result.finite = false;
    return result;
}

// Level of a finite x (min_max rejects others; a NaN's level is unspecified): floor(v + u) with
// v = (x - offset) scale clamped to [0, 2^bits] (in range when offset and scale come from the minimum
// and maximum), computed exactly as (floor(2^16 v) + 2^16 u) >> 16, with fixed_scale = 2^16 scale
// (scaling by a power of two does not round), then clamped to the top level.
template <bool Stochastic, class Source>
inline std::uint32_t quantize_value(Source x, std::size_t index, double offset, double fixed_scale, double ceiling, std::uint64_t levels,
                                    std::uint64_t key) {
    const auto fixed = static_cast<std::uint64_t>(std::min(std::max((static_cast<double>(x) - offset) * fixed_scale, 0.0), ceiling));
    const std::uint64_t dither = Stochastic ? random::quarter_coin(key, index) : 1u << 15;
    return static_cast<std::uint32_t>(std::min((fixed + dither) >> 16, levels));
}

template <bool Stochastic, class Source>
void quantize_pack_range(const Source* FASTFED_RESTRICT x, std::size_t begin, std::size_t end, unsigned bits, std::uint64_t key,
                         double offset, double scale, std::uint8_t* FASTFED_RESTRICT out) {
    const std::uint64_t levels = (1u << bits) - 1;
    const double fixed_scale = scale * 0x1p16, ceiling = std::ldexp(1.0, static_cast<int>(bits) + 16);
    if (bits == 8) {
        std::size_t i = begin;
#if defined(FASTFED_X86_DISPATCH)
        if constexpr (std::is_same_v<Source, float>) {
            if (active_isa() >= isa::avx512)
                i = quantize_u8_avx512<Stochastic>(x, begin, end, offset, fixed_scale, key, out);
            else if (active_isa() >= isa::avx2)
                i = quantize_u8_avx2<Stochastic>(x, begin, end, offset, fixed_scale, key, out);
        }
#endif
        for (; i < end; ++i)
            out[i] = static_cast<std::uint8_t>(quantize_value<Stochastic>(x[i], i, offset, fixed_scale, ceiling, levels, key));
        return;
    }
    pack::pack_range(begin, end, bits, out,
                     [&](std::size_t i) { return quantize_value<Stochastic>(x[i], i, offset, fixed_scale, ceiling, levels, key); });
}

// Threads take whole groups of sixteen values: the vector paths draw a group's coins together.
template <class Source>
void quantize_pack(const Source* x, std::size_t n, unsigned bits, bool stochastic, std::uint64_t key, double offset, double scale,
                   std::uint8_t* out) {
    const std::size_t n_groups = (n + 15) / 16;
    parallel_for(n_groups, 2048, 16, [&](std::size_t first_group, std::size_t end_group) {
        const std::size_t begin = first_group * 16, end = std::min(n, end_group * 16);
        run_vectorized([&] {
            if (stochastic)
                quantize_pack_range<true>(x, begin, end, bits, key, offset, scale, out);
            else
                quantize_pack_range<false>(x, begin, end, bits, key, offset, scale, out);
        });
    });
}

template <class Output>
void unpack_dequantize(const std::uint8_t* FASTFED_RESTRICT packed, std::size_t n, unsigned bits, double offset, double step,
                       Output* FASTFED_RESTRICT out) {
    const std::size_t n_groups = (n + 7) / 8;
    parallel_for(n_groups, 4096, 8, [&](std::size_t first_group, std::size_t end_group) {
        run_vectorized([&] {
            if (bits == 8) {
                for (std::size_t i = first_group * 8; i < std::min(n, end_group * 8); ++i)
                    out[i] = static_cast<Output>(offset + static_cast<double>(packed[i]) * step);
                return;
            }
            unpack_range(packed, first_group * 8, std::min(n, end_group * 8), bits,
                         [&](std::size_t i, std::uint32_t q) { out[i] = static_cast<Output>(offset + static_cast<double>(q) * step); });
        });
    });
}

// acc[i] += weight * decoded[i], with decoded rounded to float32 exactly as unpack_dequantize
// into a float32 array would, so the fused path equals decode-then-accumulate bit for bit.
inline void unpack_dequantize_accumulate(const std::uint8_t* packed, std::size_t n, unsigned bits, double offset, double step,
                                         double weight, double* acc) {
    const std::size_t n_groups = (n + 7) / 8;
    parallel_for(n_groups, 4096, 8, [&](std::size_t first_group, std::size_t end_group) {
        run_vectorized([&] {
            unpack_range(packed, first_group * 8, std::min(n, end_group * 8), bits, [&](std::size_t i, std::uint32_t q) {
                const float decoded = static_cast<float>(offset + static_cast<double>(q) * step);
                acc[i] += weight * static_cast<double>(decoded);
            });
        });
    });
}

}  // namespace fastfed::quantize
