#include "cpu.hpp"

#include <atomic>
#include <stdexcept>

namespace fastfed {
namespace {

isa detect() {
#if defined(FASTFED_X86_DISPATCH)
    __builtin_cpu_init();
    // libgcc and compiler-rt report AVX features only when the OS saves the wider registers.
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("pclmul");
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("vpclmulqdq");
    if (avx2 && avx512) return isa::avx512;
    if (avx2) return isa::avx2;
#endif
    return isa::baseline;
}

std::atomic<isa>& active_setting() {
    static std::atomic<isa> setting{best_isa()};
    return setting;
}

}  // namespace

isa best_isa() {
    static const isa best = detect();
    return best;
}

isa active_isa() { return active_setting().load(std::memory_order_relaxed); }

void set_isa(isa level) {
    if (level > best_isa())
        throw std::invalid_argument("isa: this CPU supports up to '" + isa_name(best_isa()) + "', not '" + isa_name(level) + "'");
    active_setting().store(level);
}

std::string isa_name(isa level) {
    switch (level) {
        case isa::baseline: return "baseline";
        case isa::avx2: return "avx2";
        case isa::avx512: return "avx512";
    }
    return "unknown";
}

isa isa_from_name(const std::string& name) {
    if (name == "baseline") return isa::baseline;
    if (name == "avx2") return isa::avx2;
    if (name == "avx512") return isa::avx512;
    throw std::invalid_argument("isa: expected 'baseline', 'avx2' or 'avx512', got '" + name + "'");
}

}  // namespace fastfed
