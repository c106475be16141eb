// Uniform quantization with tensor_encoding's semantics.
//
// Quantization maps x to q = round((x - min) * scale) with scale = (2^b - 1) / (max - min), where
// round is floor(v + 0.5) (nearest) or floor(v + u), u uniform on the multiples of 2^-32 in [0, 1)
// (unbiased stochastic rounding, Suresh et al. 2017, "Distributed Mean Estimation with Limited
// Communication"). Decoding gives min + q * step with step = (max - min) / (2^b - 1). The u are the
// 32-bit coins of the counter-based stream of common/random.hpp (one draw for two values), so results do not depend on threading, and every
// formula matches fastfed.kernels.quantize_numpy operation for operation: all backends agree bit for bit. Levels are bit-packed as pack.hpp
// describes.
#pragma once

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

// quantize_pack_range for 8-bit levels of float32, eight values per step with the same double-precision
// operations: the dither is 1/2 (nearest) or the value's coin from the counter-based stream, four
// splitmix64 draws (eight coins) at a time (random.hpp); min(q, 255) then truncation equals the scalar clamp.
template <bool Stochastic>
FASTFED_TARGET("avx2")
std::size_t quantize_u8_avx2(const float* x, std::size_t begin, std::size_t end, double offset, double scale, std::uint64_t key,
                             std::uint8_t* out) {
    const __m256d origin = _mm256_set1_pd(offset), factor = _mm256_set1_pd(scale), half = _mm256_set1_pd(0.5), top = _mm256_set1_pd(255.0);
    const __m128i low_bytes = _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    random::draws_avx2 draws(key, begin / 2);  // begin is a multiple of 8: four draws hold the next eight coins
    std::size_t i = begin;
    for (; i + 8 <= end; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256d low = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), high = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        __m256d dither_low = half, dither_high = half;
        if constexpr (Stochastic) random::coins_avx2(draws, dither_low, dither_high);
        const __m256d q_low = _mm256_min_pd(_mm256_add_pd(_mm256_mul_pd(_mm256_sub_pd(low, origin), factor), dither_low), top);
        const __m256d q_high = _mm256_min_pd(_mm256_add_pd(_mm256_mul_pd(_mm256_sub_pd(high, origin), factor), dither_high), top);
        // The low byte of each int32, as the scalar cast keeps it (packing would saturate instead).
        const __m128i bytes_low = _mm_shuffle_epi8(_mm256_cvttpd_epi32(q_low), low_bytes);
        const __m128i bytes_high = _mm_shuffle_epi8(_mm256_cvttpd_epi32(q_high), low_bytes);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_unpacklo_epi32(bytes_low, bytes_high));
    }
    return i;
}

// quantize_u8_avx2's stochastic rounding sixteen values at a time with AVX-512DQ's random numbers:
// the same coins and the same double-precision operations, so the same levels.
FASTFED_AVX512_BEGIN
FASTFED_TARGET("avx512f,avx512dq,avx512vl,avx512bw")
inline std::size_t quantize_stochastic_u8_avx512(const float* x, std::size_t begin, std::size_t end, double offset, double scale,
                                                 std::uint64_t key, std::uint8_t* out) {
    const __m512d origin = _mm512_set1_pd(offset), factor = _mm512_set1_pd(scale), top = _mm512_set1_pd(255.0);
    random::draws_avx512 draws(key, begin / 2);  // begin is a multiple of 8, so even
    std::size_t i = begin;
    for (; i + 16 <= end; i += 16) {
        __m512d coins[2];
        draws.coins(coins[0], coins[1]);
        for (int h = 0; h < 2; ++h) {
            const __m512d v = _mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8 * h));
            const __m512d q = _mm512_min_pd(_mm512_add_pd(_mm512_mul_pd(_mm512_sub_pd(v, origin), factor), coins[h]), top);
            // The low byte of each int32, as the scalar cast keeps it.
            _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i + 8 * h), _mm256_cvtepi32_epi8(_mm512_cvttpd_epi32(q)));
        }
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

template <bool Stochastic, class Source>
inline std::uint32_t quantize_value(Source x, std::size_t index, double offset, double scale, double levels, std::uint64_t key) {
    const double v = (static_cast<double>(x) - offset) * scale;
    double dither = 0.5;
    if constexpr (Stochastic) dither = random::coin_fraction(key, index);
    // v >= 0 because x >= offset, so truncation equals the reference's floor, without a libm call;
    // through int32 (levels <= 65535), which SSE2 converts several at a time, unlike uint32.
    const double q = v + dither;
    return static_cast<std::uint32_t>(q >= levels ? static_cast<std::int32_t>(levels) : static_cast<std::int32_t>(q));
}

template <bool Stochastic, class Source>
void quantize_pack_range(const Source* FASTFED_RESTRICT x, std::size_t begin, std::size_t end, unsigned bits, std::uint64_t key,
                         double offset, double scale, std::uint8_t* FASTFED_RESTRICT out) {
    const double levels = static_cast<double>((1u << bits) - 1);
    if (bits == 8) {
        std::size_t i = begin;
#if defined(FASTFED_X86_DISPATCH)
        if constexpr (std::is_same_v<Source, float>) {
            if (Stochastic && active_isa() >= isa::avx512)
                i = quantize_stochastic_u8_avx512(x, begin, end, offset, scale, key, out);
            else if (active_isa() >= isa::avx2)
                i = quantize_u8_avx2<Stochastic>(x, begin, end, offset, scale, key, out);
        }
#endif
        for (; i < end; ++i) out[i] = static_cast<std::uint8_t>(quantize_value<Stochastic>(x[i], i, offset, scale, levels, key));
        return;
    }
    pack::pack_range(begin, end, bits, out, [&](std::size_t i) { return quantize_value<Stochastic>(x[i], i, offset, scale, levels, key); });
}

template <class Source>
void quantize_pack(const Source* x, std::size_t n, unsigned bits, bool stochastic, std::uint64_t key, double offset, double scale,
                   std::uint8_t* out) {
    const std::size_t n_groups = (n + 7) / 8;
    parallel_for(n_groups, 4096, 8, [&](std::size_t first_group, std::size_t end_group) {
        const std::size_t begin = first_group * 8, end = std::min(n, end_group * 8);
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
