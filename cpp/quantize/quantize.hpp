// Uniform quantization with tensor_encoding's semantics, bit-packing and randomized Hadamard rotation.
//
// Quantization maps x to q = round((x - min) * scale) with scale = (2^b - 1) / (max - min), where
// round is floor(v + 0.5) (nearest) or floor(v + u), u ~ U[0, 1) (unbiased stochastic rounding,
// Suresh et al. 2017, "Distributed Mean Estimation with Limited Communication"). Decoding gives
// min + q * step with step = (max - min) / (2^b - 1). The uniforms and rotation signs come from a
// counter-based hash of (key, index), so results do not depend on threading, and every formula
// matches fastfed.kernels.quantize_numpy operation for operation: all backends agree bit for bit.
//
// Packing is little-endian and LSB-first: value i occupies bits [i*b, (i+1)*b) of the stream, bit g
// of the stream is bit (g % 8) of byte g / 8. Every 8 values fill exactly b bytes, so groups of 8
// are packed and unpacked independently in parallel.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include "../common/cpu.hpp"
#include "../common/crc32.hpp"
#include "../common/parallel.hpp"

#if defined(FASTFED_X86_DISPATCH)
#include <immintrin.h>
#endif

// uint8_t may alias anything, so loops over packed bytes vectorize only with this promise.
#if defined(__GNUC__) || defined(_MSC_VER)
#define FASTFED_RESTRICT __restrict
#else
#define FASTFED_RESTRICT
#endif

namespace fastfed::quantize {

// splitmix64's output function (Steele et al. 2014): a bijective 64-bit mixer.
inline std::uint64_t mix64(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

inline std::uint64_t random_bits(std::uint64_t key, std::uint64_t index) {
    return mix64(key + (index + 1) * 0x9E3779B97F4A7C15ULL);
}

// A uniform double in [0, 1) from the top 53 bits.
inline double random_uniform(std::uint64_t key, std::uint64_t index) {
    return static_cast<double>(random_bits(key, index) >> 11) * 0x1.0p-53;
}

inline std::size_t packed_bytes(std::size_t n, unsigned bits) { return (n * bits + 7) / 8; }

struct min_max_result {
    double minimum;
    double maximum;
    bool finite;
};

#if defined(FASTFED_X86_DISPATCH)
// min_max_range's float loop eight lanes wide; returns where it stopped.
FASTFED_TARGET("avx2") inline std::size_t min_max_avx2(const float* x, std::size_t begin, std::size_t end, float& lo, float& hi,
                                                      int& nan_seen) {
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

// quantize_pack_range for 8-bit nearest rounding of float32, eight values per step with the same
// double-precision operations; min(q, 255) then truncation equals the scalar clamp.
FASTFED_TARGET("avx2") inline std::size_t quantize_nearest_u8_avx2(const float* x, std::size_t begin, std::size_t end, double offset,
                                                                  double scale, std::uint8_t* out) {
    const __m256d origin = _mm256_set1_pd(offset), factor = _mm256_set1_pd(scale), half = _mm256_set1_pd(0.5),
                  top = _mm256_set1_pd(255.0);
    const __m128i low_bytes = _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    std::size_t i = begin;
    for (; i + 8 <= end; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256d low = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), high = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        const __m256d q_low = _mm256_min_pd(_mm256_add_pd(_mm256_mul_pd(_mm256_sub_pd(low, origin), factor), half), top);
        const __m256d q_high = _mm256_min_pd(_mm256_add_pd(_mm256_mul_pd(_mm256_sub_pd(high, origin), factor), half), top);
        // The low byte of each int32, as the scalar cast keeps it (packing would saturate instead).
        const __m128i bytes_low = _mm_shuffle_epi8(_mm256_cvttpd_epi32(q_low), low_bytes);
        const __m128i bytes_high = _mm_shuffle_epi8(_mm256_cvttpd_epi32(q_high), low_bytes);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_unpacklo_epi32(bytes_low, bytes_high));
    }
    return i;
}
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
    if constexpr (Stochastic) dither = random_uniform(key, index);
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
        if constexpr (!Stochastic && std::is_same_v<Source, float>)
            if (active_isa() >= isa::avx2) i = quantize_nearest_u8_avx2(x, begin, end, offset, scale, out);
#endif
        for (; i < end; ++i)
            out[i] = static_cast<std::uint8_t>(quantize_value<Stochastic>(x[i], i, offset, scale, levels, key));
        return;
    }
    std::uint8_t* byte = out + (begin / 8) * bits;
    std::uint64_t buffer = 0;
    unsigned filled = 0;
    for (std::size_t i = begin; i < end; ++i) {
        buffer |= static_cast<std::uint64_t>(quantize_value<Stochastic>(x[i], i, offset, scale, levels, key)) << filled;
        filled += bits;
        while (filled >= 8) {
            *byte++ = static_cast<std::uint8_t>(buffer);
            buffer >>= 8;
            filled -= 8;
        }
    }
    if (filled > 0) *byte = static_cast<std::uint8_t>(buffer);  // only the last group of the stream is partial
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

// Calls emit(i, q) for every value i in [begin, end) of the packed stream; begin is a multiple of 8.
template <class Emit>
void unpack_range(const std::uint8_t* packed, std::size_t begin, std::size_t end, unsigned bits, Emit&& emit) {
    if (bits == 8) {
        for (std::size_t i = begin; i < end; ++i) emit(i, static_cast<std::uint32_t>(packed[i]));
        return;
    }
    const std::uint64_t mask = (std::uint64_t{1} << bits) - 1;
    const std::uint8_t* byte = packed + (begin / 8) * bits;
    std::uint64_t buffer = 0;
    unsigned filled = 0;
    for (std::size_t i = begin; i < end; ++i) {
        while (filled < bits) {
            buffer |= static_cast<std::uint64_t>(*byte++) << filled;
            filled += 8;
        }
        emit(i, static_cast<std::uint32_t>(buffer & mask));
        buffer >>= bits;
        filled -= bits;
    }
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
            unpack_range(packed, first_group * 8, std::min(n, end_group * 8), bits, [&](std::size_t i, std::uint32_t q) {
                out[i] = static_cast<Output>(offset + static_cast<double>(q) * step);
            });
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

// out[i] = (sum over clients of scales[k] * q_k[i] + offset) / divisor, for K packed tensors of one
// bit width: the batched path of fastfed.weighted_mean_encoded. Also continues checksums[k] over
// packed[k] (zlib's CRC-32), so the payloads are verified in the same pass that reads them.
//
// With x = min + step * q, a weighted mean is (sum_k w_k min_k + sum_k (w_k step_k) q_k) / W; the
// caller passes offset = sum_k w_k min_k and scales = w_k step_k, and the level sums are computed
// here reading each packed byte once from memory. Parameters are tiled as in cpp/aggregate, with
// the float64 accumulator tile in cache. Within a tile, blocks of eight clients are first
// checksummed, then (now cache-hot) summed in float32 (scale_k * q_k added in client order,
// starting from zero), and each block sum is added to the tile. The float32 part carries only
// values relative to each tensor's range, so its rounding stays orders of magnitude below the
// quantization step.
inline constexpr std::size_t kTile = 16384;  // a multiple of 8, so every tile starts on a byte
inline constexpr std::size_t kClientBlock = 8;

#if defined(FASTFED_X86_DISPATCH)
// Eight 8-bit levels at p, as floats.
FASTFED_TARGET("avx2") inline __m256 levels_avx2(const std::uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// A block of up to eight 8-bit clients of sum_quantized_tiles, sixteen elements per step with the
// same operations in the same order. The sum starts from the first product instead of 0 + product:
// equal unless the product is -0.0, which then adds to the +0.0-started accumulator as +0.0 does.
// Meanwhile the next clients' bytes (`next`) are prefetched for their checksum. Returns how many
// elements it did; the caller finishes the rest.
template <std::size_t Clients>
FASTFED_TARGET("avx2") std::size_t sum_clients_avx2(const std::uint8_t* const* q, const float* scales, double* acc, std::size_t length,
                                                   const std::uint8_t* const* next, std::size_t n_next) {
    __m256 scale[Clients];
    for (std::size_t j = 0; j < Clients; ++j) scale[j] = _mm256_set1_ps(scales[j]);
    std::size_t i = 0;
    // Two independent groups of eight per step, so the dependent adds of one hide the other's.
    for (; i + 16 <= length; i += 16) {
        if (i % 64 == 0)
            for (std::size_t j = 0; j < n_next; ++j) _mm_prefetch(reinterpret_cast<const char*>(next[j] + i), _MM_HINT_T0);
        __m256 a = _mm256_mul_ps(scale[0], levels_avx2(q[0] + i)), b = _mm256_mul_ps(scale[0], levels_avx2(q[0] + i + 8));
        for (std::size_t j = 1; j < Clients; ++j) {
            a = _mm256_add_ps(a, _mm256_mul_ps(scale[j], levels_avx2(q[j] + i)));
            b = _mm256_add_ps(b, _mm256_mul_ps(scale[j], levels_avx2(q[j] + i + 8)));
        }
        _mm256_storeu_pd(acc + i, _mm256_add_pd(_mm256_loadu_pd(acc + i), _mm256_cvtps_pd(_mm256_castps256_ps128(a))));
        _mm256_storeu_pd(acc + i + 4, _mm256_add_pd(_mm256_loadu_pd(acc + i + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1))));
        _mm256_storeu_pd(acc + i + 8, _mm256_add_pd(_mm256_loadu_pd(acc + i + 8), _mm256_cvtps_pd(_mm256_castps256_ps128(b))));
        _mm256_storeu_pd(acc + i + 12, _mm256_add_pd(_mm256_loadu_pd(acc + i + 12), _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1))));
    }
    return i;
}

inline std::size_t sum_clients_avx2(std::size_t clients, const std::uint8_t* const* q, const float* scales, double* acc,
                                    std::size_t length, const std::uint8_t* const* next, std::size_t n_next) {
    switch (clients) {
        case 1: return sum_clients_avx2<1>(q, scales, acc, length, next, n_next);
        case 2: return sum_clients_avx2<2>(q, scales, acc, length, next, n_next);
        case 3: return sum_clients_avx2<3>(q, scales, acc, length, next, n_next);
        case 4: return sum_clients_avx2<4>(q, scales, acc, length, next, n_next);
        case 5: return sum_clients_avx2<5>(q, scales, acc, length, next, n_next);
        case 6: return sum_clients_avx2<6>(q, scales, acc, length, next, n_next);
        case 7: return sum_clients_avx2<7>(q, scales, acc, length, next, n_next);
        default: return sum_clients_avx2<8>(q, scales, acc, length, next, n_next);
    }
}
#endif

template <class Output>
void sum_quantized_tiles(const std::vector<const std::uint8_t*>& packed, unsigned bits, const float* scales, double offset,
                         double divisor, Output* out, std::size_t n, std::size_t first_tile, std::size_t end_tile,
                         std::uint32_t* checksums) {
    const std::size_t n_clients = packed.size();
    const std::size_t total_bytes = packed_bytes(n, bits);
    std::vector<double> acc_storage(kTile);
    std::vector<float> block_storage(kTile);
    double* FASTFED_RESTRICT acc = acc_storage.data();
    float* FASTFED_RESTRICT block_sum = block_storage.data();
    [[maybe_unused]] const bool use_avx2 = active_isa() >= isa::avx2;
    for (std::size_t tile = first_tile; tile < end_tile; ++tile) {
        const std::size_t begin = tile * kTile;
        const std::size_t length = std::min(kTile, n - begin);
        const std::size_t first_byte = begin / 8 * bits;
        const std::size_t tile_bytes = std::min(total_bytes, (begin + kTile) / 8 * bits) - first_byte;
        for (std::size_t i = 0; i < length; ++i) acc[i] = 0.0;
        for (std::size_t first = 0; first < n_clients; first += kClientBlock) {
            const std::size_t last = std::min(n_clients, first + kClientBlock);
            for (std::size_t k = first; k < last; ++k) checksums[k] = crc32_update(checksums[k], packed[k] + first_byte, tile_bytes);
            const std::size_t clients = last - first;
            if (bits == 8) {
                const std::uint8_t* q[kClientBlock] = {};
                float scale[kClientBlock] = {};
                for (std::size_t j = 0; j < clients; ++j) {
                    q[j] = packed[first + j] + begin;
                    scale[j] = scales[first + j];
                }
                std::size_t done = 0;
#if defined(FASTFED_X86_DISPATCH)
                if (use_avx2) {
                    // The clients checksummed next: the rest of this tile's clients, then the next tile's.
                    const std::uint8_t* next[kClientBlock];
                    std::size_t n_next = 0;
                    for (std::size_t k = last; k < n_clients && n_next < kClientBlock; ++k) next[n_next++] = packed[k] + first_byte;
                    for (std::size_t k = 0; k < n_clients && n_next < kClientBlock && tile + 1 < end_tile; ++k)
                        next[n_next++] = packed[k] + first_byte + tile_bytes;
                    done = sum_clients_avx2(clients, q, scale, acc, length, next, n_next);
                }
#endif
                if (clients == kClientBlock) {
                    // A full block: the block sum stays in a register.
                    for (std::size_t i = done; i < length; ++i) {
                        float sum = 0.0f;
                        sum += scale[0] * static_cast<float>(q[0][i]);
                        sum += scale[1] * static_cast<float>(q[1][i]);
                        sum += scale[2] * static_cast<float>(q[2][i]);
                        sum += scale[3] * static_cast<float>(q[3][i]);
                        sum += scale[4] * static_cast<float>(q[4][i]);
                        sum += scale[5] * static_cast<float>(q[5][i]);
                        sum += scale[6] * static_cast<float>(q[6][i]);
                        sum += scale[7] * static_cast<float>(q[7][i]);
                        acc[i] += static_cast<double>(sum);
                    }
                    continue;
                }
                if (done > 0) {  // the few elements after the vector loop of a partial block
                    for (std::size_t i = done; i < length; ++i) {
                        float sum = 0.0f;
                        for (std::size_t j = 0; j < clients; ++j) sum += scale[j] * static_cast<float>(q[j][i]);
                        acc[i] += static_cast<double>(sum);
                    }
                    continue;
                }
            }
            for (std::size_t i = 0; i < length; ++i) block_sum[i] = 0.0f;
            for (std::size_t k = first; k < last; ++k) {
                const float scale = scales[k];
                if (bits == 8) {
                    const std::uint8_t* FASTFED_RESTRICT q = packed[k] + begin;
                    for (std::size_t i = 0; i < length; ++i) block_sum[i] += scale * static_cast<float>(q[i]);
                } else {
                    unpack_range(packed[k], begin, begin + length, bits, [&](std::size_t i, std::uint32_t level) {
                        block_sum[i - begin] += scale * static_cast<float>(level);
                    });
                }
            }
            for (std::size_t i = 0; i < length; ++i) acc[i] += static_cast<double>(block_sum[i]);
        }
        for (std::size_t i = 0; i < length; ++i) out[begin + i] = static_cast<Output>((acc[i] + offset) / divisor);
    }
}

template <class Output>
void weighted_sum_quantized(const std::vector<const std::uint8_t*>& packed, unsigned bits, const float* scales, double offset,
                            double divisor, Output* out, std::size_t n, std::uint32_t* checksums) {
    const std::size_t n_clients = packed.size();
    const std::size_t n_tiles = (n + kTile - 1) / kTile;
    // Contiguous runs of tiles, about eight per thread for balance: each run checksums its own byte
    // range from zero and the runs are combined in order afterwards.
    const std::size_t run = std::max<std::size_t>(1, n_tiles / (8 * num_threads()));
    const std::size_t n_runs = (n_tiles + run - 1) / run;
    std::vector<std::uint32_t> run_checksums(n_runs * n_clients, 0);
    parallel_for(n_runs, 1, run * n_clients * kTile / 4, [&](std::size_t first_run, std::size_t end_run) {
        for (std::size_t r = first_run; r < end_run; ++r) {
            run_vectorized([&] {
                sum_quantized_tiles(packed, bits, scales, offset, divisor, out, n, r * run, std::min(n_tiles, (r + 1) * run),
                                    run_checksums.data() + r * n_clients);
            });
        }
    });
    const std::size_t total_bytes = packed_bytes(n, bits);
    const std::uint32_t full_run_shift = crc32_shift(run * kTile / 8 * bits);  // all runs but the last
    for (std::size_t r = 0; r < n_runs; ++r) {
        const std::size_t first_byte = r * run * kTile / 8 * bits;
        const std::size_t run_bytes = std::min(total_bytes, (r + 1) * run * kTile / 8 * bits) - first_byte;
        const std::uint32_t shift = r + 1 < n_runs ? full_run_shift : crc32_shift(run_bytes);
        for (std::size_t k = 0; k < n_clients; ++k)
            checksums[k] = crc32_combine_shifted(shift, checksums[k], run_checksums[r * n_clients + k]);
    }
}

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

inline double random_sign(std::uint64_t key, std::size_t index) { return (random_bits(key, index) >> 63) ? 1.0 : -1.0; }

// out (padded length, a multiple of chunk) = H D pad(x), blockwise: D are seeded random signs.
template <class Source>
void rotate(const Source* x, std::size_t n, std::size_t chunk, std::uint64_t key, double* out, std::size_t padded) {
    parallel_for(padded / chunk, 1, chunk * 8, [&](std::size_t first, std::size_t last) {
        for (std::size_t block = first; block < last; ++block) {
            double* y = out + block * chunk;
            for (std::size_t j = 0; j < chunk; ++j) {
                const std::size_t i = block * chunk + j;
                y[j] = i < n ? static_cast<double>(x[i]) * random_sign(key, i) : 0.0;
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
                if (i < n) out[i] = static_cast<Output>(z[j] * random_sign(key, i));
            }
        }
    });
}

}  // namespace fastfed::quantize
