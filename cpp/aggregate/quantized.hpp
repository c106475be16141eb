// Weighted means of K quantized tensors of one bit width, summed from their packed levels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/cpu.hpp"
#include "../common/crc32.hpp"
#include "../common/pack.hpp"
#include "../common/parallel.hpp"
#include "aggregate.hpp"

#if defined(FASTFED_X86_DISPATCH)
#include <immintrin.h>
#endif

namespace fastfed::aggregate {

using pack::packed_bytes;
using pack::unpack_range;

// out[i] = (sum over clients of scales[k] * q_k[i] + offset) / divisor, for K packed tensors of one
// bit width: the batched path of fastfed.weighted_mean_encoded. Also continues checksums[k] over
// packed[k] (zlib's CRC-32), so the payloads are verified in the same pass that reads them.
//
// With x = min + step * q, a weighted mean is (sum_k w_k min_k + sum_k (w_k step_k) q_k) / W; the
// caller passes offset = sum_k w_k min_k and scales = w_k step_k, and the level sums are computed
// here reading each packed byte once from memory. Parameters are tiled as in aggregate.hpp, with
// the float64 accumulator tile in cache. Within a tile, blocks of eight clients are first
// checksummed, then (now cache-hot) summed in float32 (scale_k * q_k added in client order,
// starting from zero), and each block sum is added to the tile. The float32 part carries only
// values relative to each tensor's range, so its rounding stays orders of magnitude below the
// quantization step.
inline constexpr std::size_t kQuantizedTile = 16384;  // a multiple of 8, so every tile starts on a byte
// Floats after the clients' scaled rows in weighted_sum_levels' vector paths: room for the widest
// load that starts inside the rows.
inline constexpr std::size_t kRowsSpare = 16;

#if defined(FASTFED_X86_DISPATCH)
// The clients whose bytes are checksummed next, prefetched while a block of clients is summed: the
// rest of the tile's clients, then the next tile's, from `at` on. `bytes`: how far past `at` each
// may be read (the shorter of the two tiles' lengths, so that no address passes a stream's end).
struct next_clients {
    const std::uint8_t* at[kClientBlock];
    std::size_t count = 0, bytes = 0;

    // The same clients `offset` bytes further on.
    next_clients advanced(std::size_t offset) const {
        next_clients later = *this;
        for (std::size_t j = 0; j < count; ++j) later.at[j] += offset;
        later.bytes = bytes > offset ? bytes - offset : 0;
        if (later.bytes == 0) later.count = 0;
        return later;
    }

    // Prefetches their bytes at `offset` once per 64 bytes: when [offset, offset + width) starts a
    // new line of them.
    FASTFED_TARGET("avx2") void prefetch(std::size_t offset, std::size_t width) const {
        if ((offset & 63) < width && offset < bytes)
            for (std::size_t j = 0; j < count; ++j) prefetch_line(at[j] + offset);
    }
};

// The next clients of a block ending at client `last` in tile `tile` (see next_clients).
inline next_clients clients_after(const std::vector<const std::uint8_t*>& packed, std::size_t last, std::size_t tile, std::size_t end_tile,
                                  unsigned bits, std::size_t total_bytes) {
    const std::size_t first_byte = tile * kQuantizedTile / 8 * bits;
    const std::size_t tile_bytes = std::min(total_bytes, (tile + 1) * kQuantizedTile / 8 * bits) - first_byte;
    next_clients next;
    next.bytes = tile_bytes;
    for (std::size_t k = last; k < packed.size() && next.count < kClientBlock; ++k) next.at[next.count++] = packed[k] + first_byte;
    if (tile + 1 < end_tile && next.count < kClientBlock) {
        const std::size_t following = std::min(total_bytes, (tile + 2) * kQuantizedTile / 8 * bits) - first_byte - tile_bytes;
        next.bytes = std::min(next.bytes, following);
        for (std::size_t k = 0; k < packed.size() && next.count < kClientBlock; ++k)
            next.at[next.count++] = packed[k] + first_byte + tile_bytes;
    }
    return next;
}

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
FASTFED_TARGET("avx2")
std::size_t sum_clients_avx2(const std::uint8_t* const* q, const float* scales, double* acc, std::size_t length, const next_clients& next) {
    __m256 scale[Clients];
    for (std::size_t j = 0; j < Clients; ++j) scale[j] = _mm256_set1_ps(scales[j]);
    std::size_t i = 0;
    // Two independent groups of eight per step, so the dependent adds of one hide the other's.
    for (; i + 16 <= length; i += 16) {
        next.prefetch(i, 16);
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

inline std::size_t sum_clients_avx2(std::size_t clients, const std::uint8_t* const* q, const float* scales, double* acc, std::size_t length,
                                    const next_clients& next) {
    return with_client_count(clients, [&](auto count) { return sum_clients_avx2<count()>(q, scales, acc, length, next); });
}
#endif

template <class Output>
void sum_quantized_tiles(const std::vector<const std::uint8_t*>& packed, unsigned bits, const float* scales, double offset, double divisor,
                         Output* out, std::size_t n, std::size_t first_tile, std::size_t end_tile, std::uint32_t* checksums) {
    const std::size_t n_clients = packed.size();
    const std::size_t total_bytes = packed_bytes(n, bits);
    std::vector<double> acc_storage(kQuantizedTile);
    std::vector<float> block_storage(kQuantizedTile);
    double* FASTFED_RESTRICT acc = acc_storage.data();
    float* FASTFED_RESTRICT block_sum = block_storage.data();
    [[maybe_unused]] const bool use_avx2 = active_isa() >= isa::avx2;
    for (std::size_t tile = first_tile; tile < end_tile; ++tile) {
        const std::size_t begin = tile * kQuantizedTile;
        const std::size_t length = std::min(kQuantizedTile, n - begin);
        const std::size_t first_byte = begin / 8 * bits;
        const std::size_t tile_bytes = std::min(total_bytes, (begin + kQuantizedTile) / 8 * bits) - first_byte;
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
                    done = sum_clients_avx2(clients, q, scale, acc, length, clients_after(packed, last, tile, end_tile, bits, total_bytes));
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
                    unpack_range(packed[k], begin, begin + length, bits,
                                 [&](std::size_t i, std::uint32_t level) { block_sum[i - begin] += scale * static_cast<float>(level); });
                }
            }
            for (std::size_t i = 0; i < length; ++i) acc[i] += static_cast<double>(block_sum[i]);
        }
        for (std::size_t i = 0; i < length; ++i) out[begin + i] = static_cast<Output>((acc[i] + offset) / divisor);
    }
}

// Runs sum_tiles(first_tile, end_tile, checksums) over contiguous runs of tiles, about eight per
// thread for balance: each run checksums its own byte range from zero, and the runs' CRCs are combined
// into checksums[k] in order afterwards.
template <class SumTiles>
void for_tile_runs(std::size_t n_clients, unsigned bits, std::size_t n, std::uint32_t* checksums, SumTiles&& sum_tiles) {
    const std::size_t n_tiles = (n + kQuantizedTile - 1) / kQuantizedTile;
    const std::size_t run = std::max<std::size_t>(1, n_tiles / (8 * num_threads()));
    const std::size_t n_runs = (n_tiles + run - 1) / run;
    std::vector<std::uint32_t> run_checksums(n_runs * n_clients, 0);
    parallel_for(n_runs, 1, run * n_clients * kQuantizedTile / 4, [&](std::size_t first_run, std::size_t end_run) {
        for (std::size_t r = first_run; r < end_run; ++r)
            run_vectorized([&] { sum_tiles(r * run, std::min(n_tiles, (r + 1) * run), run_checksums.data() + r * n_clients); });
    });
    const std::size_t total_bytes = packed_bytes(n, bits);
    const std::uint32_t full_run_shift = crc32_shift(run * kQuantizedTile / 8 * bits);  // all runs but the last
    for (std::size_t r = 0; r < n_runs; ++r) {
        const std::size_t first_byte = r * run * kQuantizedTile / 8 * bits;
        const std::size_t run_bytes = std::min(total_bytes, (r + 1) * run * kQuantizedTile / 8 * bits) - first_byte;
        const std::uint32_t shift = r + 1 < n_runs ? full_run_shift : crc32_shift(run_bytes);
        for (std::size_t k = 0; k < n_clients; ++k)
            checksums[k] = crc32_combine_shifted(shift, checksums[k], run_checksums[r * n_clients + k]);
    }
}

template <class Output>
void weighted_sum_quantized(const std::vector<const std::uint8_t*>& packed, unsigned bits, const float* scales, double offset,
                            double divisor, Output* out, std::size_t n, std::uint32_t* checksums) {
    for_tile_runs(packed.size(), bits, n, checksums, [&](std::size_t first_tile, std::size_t end_tile, std::uint32_t* run_checksums) {
        sum_quantized_tiles(packed, bits, scales, offset, divisor, out, n, first_tile, end_tile, run_checksums);
    });
}

// ---- weighted_sum_levels: per-block scales, values from a table with rows shared per group of 8 ----

// What each client's levels stand for in weighted_sum_levels.
struct level_values {
    const float* scales;  // (clients, n / block): the scale of each client's block
    std::size_t block;
    const float* table;  // (rows, 2^bits) followed by 8 spare floats, or nullptr for the levels themselves
    std::size_t rows;
    const std::uint32_t* row_parameters;  // (clients, 2): row offset and row stride
    const double* offsets;                // (n / block, period) added per block and group of eight, or nullptr
    std::size_t period;

    float scale(std::size_t k, std::size_t i, std::size_t blocks) const { return scales[k * blocks + i / block]; }
    std::size_t row(std::size_t k, std::size_t i) const {
        return static_cast<std::size_t>((std::uint64_t{row_parameters[2 * k + 1]} * (i >> 3) + row_parameters[2 * k]) & (rows - 1));
    }
};

#if defined(FASTFED_X86_DISPATCH)
// Where scale_rows puts group t's rows: client j's at scaled_group(...) + 2 * Levels * j.
template <std::size_t Levels, class Float>
inline Float* scaled_group(Float* scaled, std::size_t clients, std::size_t t) {
    return scaled + ((t >> 1) * 2 * clients + (t & 1)) * Levels;
}

// Each client's rows in the order its groups visit them, from the segment's first group on, and
// multiplied by its scale (the float32 products of multiplying each value; `scaled`: room for
// kClientBlock * max(rows, 2) * Levels + kRowsSpare floats). A row repeats every `rows` groups, so
// group t reads entry t mod rows. Laid out by pairs of groups, client after client: a client's rows
// t and t + 1 side by side (the AVX-512 kernel reads both at once), and the clients' rows of a group
// at fixed distances from one address, so that the kernels need no pointer per client.
template <std::size_t Levels>
FASTFED_TARGET("avx2")
inline void scale_rows(std::size_t first, std::size_t clients, const level_values& values, std::size_t blocks, std::size_t begin,
                       float* scaled) {
    for (std::size_t j = 0; j < clients; ++j) {
        const float scale = values.scale(first + j, begin, blocks);
        const __m256 factor = _mm256_set1_ps(scale);
        for (std::size_t t = 0; t < values.rows; ++t) {
            const float* row = values.table + values.row(first + j, begin + 8 * t) * Levels;
            float* scaled_row = scaled_group<Levels>(scaled, clients, t) + 2 * Levels * j;
            if constexpr (Levels >= 8) {
                for (std::size_t q = 0; q < Levels; q += 8)
                    _mm256_storeu_ps(scaled_row + q, _mm256_mul_ps(factor, _mm256_loadu_ps(row + q)));
            } else if constexpr (Levels == 4) {
                _mm_storeu_ps(scaled_row, _mm_mul_ps(_mm256_castps256_ps128(factor), _mm_loadu_ps(row)));
            } else {
                for (std::size_t q = 0; q < Levels; ++q) scaled_row[q] = scale * row[q];
            }
        }
    }
}

// One client's table values for a group of eight: the level bits in `word` (value m at bit Bits * m),
// each picked from the client's scaled row `own` by a permutation.
template <unsigned Bits>
FASTFED_TARGET("avx2")
inline __m256 table_values(__m256i word, const float* own) {
    const __m256i shifts = _mm256_setr_epi32(0, Bits, 2 * Bits, 3 * Bits, 4 * Bits, 5 * Bits, 6 * Bits, 7 * Bits);
    const __m256i shifted = _mm256_srlv_epi32(word, shifts);
    // A permutation reads the low three bits of each index: at 3 and 4 bits no mask is needed, and at
    // 4 bits the fourth bit picks the row's half.
    if constexpr (Bits == 4)
        return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(own), shifted),
                                _mm256_permutevar8x32_ps(_mm256_loadu_ps(own + 8), shifted),
                                _mm256_castsi256_ps(_mm256_slli_epi32(shifted, 28)));
    if constexpr (Bits == 3) return _mm256_permutevar8x32_ps(_mm256_loadu_ps(own), shifted);
    return _mm256_permutevar8x32_ps(_mm256_loadu_ps(own), _mm256_and_si256(shifted, _mm256_set1_epi32((1 << Bits) - 1)));
}

// A group's level bits, the four bytes at `source` broadcast to every lane.
FASTFED_TARGET("avx2") inline __m256i level_word(const std::uint8_t* source) {
    return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(source)));
}

// acc[0, 8) += the float32 sum of eight values.
FASTFED_TARGET("avx2") inline void add_group(double* acc, __m256 sum) {
    _mm256_storeu_pd(acc, _mm256_add_pd(_mm256_loadu_pd(acc), _mm256_cvtps_pd(_mm256_castps256_ps128(sum))));
    _mm256_storeu_pd(acc + 4, _mm256_add_pd(_mm256_loadu_pd(acc + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(sum, 1))));
}

// sum_table_groups_avx2 for `groups` groups whose level words lie inside every stream, with the
// client count fixed so that the loop over clients unrolls (its bookkeeping cost as much as the values).
template <unsigned Bits, std::size_t Clients>
FASTFED_TARGET("avx2")
void sum_table_groups_inside(const std::uint8_t* const* streams, const float* scaled, std::size_t rows, std::size_t groups, double* acc,
                             const next_clients& next) {
    constexpr std::size_t kLevels = std::size_t{1} << Bits;
    const std::uint8_t* own[Clients];
    for (std::size_t j = 0; j < Clients; ++j) own[j] = streams[j];
    // Two groups at a time, two sums: independent chains of additions for the out-of-order core.
    std::size_t g = 0, t = 0;
    for (; g + 2 <= groups; g += 2, t = (t + 2) & (rows - 1)) {
        next.prefetch(g * Bits, 2 * Bits);
        const float* group_rows = scaled_group<kLevels>(scaled, Clients, t);
        const float* next_rows = scaled_group<kLevels>(scaled, Clients, (t + 1) & (rows - 1));
        __m256 sum = _mm256_setzero_ps(), sum_next = _mm256_setzero_ps();
        for (std::size_t j = 0; j < Clients; ++j) {
            sum = _mm256_add_ps(sum, table_values<Bits>(level_word(own[j] + g * Bits), group_rows + 2 * kLevels * j));
            sum_next = _mm256_add_ps(sum_next, table_values<Bits>(level_word(own[j] + (g + 1) * Bits), next_rows + 2 * kLevels * j));
        }
        add_group(acc + 8 * g, sum);
        add_group(acc + 8 * (g + 1), sum_next);
    }
    for (; g < groups; ++g, t = (t + 1) & (rows - 1)) {
        next.prefetch(g * Bits, Bits);
        const float* group_rows = scaled_group<kLevels>(scaled, Clients, t);
        __m256 sum = _mm256_setzero_ps();
        for (std::size_t j = 0; j < Clients; ++j)
            sum = _mm256_add_ps(sum, table_values<Bits>(level_word(own[j] + g * Bits), group_rows + 2 * kLevels * j));
        add_group(acc + 8 * g, sum);
    }
}

// Eight clients' table values for the groups of eight values in [begin, end) (inside one block),
// summed in a register in client order and added to acc (relative to begin). Bits = 1..4: a row of
// 2^Bits floats is one or two registers, and a permutation picks each value's level from the client's
// scaled row (scale_rows).
//
// The shuffle port is the limit here, so each client's level bits are broadcast straight from memory
// (four bytes, where they lie inside the stream) rather than moved into a register and shuffled.
template <unsigned Bits>
FASTFED_TARGET("avx2")
void sum_table_groups_avx2(const std::uint8_t* const* packed, std::size_t first, std::size_t clients, const level_values& values,
                           std::size_t blocks, std::size_t begin, std::size_t end, double* acc, float* scaled, std::size_t total_bytes,
                           const next_clients& next = {}) {
    constexpr std::size_t kLevels = std::size_t{1} << Bits;
    const std::size_t rows = values.rows;
    scale_rows<kLevels>(first, clients, values, blocks, begin, scaled);
    // The groups before the stream's last four bytes (begin is a multiple of 8), then the rest.
    const std::size_t inside_groups = total_bytes < 4 ? 0 : (total_bytes - 4) / Bits + 1;
    const std::size_t groups = std::min((end - begin) / 8, inside_groups > begin / 8 ? inside_groups - begin / 8 : 0);
    const std::uint8_t* streams[kClientBlock];
    for (std::size_t j = 0; j < clients; ++j) streams[j] = packed[first + j] + begin / 8 * Bits;
    with_client_count(clients, [&](auto count) { sum_table_groups_inside<Bits, count()>(streams, scaled, rows, groups, acc, next); });
    for (std::size_t i = begin + 8 * groups, t = groups & (rows - 1); i < end; i += 8, t = (t + 1) & (rows - 1)) {
        const std::size_t byte = i / 8 * Bits;
        __m256 sum = _mm256_setzero_ps();
        for (std::size_t j = 0; j < clients; ++j) {
            std::uint32_t bytes = 0;
            std::memcpy(&bytes, packed[first + j] + byte, Bits);
            sum = _mm256_add_ps(sum, table_values<Bits>(_mm256_set1_epi32(static_cast<int>(bytes)),
                                                        scaled_group<kLevels>(scaled, clients, t) + 2 * kLevels * j));
        }
        add_group(acc + (i - begin), sum);
    }
}

FASTFED_AVX512_BEGIN
// Bytes read per client for a pair of groups: at 4 bits the pair's 64 bits are broadcast per 64-bit
// lane, so even lanes see group t's 32 bits and odd lanes group t + 1's; narrower pairs fit one
// 32-bit word, group t + 1 from bit 8 * Bits.
template <unsigned Bits>
inline constexpr std::size_t kPairWordBytes = Bits == 4 ? 8 : 4;

// sum_table_pairs_avx512's lane constants: lane 2m + h holds value m of group t + h.
template <unsigned Bits>
struct pair_lanes {
    static_assert(Bits == 1 || Bits == 2 || Bits == 4, "a pair of groups' levels is read as one 32- or 64-bit word");
    static constexpr std::size_t kLevels = std::size_t{1} << Bits;
    __m512i shifts, second_row, level_mask, in_order;

    FASTFED_TARGET("avx2,avx512f") pair_lanes() {
        constexpr int kPairShift = Bits == 4 ? 0 : 8 * static_cast<int>(Bits);
        constexpr int kSecondRow = Bits == 4 ? 16 : static_cast<int>(kLevels);  // where group t + 1's row starts among the permuted entries
        alignas(64) std::int32_t shift_of[16], row_of[16];
        for (int lane = 0; lane < 16; ++lane) {
            shift_of[lane] = static_cast<int>(Bits) * (lane / 2) + kPairShift * (lane % 2);
            row_of[lane] = kSecondRow * (lane % 2);
        }
        shifts = _mm512_load_si512(shift_of);
        second_row = _mm512_load_si512(row_of);
        level_mask = _mm512_set1_epi32(static_cast<int>(kLevels - 1));
        in_order = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    }

    // A pair of groups' level bits at `source`, broadcast: 64 bits per 64-bit lane at 4 bits, else 32
    // per 32-bit lane.
    FASTFED_TARGET("avx2,avx512f") static __m512i word(const std::uint8_t* source) {
        return Bits == 4 ? _mm512_broadcastq_epi64(_mm_loadu_si64(source)) : _mm512_broadcastd_epi32(_mm_loadu_si32(source));
    }

    // One client's values of a pair of groups, from the pair's level bits and the client's rows t, t + 1.
    FASTFED_TARGET("avx2,avx512f") __m512 values(__m512i word, const float* own) const {
        // (word >> shift) & (levels - 1) | second_row: the level's entry among both rows.
        const __m512i entry = _mm512_ternarylogic_epi32(_mm512_srlv_epi32(word, shifts), level_mask, second_row, 0xEA);
        if constexpr (Bits == 4) return _mm512_permutex2var_ps(_mm512_loadu_ps(own), entry, _mm512_loadu_ps(own + kLevels));
        return _mm512_permutexvar_ps(entry, _mm512_loadu_ps(own));
    }

    // acc[0, 16) += the pair's sums, de-interleaved.
    FASTFED_TARGET("avx2,avx512f") void add(double* acc, __m512 sum) const {
        const __m512 ordered = _mm512_permutexvar_ps(in_order, sum);
        _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), _mm512_cvtps_pd(_mm512_castps512_ps256(ordered))));
        _mm512_storeu_pd(acc + 8, _mm512_add_pd(_mm512_loadu_pd(acc + 8),
                                                _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(ordered), 1)))));
    }
};

// sum_table_pairs_avx512 for `pairs` pairs of groups whose words lie inside every stream, with the
// client count fixed so that the loop over clients unrolls. Each client's level bits are broadcast
// straight from memory, which needs no shuffle port.
template <unsigned Bits, std::size_t Clients>
FASTFED_TARGET("avx2,avx512f")
void sum_table_pairs_inside(const pair_lanes<Bits>& lanes, const std::uint8_t* const* streams, const float* scaled, std::size_t rows,
                            std::size_t pairs, double* acc, const next_clients& next) {
    constexpr std::size_t kLevels = pair_lanes<Bits>::kLevels;
    const std::uint8_t* own[Clients];
    for (std::size_t j = 0; j < Clients; ++j) own[j] = streams[j];
    // Two pairs at a time, two sums: independent chains of additions for the out-of-order core.
    std::size_t p = 0, t = 0;
    for (; p + 2 <= pairs; p += 2, t = (t + 4) & (rows - 1)) {
        next.prefetch(2 * p * Bits, 4 * Bits);
        const float* pair_rows = scaled_group<kLevels>(scaled, Clients, t);
        const float* next_rows = scaled_group<kLevels>(scaled, Clients, (t + 2) & (rows - 1));
        __m512 sum = _mm512_setzero_ps(), sum_next = _mm512_setzero_ps();
        for (std::size_t j = 0; j < Clients; ++j) {
            sum = _mm512_add_ps(sum, lanes.values(lanes.word(own[j] + 2 * p * Bits), pair_rows + 2 * kLevels * j));
            sum_next = _mm512_add_ps(sum_next, lanes.values(lanes.word(own[j] + 2 * (p + 1) * Bits), next_rows + 2 * kLevels * j));
        }
        lanes.add(acc + 16 * p, sum);
        lanes.add(acc + 16 * (p + 1), sum_next);
    }
    for (; p < pairs; ++p, t = (t + 2) & (rows - 1)) {
        next.prefetch(2 * p * Bits, 2 * Bits);
        const float* pair_rows = scaled_group<kLevels>(scaled, Clients, t);
        __m512 sum = _mm512_setzero_ps();
        for (std::size_t j = 0; j < Clients; ++j)
            sum = _mm512_add_ps(sum, lanes.values(lanes.word(own[j] + 2 * p * Bits), pair_rows + 2 * kLevels * j));
        lanes.add(acc + 16 * p, sum);
    }
}

// sum_table_groups_avx2 with AVX-512 at 1, 2 and 4 bits, two groups of eight (t and t + 1) per step:
// lane 2m + h holds value m of group t + h, so one broadcast of both groups' level bits and one
// permutation from both groups' rows (one register, or two at 4 bits) give sixteen values. The sums
// are de-interleaved once per step, after all clients: the same float32 sums in client order as the
// AVX2 path, so the same bits. The rows repeat every `rows` groups, an even number, so a client's
// rows t and t + 1 (t even) lie side by side in scale_rows' layout.
template <unsigned Bits>
FASTFED_TARGET("avx2,avx512f")
void sum_table_pairs_avx512(const std::uint8_t* const* packed, std::size_t first, std::size_t clients, const level_values& values,
                            std::size_t blocks, std::size_t begin, std::size_t end, double* acc, float* scaled, std::size_t total_bytes,
                            const next_clients& next) {
    constexpr std::size_t kLevels = std::size_t{1} << Bits;
    const std::size_t rows = values.rows;
    scale_rows<kLevels>(first, clients, values, blocks, begin, scaled);
    const pair_lanes<Bits> lanes;
    // The pairs whose words lie inside every stream (begin is a multiple of 8) with the client count
    // fixed, so that the loop over clients unrolls; then the rest.
    const std::size_t inside_groups = total_bytes < kPairWordBytes<Bits> ? 0 : (total_bytes - kPairWordBytes<Bits>) / Bits + 1;
    const std::size_t pairs = std::min((end - begin) / 16, inside_groups > begin / 8 ? (inside_groups - begin / 8) / 2 : 0);
    const std::uint8_t* streams[kClientBlock];
    for (std::size_t j = 0; j < clients; ++j) streams[j] = packed[first + j] + begin / 8 * Bits;
    with_client_count(clients, [&](auto count) { sum_table_pairs_inside<Bits, count()>(lanes, streams, scaled, rows, pairs, acc, next); });
    std::size_t i = begin + 16 * pairs, t = (2 * pairs) & (rows - 1);
    for (; i + 16 <= end; i += 16, t = (t + 2) & (rows - 1)) {
        const std::size_t byte = i / 8 * Bits;
        __m512 sum = _mm512_setzero_ps();
        for (std::size_t j = 0; j < clients; ++j) {
            std::uint64_t bits = 0;
            std::memcpy(&bits, packed[first + j] + byte, 2 * Bits);
            const __m512i word = Bits == 4 ? _mm512_set1_epi64(static_cast<long long>(bits)) : _mm512_set1_epi32(static_cast<int>(bits));
            sum = _mm512_add_ps(sum, lanes.values(word, scaled_group<kLevels>(scaled, clients, t) + 2 * kLevels * j));
        }
        lanes.add(acc + (i - begin), sum);
    }
    if (i < end) sum_table_groups_avx2<Bits>(packed, first, clients, values, blocks, i, end, acc + (i - begin), scaled, total_bytes);
}
FASTFED_AVX512_END

// Whether sum_level_segment_avx2 has a vector path for these values.
inline bool vector_levels(unsigned bits, const level_values& values) { return values.table != nullptr ? bits <= 4 : bits == 8; }

// One segment (inside one block) of up to eight clients, as sum_level_tiles's scalar loop does it;
// `next` are the clients whose bytes are checksummed next, prefetched meanwhile.
inline void sum_level_segment_avx2(const std::vector<const std::uint8_t*>& packed, unsigned bits, std::size_t first, std::size_t last,
                                   const level_values& values, std::size_t blocks, std::size_t start, std::size_t stop, double* acc,
                                   float* scaled, const next_clients& next) {
    const std::size_t clients = last - first, total = packed_bytes(blocks * values.block, bits);
    // The next clients' bytes of this segment (`next` are at the tile's start).
    const next_clients ahead = next.advanced(start % kQuantizedTile / 8 * bits);
    // The AVX-512 kernel reads two consecutive rows per step, so tables need at least two.
    if (values.table != nullptr && values.rows >= 2 && active_isa() >= isa::avx512 && (bits == 1 || bits == 2 || bits == 4)) {
        if (bits == 1)
            return sum_table_pairs_avx512<1>(packed.data(), first, clients, values, blocks, start, stop, acc, scaled, total, ahead);
        if (bits == 2)
            return sum_table_pairs_avx512<2>(packed.data(), first, clients, values, blocks, start, stop, acc, scaled, total, ahead);
        return sum_table_pairs_avx512<4>(packed.data(), first, clients, values, blocks, start, stop, acc, scaled, total, ahead);
    }
    switch (values.table != nullptr ? bits : 0) {
        case 1: return sum_table_groups_avx2<1>(packed.data(), first, clients, values, blocks, start, stop, acc, scaled, total, ahead);
        case 2: return sum_table_groups_avx2<2>(packed.data(), first, clients, values, blocks, start, stop, acc, scaled, total, ahead);
        case 3: return sum_table_groups_avx2<3>(packed.data(), first, clients, values, blocks, start, stop, acc, scaled, total, ahead);
        case 4: return sum_table_groups_avx2<4>(packed.data(), first, clients, values, blocks, start, stop, acc, scaled, total, ahead);
        default: {  // 8-bit levels themselves: the block summation of weighted_sum_quantized
            const std::uint8_t* q[kClientBlock];
            float scale[kClientBlock];
            for (std::size_t j = 0; j < clients; ++j) {
                q[j] = packed[first + j] + start;
                scale[j] = values.scale(first + j, start, blocks);
            }
            sum_clients_avx2(clients, q, scale, acc, stop - start, ahead);
        }
    }
}
#endif

// Each client's corrections to weighted_sum_levels' outputs (the shared-rotation mean's values beyond
// the table's support), as a payload stores them: counts[k] positions (uint32), then as many
// corrections (float32), both little-endian. Each tile adds those of its positions once its outputs
// are final, while they are in cache: out[p] += shares[k] * c, a float32 product, in client order.
struct level_corrections {
    std::vector<const std::uint8_t*> sources;  // empty: none
    std::vector<std::size_t> counts;
    const float* shares = nullptr;

    std::uint32_t position(std::size_t k, std::size_t i) const {
        std::uint32_t position;
        std::memcpy(&position, sources[k] + 4 * i, 4);
        return position;
    }
    float correction(std::size_t k, std::size_t i) const {
        float correction;
        std::memcpy(&correction, sources[k] + 4 * (counts[k] + i), 4);
        return correction;
    }

    // The first client whose positions do not increase or reach n, or whose corrections are not
    // finite or exceed `limit` in magnitude, or -1. Checked before any is added, so that a tile can
    // find its first correction by bisection.
    std::ptrdiff_t first_invalid(double limit, std::size_t n) const {
        for (std::size_t k = 0; k < sources.size(); ++k) {
            std::uint64_t lowest = 0;
            for (std::size_t i = 0; i < counts[k]; ++i) {
                const std::uint32_t at = position(k, i);
                if (at < lowest || at >= n || !(std::fabs(static_cast<double>(correction(k, i))) <= limit))
                    return static_cast<std::ptrdiff_t>(k);
                lowest = std::uint64_t{at} + 1;
            }
        }
        return -1;
    }

    // cursors[k] = client k's first correction at or after position `begin`.
    void seek(std::size_t begin, std::size_t* cursors) const {
        for (std::size_t k = 0; k < sources.size(); ++k) {
            std::size_t low = 0, high = counts[k];
            while (low < high) {
                const std::size_t middle = low + (high - low) / 2;
                if (position(k, middle) < begin)
                    low = middle + 1;
                else
                    high = middle;
            }
            cursors[k] = low;
        }
    }

    // Adds each client's corrections from cursors[k] on that lie before `end`, advancing the cursors.
    template <class Output>
    void add(Output* out, std::size_t end, std::size_t* cursors) const {
        for (std::size_t k = 0; k < sources.size(); ++k) {
            std::size_t i = cursors[k];
            for (; i < counts[k] && position(k, i) < end; ++i) out[position(k, i)] += shares[k] * correction(k, i);
            cursors[k] = i;
        }
    }
};

template <class Output>
void sum_level_tiles(const std::vector<const std::uint8_t*>& packed, unsigned bits, const level_values& values,
                     const level_corrections& corrections, double divisor, Output* out, std::size_t n, std::size_t first_tile,
                     std::size_t end_tile, std::uint32_t* checksums) {
    const std::size_t n_clients = packed.size(), blocks = n / values.block, levels = std::size_t{1} << bits;
    const std::size_t total_bytes = packed_bytes(n, bits);
    std::vector<double> acc_storage(kQuantizedTile);
    std::vector<float> block_storage(kQuantizedTile);
    double* FASTFED_RESTRICT acc = acc_storage.data();
    float* FASTFED_RESTRICT block_sum = block_storage.data();
    [[maybe_unused]] bool fast = false;
    [[maybe_unused]] std::vector<float> scaled_tables;
    std::vector<std::size_t> cursors(corrections.sources.size());
    corrections.seek(first_tile * kQuantizedTile, cursors.data());
#if defined(FASTFED_X86_DISPATCH)
    fast = active_isa() >= isa::avx2 && vector_levels(bits, values);
    if (fast && values.table != nullptr) scaled_tables.resize(kClientBlock * std::max<std::size_t>(values.rows, 2) * levels + kRowsSpare);
#endif
    for (std::size_t tile = first_tile; tile < end_tile; ++tile) {
        const std::size_t begin = tile * kQuantizedTile;
        const std::size_t length = std::min(kQuantizedTile, n - begin);
        const std::size_t first_byte = begin / 8 * bits;
        const std::size_t tile_bytes = std::min(total_bytes, (begin + kQuantizedTile) / 8 * bits) - first_byte;
        for (std::size_t i = 0; i < length; ++i) acc[i] = 0.0;
        for (std::size_t first = 0; first < n_clients; first += kClientBlock) {
            const std::size_t last = std::min(n_clients, first + kClientBlock);
            for (std::size_t k = first; k < last; ++k) checksums[k] = crc32_update(checksums[k], packed[k] + first_byte, tile_bytes);
            // Segments of the tile inside one block, where each client's scale is constant.
            for (std::size_t start = begin; start < begin + length;) {
                const std::size_t stop = std::min(begin + length, (start / values.block + 1) * values.block);
#if defined(FASTFED_X86_DISPATCH)
                if (fast) {
                    sum_level_segment_avx2(packed, bits, first, last, values, blocks, start, stop, acc + (start - begin),
                                           scaled_tables.data(), clients_after(packed, last, tile, end_tile, bits, total_bytes));
                    start = stop;
                    continue;
                }
#endif
                for (std::size_t i = start; i < stop; ++i) block_sum[i - begin] = 0.0f;
                for (std::size_t k = first; k < last; ++k) {
                    const float scale = values.scale(k, start, blocks);
                    unpack_range(packed[k], start, stop, bits, [&](std::size_t i, std::uint32_t q) {
                        const float value = values.table != nullptr ? values.table[values.row(k, i) * levels + q] : static_cast<float>(q);
                        block_sum[i - begin] += scale * value;
                    });
                }
                for (std::size_t i = start; i < stop; ++i) acc[i - begin] += static_cast<double>(block_sum[i - begin]);
                start = stop;
            }
        }
        // The offsets of a block repeat every `period` groups of eight (zero without offsets).
        for (std::size_t start = begin; start < begin + length;) {
            const std::size_t stop = std::min(begin + length, (start / values.block + 1) * values.block);
            const double zero = 0.0;
            const double* offsets = values.offsets != nullptr ? values.offsets + start / values.block * values.period : &zero;
            const std::size_t mask = values.offsets != nullptr ? values.period - 1 : 0;
            for (std::size_t i = start; i < stop; ++i) out[i] = static_cast<Output>((acc[i - begin] + offsets[(i >> 3) & mask]) / divisor);
            start = stop;
        }
        corrections.add(out, begin + length, cursors.data());
    }
}

// out[i] = (sum_k scales[k, i / block] * value_k(i) + offsets[i / block, (i / 8) mod period]) / divisor
// plus the corrections (see fastfed.kernels.aggregate_numpy.weighted_sum_levels), and checksums[k]
// continued over packed[k], as weighted_sum_quantized. Returns corrections.first_invalid(limit, n):
// when it is not -1, nothing is summed.
template <class Output>
std::ptrdiff_t weighted_sum_levels(const std::vector<const std::uint8_t*>& packed, unsigned bits, const level_values& values,
                                   const level_corrections& corrections, double limit, double divisor, Output* out, std::size_t n,
                                   std::uint32_t* checksums) {
    const std::ptrdiff_t invalid = corrections.first_invalid(limit, n);
    if (invalid >= 0) return invalid;
    for_tile_runs(packed.size(), bits, n, checksums, [&](std::size_t first_tile, std::size_t end_tile, std::uint32_t* run_checksums) {
        sum_level_tiles(packed, bits, values, corrections, divisor, out, n, first_tile, end_tile, run_checksums);
    });
    return -1;
}

}  // namespace fastfed::aggregate
