#include "parallel.hpp"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace fastfed {
namespace {

std::size_t default_num_threads() {
    if (const char* env = std::getenv("FASTFED_NUM_THREADS")) {
        try {
            const long value = std::stol(env);
            if (value > 0) return static_cast<std::size_t>(value);
        } catch (const std::exception&) {
            // An unparsable value falls back to the hardware count, like OMP_NUM_THREADS does.
        }
    }
    return std::max<std::size_t>(1, std::thread::hardware_concurrency());
}

std::atomic<std::size_t>& thread_setting() {
    static std::atomic<std::size_t> setting{default_num_threads()};
    return setting;
}

// Set while this thread runs a block of a pool job: a nested parallel_for then runs inline.
thread_local bool inside_job = false;

class pool {
 public:
    // Starts helpers until there are `wanted` of them or the system refuses more. A new helper waits
    // for the next job: the jobs so far (generation_, which only run() changes, under job_mutex_ as
    // here) are not its to take; in a forked child, whose helpers are all new, one would otherwise
    // run the parent's finished job and miscount pending_.
    std::size_t reserve(std::size_t wanted) {
        while (helpers_.size() < wanted && !refused_) {
            try {
                helpers_.emplace_back(&pool::helper_loop, this, helpers_.size(), generation_);
            } catch (const std::system_error&) {
                refused_ = true;  // out of threads or address space: make do with what runs
            }
        }
        return std::min(wanted, helpers_.size());
    }

    void run(const detail::job& work, std::size_t workers) {
        const std::lock_guard<std::mutex> one_job(job_mutex_);
        const std::size_t helpers = reserve(workers - 1);
        {
            const std::lock_guard<std::mutex> guard(mutex_);
            job_ = work;
            n_blocks_ = (work.n_items + work.grain - 1) / work.grain;
            next_block_.store(0);
            active_helpers_ = helpers;
            pending_ = helpers;
            first_error_ = nullptr;
            ++generation_;
        }
        wake_.notify_all();
        work_blocks();
        std::unique_lock<std::mutex> guard(mutex_);
        done_.wait(guard, [&] { return pending_ == 0; });
        if (first_error_) std::rethrow_exception(first_error_);
    }

    std::size_t started() {
        const std::lock_guard<std::mutex> one_job(job_mutex_);
        return reserve(num_threads() - 1) + 1;
    }

    // After fork() the child has only the forking thread: the helpers do not exist there.
    void forget_helpers_after_fork() {
        // Their std::thread handles name threads of the parent: leak them rather than join or detach.
        new std::vector<std::thread>(std::move(helpers_));
        helpers_.clear();
        refused_ = false;
        new (&mutex_) std::mutex;
        new (&job_mutex_) std::mutex;
        new (&wake_) std::condition_variable;
        new (&done_) std::condition_variable;
        pending_ = 0;
    }

 private:
    void work_blocks() {
        inside_job = true;
        try {
            for (std::size_t block = next_block_++; block < n_blocks_; block = next_block_++) {
                const std::size_t begin = block * job_.grain;
                job_.run(job_.context, begin, std::min(job_.n_items, begin + job_.grain));
            }
        } catch (...) {
            const std::lock_guard<std::mutex> guard(mutex_);
            if (!first_error_) first_error_ = std::current_exception();
            next_block_.store(n_blocks_);  // stop the others early
        }
        inside_job = false;
    }

    void helper_loop(std::size_t index, std::size_t seen) {
        for (;;) {
            {
                std::unique_lock<std::mutex> guard(mutex_);
                wake_.wait(guard, [&] { return generation_ != seen; });
                seen = generation_;
                if (index >= active_helpers_) continue;  // this job uses fewer threads
            }
            work_blocks();
            const std::lock_guard<std::mutex> guard(mutex_);
            if (--pending_ == 0) done_.notify_one();
        }
    }

    std::mutex job_mutex_;  // one job at a time
    std::mutex mutex_;      // guards the job's bookkeeping below
    std::condition_variable wake_, done_;
    std::vector<std::thread> helpers_;
    bool refused_ = false;
    detail::job job_{};
    std::size_t n_blocks_ = 0;
    std::atomic<std::size_t> next_block_{0};
    std::size_t active_helpers_ = 0, pending_ = 0, generation_ = 0;
    std::exception_ptr first_error_;
};

// The pool, for the fork handler: set before the handler is registered, so that a fork() while the
// pool is being created (before the_pool()'s guard is released) cannot leave the child's handler
// waiting on that guard.
std::atomic<pool*> created_pool{nullptr};

pool& the_pool() {
    // Never destroyed: helpers blocked on the condition variable end with the process, and no
    // destructor can race a kernel still running on another Python thread at interpreter exit.
    static pool* const instance = [] {
        auto* created = new pool;
        created_pool.store(created);
#if defined(__unix__) || defined(__APPLE__)
        pthread_atfork(nullptr, nullptr, [] { created_pool.load()->forget_helpers_after_fork(); });
#endif
        return created;
    }();
    return *instance;
}

}  // namespace

std::size_t num_threads() { return thread_setting().load(); }

void set_num_threads(std::size_t n) { thread_setting().store(n == 0 ? default_num_threads() : n); }

std::size_t started_threads() { return the_pool().started(); }

namespace detail {

void run_on_pool(const job& work, std::size_t workers) {
    if (inside_job) {  // a parallel_for inside a pool job: the pool is busy with its caller
        work.run(work.context, 0, work.n_items);
        return;
    }
    the_pool().run(work, workers);
}

}  // namespace detail
}  // namespace fastfed
