// Memory traffic of the native aggregation kernel, counted by a cache simulator
// (benchmarks/test_memory_traffic_bench.py runs this under valgrind's cachegrind).
//
// Usage: traffic_driver K N MODE. Allocates and fills K float32 clients of N values and a float32
// output; MODE "mean" then runs fastfed::aggregate::weighted_sum (the kernel behind
// fastfed.weighted_mean), MODE "base" does not. The difference in last-level cache misses between
// the two runs is the traffic of the kernel alone.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "aggregate/aggregate.hpp"

int main(int argc, char** argv) {
    if (argc != 4) return 2;
    const std::size_t clients = std::strtoul(argv[1], nullptr, 10), n = std::strtoul(argv[2], nullptr, 10);
    std::vector<std::vector<float>> data(clients, std::vector<float>(n));
    std::vector<const float*> sources;
    std::vector<double> weights;
    for (std::size_t k = 0; k < clients; ++k) {
        for (std::size_t i = 0; i < n; ++i) data[k][i] = static_cast<float>((i + k) % 17);
        sources.push_back(data[k].data());
        weights.push_back(1.0 + static_cast<double>(k));
    }
    std::vector<float> out(n, 0.0f);
    if (std::strcmp(argv[3], "mean") == 0) fastfed::aggregate::weighted_sum(sources, weights.data(), 1.0, out.data(), n);
    std::printf("%f\n", static_cast<double>(out[n / 2]));  // keeps the result observable
    return 0;
}
