// Instruction sets beyond the x86-64 baseline (SSE2), chosen at run time.
//
// Wheels are built for the baseline, so wider code paths are compiled with function-level target
// attributes and selected once per process from what the CPU reports. Every path runs the same
// arithmetic in the same order without FMA, so results are bit-identical whichever one runs;
// set_isa lowers the level so tests can check exactly that.
#pragma once

#include <string>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define FASTFED_X86_DISPATCH 1
#define FASTFED_TARGET(features) __attribute__((target(features)))
#else
#define FASTFED_TARGET(features)
#endif

// GCC 12's AVX-512 intrinsics pass _mm512_undefined_*() as the unused source of their masked forms,
// which -Wmaybe-uninitialized reports in every caller.
#if defined(__GNUC__) && !defined(__clang__)
#define FASTFED_AVX512_BEGIN _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define FASTFED_AVX512_END _Pragma("GCC diagnostic pop")
#else
#define FASTFED_AVX512_BEGIN
#define FASTFED_AVX512_END
#endif

namespace fastfed {

// Ordered: each level includes the ones before it.
//   baseline: SSE2 and table-driven CRC-32.
//   avx2:     AVX2 kernels and PCLMULQDQ CRC-32 folding (VPCLMULQDQ on 256-bit registers where
//             the CPU has it, as AMD Zen 3 and Intel client cores do).
//   avx512:   additionally AVX-512 VPCLMULQDQ CRC-32 folding, 64 bytes per instruction,
//             AVX-512DQ random numbers (64-bit multiplies) for stochastic rounding, and
//             wider table lookups for the shared-rotation encode and mean.
enum class isa { baseline = 0, avx2 = 1, avx512 = 2 };

isa best_isa();           // the highest level this CPU and OS support
isa active_isa();         // best_isa() unless lowered by set_isa
void set_isa(isa level);  // std::invalid_argument if the CPU lacks it

std::string isa_name(isa level);
isa isa_from_name(const std::string& name);

#if defined(FASTFED_X86_DISPATCH)
// Runs body() compiled for AVX2: `flatten` inlines everything it calls into this AVX2 clone.
template <class Body>
FASTFED_TARGET("avx2")
__attribute__((flatten)) void run_avx2(Body& body) {
    body();
}
#endif

// Fetches the cache line holding p ahead of its use. Inline assembly on x86, because GCC 12 deleted
// _mm_prefetch calls whose address it loads from an array of pointers, as kernels' next clients' are.
inline void prefetch_line(const void* p) {
#if defined(FASTFED_X86_DISPATCH)
    __asm__ volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
    __builtin_prefetch(p);
#endif
}

// Runs body() with the widest vector code the active ISA allows.
template <class Body>
void run_vectorized(Body&& body) {
#if defined(FASTFED_X86_DISPATCH)
    if (active_isa() >= isa::avx2) {
        run_avx2(body);
        return;
    }
#endif
    body();
}

}  // namespace fastfed
