// Coordinate-wise median and trimmed mean of K client buffers: the robust aggregators of Yin et al.
// 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".
//
// The coordinates are taken in groups of one cache line (16 float32 or 8 float64/int64 values).
// Each client's values for a group are copied into one row of a K-row block (the clients stream
// through once), and the block is sorted column-wise by a sorting network (Batcher 1968, odd-even
// merge sort) whose compare-exchanges are vector min/max over whole rows: O(K log^2 K) branch-free
// operations for all the group's coordinates at once, several times faster than a selection per
// coordinate. Beyond kNetworkLimit clients each coordinate is sorted on its own instead.
//
// The definitions, which the NumPy reference and the Numba twin follow exactly (so the three agree
// bit for bit), use each coordinate's K values in ascending order, s[0] <= ... <= s[K-1]:
// - A coordinate holding a NaN gives NaN. Infinities are ordered like numbers.
// - Median: s[K/2] for odd K; for even K the midpoint of s[K/2-1] and s[K/2], computed as
//   (lower + upper) * 0.5 in float64 (as NumPy's median), or lower * 0.5 + upper * 0.5 where that
//   sum overflows. Integers: the exact midpoint, rounded half to even.
// - Trimmed mean: s[cut] ... s[K-cut-1] summed in ascending order in float64, each divided by 2^h
//   (the smallest power of two >= K, so no sum can overflow), then divided by their count and
//   multiplied by 2^h. Integers: the exact mean, rounded half to even.
// - Float outputs are float64 with -0.0 written as +0.0, so no backend's order among equal zeros shows.
// - non_finite[k] is set to 1 when client k holds a NaN or an infinity (never cleared).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../common/cpu.hpp"
#include "../common/parallel.hpp"
#include "../common/scalar.hpp"

#if defined(FASTFED_X86_DISPATCH)
#include <immintrin.h>
#endif

namespace fastfed::aggregate {

inline constexpr std::size_t kRowBytes = 64;        // one cache line of coordinates per group
inline constexpr std::size_t kNetworkLimit = 4096;  // more clients: sort each coordinate on its own

// What a source element is compared and summed as: float16 widens to float (exact); integers map
// order-preservingly onto int64 (uint64 by flipping its top bit, i.e. subtracting 2^63).
template <class Source>
struct robust_traits {
    using value = std::conditional_t<std::is_floating_point_v<Source>, Source, std::int64_t>;
    static value load(Source x) {
        if constexpr (std::is_same_v<Source, std::uint64_t>)
            return static_cast<std::int64_t>(x ^ (std::uint64_t{1} << 63));
        else
            return static_cast<value>(x);
    }
    static Source store(std::int64_t x) {
        if constexpr (std::is_same_v<Source, std::uint64_t>)
            return static_cast<std::uint64_t>(x) ^ (std::uint64_t{1} << 63);
        else
            return static_cast<Source>(x);
    }
};
template <>
struct robust_traits<half_bits> {
    using value = float;
    static float load(half_bits x) { return half_to_float(x.bits); }
};

// float64 for float sources, the source type for integers.
template <class Source>
using robust_output = std::conditional_t<std::is_integral_v<Source>, Source, double>;

inline double float_midpoint(double lower, double upper) {
    const double sum = lower + upper;
    return std::isfinite(sum) ? sum * 0.5 : lower * 0.5 + upper * 0.5;
}

// floor((a + b) / 2) without overflow, then half to even.
inline std::int64_t integer_midpoint(std::int64_t a, std::int64_t b) {
    std::int64_t floor_half = (a >> 1) + (b >> 1) + (a & b & 1);
    if ((a ^ b) & 1) floor_half += floor_half & 1;
    return floor_half;
}

// The mean of `count` int64 values given as sum(x >> 32) and sum(x & 0xffffffff), rounded half to
// even: exact for count < 2^30 (the 96-bit sum is divided in two steps).
inline std::int64_t integer_mean(std::int64_t high_sum, std::int64_t low_sum, std::int64_t count) {
    std::int64_t high_quotient = high_sum / count;
    std::int64_t high_remainder = high_sum % count;
    if (high_remainder < 0) {
        high_remainder += count;
        high_quotient -= 1;
    }
    const std::int64_t rest = high_remainder * (std::int64_t{1} << 32) + low_sum;  // < count * 2^33
    const std::int64_t low_quotient = rest / count;
    const std::int64_t remainder = rest % count;
    std::int64_t quotient = high_quotient * (std::int64_t{1} << 32) + low_quotient;
    if (2 * remainder > count || (2 * remainder == count && (quotient & 1))) quotient += 1;
    return quotient;
}

// 2^h >= n: sums of n values divided by it cannot overflow.
inline double sum_headroom(std::size_t n) {
    double headroom = 1.0;
    while (headroom < static_cast<double>(n)) headroom *= 2.0;
    return headroom;
}

// Batcher's odd-even merge sort for the next power of two >= k, as (i, j) pairs with i < j: after
// compare-exchanging each pair in order, k values are sorted. Pairs reaching past k are left out:
// those positions hold +infinity in the padded network, so their exchanges never move anything.
inline std::vector<std::uint32_t> sorting_network(std::size_t k) {
    std::size_t n = 1;
    while (n < k) n <<= 1;
    std::vector<std::uint32_t> pairs;
    for (std::size_t p = 1; p < n; p <<= 1) {
        for (std::size_t q = p; q >= 1; q >>= 1) {
            for (std::size_t j = q % p; j + q < n; j += 2 * q) {
                for (std::size_t i = 0; i < std::min(q, n - j - q); ++i) {
                    if ((i + j) / (2 * p) == (i + j + q) / (2 * p) && i + j + q < k) {
                        pairs.push_back(static_cast<std::uint32_t>(i + j));
                        pairs.push_back(static_cast<std::uint32_t>(i + j + q));
                    }
                }
            }
        }
    }
    return pairs;
}

// Compare-exchanges rows a and b lane by lane (a gets the minima), for every pair of the network.
template <class Value>
void run_network_scalar(Value* rows, const std::vector<std::uint32_t>& pairs) {
    constexpr std::size_t lanes = kRowBytes / sizeof(Value);
    for (std::size_t p = 0; p < pairs.size(); p += 2) {
        Value* a = rows + pairs[p] * lanes;
        Value* b = rows + pairs[p + 1] * lanes;
        for (std::size_t l = 0; l < lanes; ++l) {
            const Value x = a[l], y = b[l];
            a[l] = y < x ? y : x;
            b[l] = y < x ? x : y;
        }
    }
}

#if defined(FASTFED_X86_DISPATCH)
// The same with AVX2: a row is two 256-bit vectors. Without NaN (such coordinates are set aside),
// min/max order the same values as the scalar version; only equal zeros may swap signs.
FASTFED_TARGET("avx2") inline void run_network_avx2(float* rows, const std::vector<std::uint32_t>& pairs) {
    for (std::size_t p = 0; p < pairs.size(); p += 2) {
        float* a = rows + pairs[p] * 16;
        float* b = rows + pairs[p + 1] * 16;
        const __m256 x0 = _mm256_load_ps(a), y0 = _mm256_load_ps(b), x1 = _mm256_load_ps(a + 8), y1 = _mm256_load_ps(b + 8);
        _mm256_store_ps(a, _mm256_min_ps(x0, y0));
        _mm256_store_ps(b, _mm256_max_ps(x0, y0));
        _mm256_store_ps(a + 8, _mm256_min_ps(x1, y1));
        _mm256_store_ps(b + 8, _mm256_max_ps(x1, y1));
    }
}
FASTFED_TARGET("avx2") inline void run_network_avx2(double* rows, const std::vector<std::uint32_t>& pairs) {
    for (std::size_t p = 0; p < pairs.size(); p += 2) {
        double* a = rows + pairs[p] * 8;
        double* b = rows + pairs[p + 1] * 8;
        const __m256d x0 = _mm256_load_pd(a), y0 = _mm256_load_pd(b), x1 = _mm256_load_pd(a + 4), y1 = _mm256_load_pd(b + 4);
        _mm256_store_pd(a, _mm256_min_pd(x0, y0));
        _mm256_store_pd(b, _mm256_max_pd(x0, y0));
        _mm256_store_pd(a + 4, _mm256_min_pd(x1, y1));
        _mm256_store_pd(b + 4, _mm256_max_pd(x1, y1));
    }
}
FASTFED_TARGET("avx2") inline void exchange_avx2(std::int64_t* a, std::int64_t* b) {
    const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(a));
    const __m256i y = _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
    const __m256i x_greater = _mm256_cmpgt_epi64(x, y);
    _mm256_store_si256(reinterpret_cast<__m256i*>(a), _mm256_blendv_epi8(x, y, x_greater));
    _mm256_store_si256(reinterpret_cast<__m256i*>(b), _mm256_blendv_epi8(y, x, x_greater));
}
FASTFED_TARGET("avx2") inline void run_network_avx2(std::int64_t* rows, const std::vector<std::uint32_t>& pairs) {
    for (std::size_t p = 0; p < pairs.size(); p += 2) {
        std::int64_t* a = rows + pairs[p] * 8;
        std::int64_t* b = rows + pairs[p + 1] * 8;
        exchange_avx2(a, b);
        exchange_avx2(a + 4, b + 4);
    }
}
#endif

template <class Value>
void run_network(Value* rows, const std::vector<std::uint32_t>& pairs) {
#if defined(FASTFED_X86_DISPATCH)
    if (active_isa() >= isa::avx2) {
        run_network_avx2(rows, pairs);
        return;
    }
#endif
    run_network_scalar(rows, pairs);
}

// 64-byte aligned rows for the vector loads.
template <class Value>
class row_block {
 public:
    explicit row_block(std::size_t rows) : storage_(rows * kRowBytes / sizeof(Value) + kRowBytes / sizeof(Value)) {
        const auto address = reinterpret_cast<std::uintptr_t>(storage_.data());
        data_ = storage_.data() + (kRowBytes - address % kRowBytes) % kRowBytes / sizeof(Value);
    }
    Value* data() { return data_; }

 private:
    std::vector<Value> storage_;
    Value* data_;
};

// Sorts each coordinate's K values and calls finish(sorted, stride, index): sorted[r * stride] is
// the value of rank r. Clients holding NaN or infinity are flagged; a coordinate holding a NaN is
// handed to finish with sorted == nullptr.
template <class Source, class Finish>
void for_each_sorted(const std::vector<const Source*>& sources, std::size_t n, unsigned char* non_finite, Finish&& finish) {
    using traits = robust_traits<Source>;
    using Value = typename traits::value;
    constexpr std::size_t lanes = kRowBytes / sizeof(Value);
    const std::size_t k = sources.size();
    const bool use_network = k <= kNetworkLimit;
    const std::vector<std::uint32_t> pairs = use_network ? sorting_network(k) : std::vector<std::uint32_t>{};
    const std::size_t n_groups = (n + lanes - 1) / lanes;
    std::mutex flag_mutex;
    // Sorting costs O(log^2 K) operations per value: even a few groups are worth a thread.
    parallel_for(n_groups, 16, k * lanes * 16, [&](std::size_t first_group, std::size_t end_group) {
        row_block<Value> block(k);
        Value* rows = block.data();
        std::vector<Value> column(use_network ? 0 : k);
        std::vector<unsigned char> flags(k, 0);
        bool any_flag = false;
        for (std::size_t group = first_group; group < end_group; ++group) {
            const std::size_t begin = group * lanes;
            const std::size_t length = std::min(lanes, n - begin);
            for (std::size_t c = 0; c < k; ++c) {
                const Source* source = sources[c] + begin;
                Value* row = rows + c * lanes;
                bool bad = false;
                for (std::size_t l = 0; l < length; ++l) {
                    row[l] = traits::load(source[l]);
                    if constexpr (std::is_floating_point_v<Value>) bad |= !std::isfinite(row[l]);
                }
                for (std::size_t l = length; l < lanes; ++l) row[l] = Value{};
                if (bad) {
                    flags[c] = 1;
                    any_flag = true;
                }
            }
            bool nan_lane[lanes] = {};
            if constexpr (std::is_floating_point_v<Value>) {
                if (any_flag)
                    for (std::size_t c = 0; c < k; ++c)
                        for (std::size_t l = 0; l < length; ++l) nan_lane[l] |= std::isnan(rows[c * lanes + l]);
            }
            if (use_network) {
                run_network(rows, pairs);
                for (std::size_t l = 0; l < length; ++l) finish(nan_lane[l] ? nullptr : rows + l, lanes, begin + l);
            } else {
                for (std::size_t l = 0; l < length; ++l) {
                    if (nan_lane[l]) {
                        finish(static_cast<const Value*>(nullptr), 1, begin + l);
                        continue;
                    }
                    for (std::size_t c = 0; c < k; ++c) column[c] = rows[c * lanes + l];
                    std::sort(column.begin(), column.end());
                    finish(column.data(), 1, begin + l);
                }
            }
        }
        if (any_flag) {
            const std::lock_guard<std::mutex> guard(flag_mutex);
            for (std::size_t c = 0; c < k; ++c) non_finite[c] |= flags[c];
        }
    });
}

template <class Source>
void median(const std::vector<const Source*>& sources, robust_output<Source>* out, std::size_t n, unsigned char* non_finite) {
    using traits = robust_traits<Source>;
    using Value = typename traits::value;
    const std::size_t k = sources.size();
    const std::size_t middle = k / 2;
    for_each_sorted(sources, n, non_finite, [&](const Value* sorted, std::size_t stride, std::size_t i) {
        if constexpr (std::is_floating_point_v<Value>) {
            if (sorted == nullptr) {
                out[i] = std::nan("");
                return;
            }
            const double upper = static_cast<double>(sorted[middle * stride]);
            out[i] = (k % 2 ? upper : float_midpoint(static_cast<double>(sorted[(middle - 1) * stride]), upper)) + 0.0;
        } else {
            const Value upper = sorted[middle * stride];
            out[i] = traits::store(k % 2 ? upper : integer_midpoint(sorted[(middle - 1) * stride], upper));
        }
    });
}

template <class Source>
void trimmed_mean(const std::vector<const Source*>& sources, std::size_t cut, robust_output<Source>* out, std::size_t n,
                  unsigned char* non_finite) {
    using traits = robust_traits<Source>;
    using Value = typename traits::value;
    const std::size_t k = sources.size();
    const std::size_t kept = k - 2 * cut;
    const double headroom = sum_headroom(k);
    for_each_sorted(sources, n, non_finite, [&](const Value* sorted, std::size_t stride, std::size_t i) {
        if constexpr (std::is_floating_point_v<Value>) {
            if (sorted == nullptr) {
                out[i] = std::nan("");
                return;
            }
            double sum = 0.0;
            for (std::size_t r = cut; r < k - cut; ++r) sum += static_cast<double>(sorted[r * stride]) / headroom;
            out[i] = sum / static_cast<double>(kept) * headroom + 0.0;
        } else {
            std::int64_t high_sum = 0, low_sum = 0;
            for (std::size_t r = cut; r < k - cut; ++r) {
                high_sum += sorted[r * stride] >> 32;
                low_sum += sorted[r * stride] & 0xffffffff;
            }
            out[i] = traits::store(integer_mean(high_sum, low_sum, static_cast<std::int64_t>(kept)));
        }
    });
}

}  // namespace fastfed::aggregate
