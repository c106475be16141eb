// A minimal fork-join helper: split [0, n_items) into contiguous blocks run on std::threads.
//
// Threads are started per call rather than pooled: every kernel that uses this does at least
// tens of microseconds of memory-bound work per thread, so the start-up cost is noise, and no
// pool means no global state that could outlive the interpreter or deadlock at fork().
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fastfed {

std::size_t num_threads();
void set_num_threads(std::size_t n);

// Runs body(begin, end) over blocks of `grain` items. Runs inline when the total work is small
// (`work_per_item * n_items` below ~256k element operations) or only one thread is allowed.
// The first exception thrown by any worker is rethrown in the caller after all threads join.
template <class Body>
void parallel_for(std::size_t n_items, std::size_t grain, std::size_t work_per_item, Body&& body) {
    if (n_items == 0) return;
    grain = std::max<std::size_t>(grain, 1);
    constexpr std::size_t kMinWorkPerThread = std::size_t{1} << 18;
    const std::size_t n_blocks = (n_items + grain - 1) / grain;
    const std::size_t by_work = std::max<std::size_t>(1, (n_items * std::max<std::size_t>(work_per_item, 1)) / kMinWorkPerThread);
    const std::size_t n_workers = std::min({num_threads(), n_blocks, by_work});
    if (n_workers <= 1) {
        body(std::size_t{0}, n_items);
        return;
    }
    std::atomic<std::size_t> next_block{0};
    std::exception_ptr first_error;
    std::mutex error_mutex;
    auto worker = [&]() {
        try {
            for (std::size_t block = next_block++; block < n_blocks; block = next_block++) {
                const std::size_t begin = block * grain;
                body(begin, std::min(n_items, begin + grain));
            }
        } catch (...) {
            const std::lock_guard<std::mutex> guard(error_mutex);
            if (!first_error) first_error = std::current_exception();
            next_block = n_blocks;  // stop the others early
        }
    };
    std::vector<std::thread> threads;
    threads.reserve(n_workers - 1);
    for (std::size_t t = 0; t + 1 < n_workers; ++t) threads.emplace_back(worker);
    worker();
    for (auto& thread : threads) thread.join();
    if (first_error) std::rethrow_exception(first_error);
}

}  // namespace fastfed
