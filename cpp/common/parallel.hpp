// parallel_for: split [0, n_items) into blocks of `grain` items, run on a persistent pool of threads.
//
// The pool is started once and reused: a kernel call costs a wake-up, not one thread creation per
// thread per call (tens of microseconds each, which at 16 threads and one call per layer was a
// visible share of a model's aggregation). One job runs at a time; a call from inside a job, or
// from a second Python thread while a job runs, waits for the pool or runs inline. If threads
// cannot be started (address-space or thread limits), the pool keeps the ones it has, down to none:
// kernels then run on the calling thread. Worker exceptions are carried back to the caller.
#pragma once

#include <algorithm>
#include <cstddef>
#include <exception>

namespace fastfed {

std::size_t num_threads();
void set_num_threads(std::size_t n);

// How many threads the pool could actually start (<= num_threads() - 1 helpers, plus the caller).
std::size_t started_threads();

namespace detail {

// A job of the pool: `run(context, begin, end)` over blocks of [0, n_items).
struct job {
    void (*run)(void* context, std::size_t begin, std::size_t end);
    void* context;
    std::size_t n_items;
    std::size_t grain;
};

// Runs the job on up to `workers` threads (the caller included); rethrows the first worker exception.
void run_on_pool(const job& work, std::size_t workers);

}  // namespace detail

// Runs body(begin, end) over blocks of `grain` items. Runs inline when the total work is small
// (`work_per_item * n_items` below ~256k element operations) or only one thread is allowed.
template <class Body>
void parallel_for(std::size_t n_items, std::size_t grain, std::size_t work_per_item, Body&& body) {
    if (n_items == 0) return;
    grain = std::max<std::size_t>(grain, 1);
    constexpr std::size_t kMinWorkPerThread = std::size_t{1} << 18;
    const std::size_t n_blocks = (n_items + grain - 1) / grain;
    const std::size_t by_work = std::max<std::size_t>(1, (n_items * std::max<std::size_t>(work_per_item, 1)) / kMinWorkPerThread);
    const std::size_t workers = std::min({num_threads(), n_blocks, by_work});
    if (workers <= 1) {
        body(std::size_t{0}, n_items);
        return;
    }
    // A few long contiguous runs per thread rather than many short ones: memory-bound kernels stream
    // best when each core reads long spans (hardware prefetchers follow them, DRAM pages stay open),
    // and a few runs each still balance the load.
    constexpr std::size_t kRunsPerThread = 4;
    grain = std::max(grain, (n_items + kRunsPerThread * workers - 1) / (kRunsPerThread * workers));
    using Function = std::remove_reference_t<Body>;
    const detail::job work{[](void* context, std::size_t begin, std::size_t end) { (*static_cast<Function*>(context))(begin, end); },
                           const_cast<void*>(static_cast<const void*>(&body)), n_items, grain};
    detail::run_on_pool(work, workers);
}

}  // namespace fastfed
