// Weighted sums of K client buffers, the hot path of federated averaging (McMahan et al. 2017).
//
// Aggregation is memory-bound: its floor is one streaming read of the K inputs. The parameters are
// cut into tiles small enough that a float64 accumulator tile stays in L1 while all K clients
// stream through it, so each input byte is read once and the accumulator never goes to memory.
// Every element is summed in the same order as the NumPy reference, acc = ((0 + w0*x0) + w1*x1) + ...,
// in float64 and without FMA contraction, so all backends give bit-identical results.
#pragma once

#include <cstddef>
#include <vector>

#include "../common/cpu.hpp"
#include "../common/parallel.hpp"
#include "../common/scalar.hpp"

namespace fastfed::aggregate {

inline constexpr std::size_t kTile = 2048;  // 16 KiB of float64 accumulator

// out[i] = (sum_k weights[k] * sources[k][i]) / divisor, for i in [0, n).
template <class Source, class Output>
void weighted_sum(const std::vector<const Source*>& sources, const double* weights, double divisor, Output* out, std::size_t n) {
    const std::size_t n_sources = sources.size();
    const std::size_t n_tiles = (n + kTile - 1) / kTile;
    parallel_for(n_tiles, 1, n_sources * kTile, [&](std::size_t first_tile, std::size_t end_tile) {
        run_vectorized([&] {
            double acc[kTile];
            for (std::size_t tile = first_tile; tile < end_tile; ++tile) {
                const std::size_t begin = tile * kTile;
                const std::size_t length = std::min(kTile, n - begin);
                for (std::size_t i = 0; i < length; ++i) acc[i] = 0.0;
                std::size_t k = 0;
                // Eight clients per sweep: the accumulator is loaded and stored once per eight inputs
                // instead of once per input, while each element still adds clients in order 0, 1, 2...
                for (; k + 8 <= n_sources; k += 8) {
                    const Source* s[8];
                    double w[8];
                    for (std::size_t j = 0; j < 8; ++j) {
                        s[j] = sources[k + j] + begin;
                        w[j] = weights[k + j];
                    }
                    for (std::size_t i = 0; i < length; ++i) {
                        double sum = acc[i];
                        sum += w[0] * to_double(s[0][i]);
                        sum += w[1] * to_double(s[1][i]);
                        sum += w[2] * to_double(s[2][i]);
                        sum += w[3] * to_double(s[3][i]);
                        sum += w[4] * to_double(s[4][i]);
                        sum += w[5] * to_double(s[5][i]);
                        sum += w[6] * to_double(s[6][i]);
                        sum += w[7] * to_double(s[7][i]);
                        acc[i] = sum;
                    }
                }
                for (; k < n_sources; ++k) {
                    const double weight = weights[k];
                    const Source* source = sources[k] + begin;
                    for (std::size_t i = 0; i < length; ++i) acc[i] += weight * to_double(source[i]);
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
