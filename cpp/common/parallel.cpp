#include "parallel.hpp"

#include <cstdlib>
#include <string>

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

}  // namespace

std::size_t num_threads() { return thread_setting().load(); }

void set_num_threads(std::size_t n) { thread_setting().store(n == 0 ? default_num_threads() : n); }

}  // namespace fastfed
