// Weighted sums of K client buffers, the hot path of federated averaging (McMahan et al. 2017).
//
// Aggregation is memory-bound: its floor is one streaming read of the K inputs. The parameters are
// cut into tiles small enough that a float64 accumulator tile stays in L1 while all K clients
// stream through it, so each input byte is read once and the accumulator never goes to memory.
// Every element is summed in the same order as the NumPy reference, acc = ((0 + w0*x0) + w1*x1) + ...,
// in float64 and without FMA contraction, so all backends give bit-identical results.
#pragma once

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "../common/cpu.hpp"
#include "../common/parallel.hpp"
#include "../common/scalar.hpp"

namespace fastfed::aggregate {

inline constexpr std::size_t kTile = 2048;      // 16 KiB of float64 accumulator
inline constexpr std::size_t kClientBlock = 8;  // clients summed per pass over an accumulator tile

// run(std::integral_constant<std::size_t, clients>{}) for a block's 1..kClientBlock clients: kernels
// with the client count fixed at compile time, so that their loops over clients unroll.
template <class Run>
inline decltype(auto) with_client_count(std::size_t clients, Run&& run) {
    switch (clients) {
        case 1: return run(std::integral_constant<std::size_t, 1>{});
        case 2: return run(std::integral_constant<std::size_t, 2>{});
        case 3: return run(std::integral_constant<std::size_t, 3>{});
        case 4: return run(std::integral_constant<std::size_t, 4>{});
        case 5: return run(std::integral_constant<std::size_t, 5>{});
        case 6: return run(std::integral_constant<std::size_t, 6>{});
        case 7: return run(std::integral_constant<std::size_t, 7>{});
        default: return run(std::integral_constant<std::size_t, kClientBlock>{});
    }
}

// The clients a block reads next: the tile's following ones, then the next tile's first ones.
// Their lines are prefetched while the current block sums, one line each per line summed: each
// client's part of a tile is a short run (8 KiB of float32) that hardware prefetchers pick up only
// after several misses, and at K = 100 those misses held a Zen 5 core to 60% of its read rate.
template <class Source>
struct next_block {
    const Source* at[kClientBlock];
    std::size_t count = 0;
    std::size_t length = 0;  // elements readable from each of `at`: the shorter of the two tiles'

    next_block(const std::vector<const Source*>& sources, std::size_t first, std::size_t tile, std::size_t end_tile, std::size_t n) {
        const std::size_t begin = tile * kTile;
        length = std::min(kTile, n - begin);
        for (std::size_t k = first; k < sources.size() && count < kClientBlock; ++k) at[count++] = sources[k] + begin;
        if (count < kClientBlock && tile + 1 < end_tile) {
            length = std::min(length, n - begin - kTile);
            for (std::size_t k = 0; k < sources.size() && count < kClientBlock; ++k) at[count++] = sources[k] + begin + kTile;
        }
    }

    void prefetch(std::size_t offset) const {
        if (offset < length)
            for (std::size_t j = 0; j < count; ++j) prefetch_line(at[j] + offset);
    }
};

// out[i] = (sum_k weights[k] * sources[k][i]) / divisor, for i in [0, n).
template <class Source, class Output>
void weighted_sum(const std::vector<const Source*>& sources, const double* weights, double divisor, Output* out, std::size_t n) {
    const std::size_t n_sources = sources.size();
    const std::size_t n_tiles = (n + kTile - 1) / kTile;
    constexpr std::size_t kLine = 64 / sizeof(Source);  // elements per cache line
    parallel_for(n_tiles, 1, n_sources * kTile, [&](std::size_t first_tile, std::size_t end_tile) {
        run_vectorized([&] {
            double acc[kTile];
            for (std::size_t tile = first_tile; tile < end_tile; ++tile) {
                const std::size_t begin = tile * kTile;
                const std::size_t length = std::min(kTile, n - begin);
                for (std::size_t i = 0; i < length; ++i) acc[i] = 0.0;
                // Blocks of up to eight clients: the accumulator is loaded and stored once per block
                // instead of once per input, while each element still adds clients in order 0, 1, 2...
                for (std::size_t k = 0; k < n_sources; k += kClientBlock) {
                    with_client_count(std::min(kClientBlock, n_sources - k), [&](auto clients) {
                        const Source* s[clients];
                        double w[clients];
                        for (std::size_t j = 0; j < clients; ++j) {
                            s[j] = sources[k + j] + begin;
                            w[j] = weights[k + j];
                        }
                        const auto add_block = [&](std::size_t i) {
                            double sum = acc[i];
                            for (std::size_t j = 0; j < clients; ++j) sum += w[j] * to_double(s[j][i]);
                            acc[i] = sum;
                        };
                        const next_block<Source> next(sources, k + clients, tile, end_tile, n);
                        std::size_t line = 0;
                        for (; line + kLine <= length; line += kLine) {
                            next.prefetch(line);
                            for (std::size_t i = line; i < line + kLine; ++i) add_block(i);
                        }
                        for (std::size_t i = line; i < length; ++i) add_block(i);
                    });
                }
                for (std::size_t i = 0; i < length; ++i) out[begin + i] = static_cast<Output>(acc[i] / divisor);
            }
        });
    });
}

// acc[i] += weight * source[i]: one client into a streaming accumulator.
template <class Source>
void accumulate(double* acc, const Source* source, double weight, std::size_t n) {
    parallel_for(n, 1 << 16, 1, [&](std::size_t begin, std::size_t end) {
        run_vectorized([&] {
            for (std::size_t i = begin; i < end; ++i) acc[i] += weight * to_double(source[i]);
        });
    });
}

}  // namespace fastfed::aggregate
