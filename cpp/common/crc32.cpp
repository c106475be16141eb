#include "crc32.hpp"

#include <array>
#include <cstring>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu.hpp"
#include "parallel.hpp"

#if defined(FASTFED_X86_DISPATCH)
#include <immintrin.h>
#endif

namespace fastfed {
namespace {

constexpr std::uint32_t kPolynomial = 0xEDB88320u;  // reflected: bit 31 is x^0, bit 0 is x^31

using slice_tables = std::array<std::array<std::uint32_t, 256>, 8>;

// tables[0] advances the register by one byte; tables[k] by a byte followed by k zero bytes.
constexpr slice_tables make_tables() {
    slice_tables tables{};
    for (std::uint32_t byte = 0; byte < 256; ++byte) {
        std::uint32_t value = byte;
        for (int bit = 0; bit < 8; ++bit) value = (value & 1u) ? (value >> 1) ^ kPolynomial : value >> 1;
        tables[0][byte] = value;
    }
    for (std::size_t k = 1; k < 8; ++k)
        for (std::size_t byte = 0; byte < 256; ++byte)
            tables[k][byte] = (tables[k - 1][byte] >> 8) ^ tables[0][tables[k - 1][byte] & 0xffu];
    return tables;
}

constexpr slice_tables kTables = make_tables();

// The register after data[0, n), from register `state` (the pre-inverted CRC).
std::uint32_t update_tables(std::uint32_t state, const std::uint8_t* data, std::size_t n) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    for (; n >= 8; n -= 8, data += 8) {
        std::uint64_t word;
        std::memcpy(&word, data, sizeof word);
        const auto low = static_cast<std::uint32_t>(word) ^ state;
        const auto high = static_cast<std::uint32_t>(word >> 32);
        state = kTables[7][low & 0xffu] ^ kTables[6][(low >> 8) & 0xffu] ^ kTables[5][(low >> 16) & 0xffu] ^ kTables[4][low >> 24] ^
                kTables[3][high & 0xffu] ^ kTables[2][(high >> 8) & 0xffu] ^ kTables[1][(high >> 16) & 0xffu] ^ kTables[0][high >> 24];
    }
#endif
    for (; n > 0; --n, ++data) state = kTables[0][(state ^ *data) & 0xffu] ^ (state >> 8);
    return state;
}

#if defined(FASTFED_X86_DISPATCH)
// Folding constants for the reflected polynomial: a 128-bit block moved forward by D bits is
// clmul(low half, k(D + 32)) ^ clmul(high half, k(D - 32)), with k(e) = reflect32(x^e mod P) << 1.
constexpr long long kFold128Low = 0x1751997d0, kFold128High = 0x0ccaa009e;    // D = 128
constexpr long long kFold256Low = 0x0f1da05aa, kFold256High = 0x15a546366;    // D = 256
constexpr long long kFold384Low = 0x03db1ecdc, kFold384High = 0x174359406;    // D = 384
constexpr long long kFold512Low = 0x154442bd4, kFold512High = 0x1c6e41596;    // D = 512
constexpr long long kFold1024Low = 0x1e88ef372, kFold1024High = 0x14a7fe880;  // D = 1024
constexpr long long kFold2048Low = 0x11542778a, kFold2048High = 0x1322d1430;  // D = 2048

FASTFED_TARGET("pclmul") inline __m128i fold(__m128i block, __m128i constants, __m128i next) {
    const __m128i low = _mm_clmulepi64_si128(block, constants, 0x00);
    const __m128i high = _mm_clmulepi64_si128(block, constants, 0x11);
    return _mm_xor_si128(_mm_xor_si128(low, high), next);
}

// Register after the last 16-byte block `folded` and the remaining tail: what remains after
// folding is congruent to the message, so the tables finish it from a zero register.
FASTFED_TARGET("pclmul") std::uint32_t finish(__m128i folded, const std::uint8_t* data, std::size_t n) {
    const __m128i fold_by_128 = _mm_set_epi64x(kFold128High, kFold128Low);
    for (; n >= 16; n -= 16, data += 16) folded = fold(folded, fold_by_128, _mm_loadu_si128(reinterpret_cast<const __m128i*>(data)));
    alignas(16) std::uint8_t block[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(block), folded);
    return update_tables(update_tables(0, block, 16), data, n);
}

// n >= 64. Four 128-bit lanes fold independently 64 bytes apart, hiding the multiply latency.
FASTFED_TARGET("pclmul") std::uint32_t update_pclmul(std::uint32_t state, const std::uint8_t* data, std::size_t n) {
    const auto* blocks = reinterpret_cast<const __m128i*>(data);
    __m128i x0 = _mm_xor_si128(_mm_loadu_si128(blocks), _mm_cvtsi32_si128(static_cast<int>(state)));
    __m128i x1 = _mm_loadu_si128(blocks + 1), x2 = _mm_loadu_si128(blocks + 2), x3 = _mm_loadu_si128(blocks + 3);
    const __m128i fold_by_512 = _mm_set_epi64x(kFold512High, kFold512Low);
    for (data += 64, n -= 64; n >= 64; data += 64, n -= 64) {
        blocks = reinterpret_cast<const __m128i*>(data);
        x0 = fold(x0, fold_by_512, _mm_loadu_si128(blocks));
        x1 = fold(x1, fold_by_512, _mm_loadu_si128(blocks + 1));
        x2 = fold(x2, fold_by_512, _mm_loadu_si128(blocks + 2));
        x3 = fold(x3, fold_by_512, _mm_loadu_si128(blocks + 3));
    }
    const __m128i fold_by_128 = _mm_set_epi64x(kFold128High, kFold128Low);
    return finish(fold(fold(fold(x0, fold_by_128, x1), fold_by_128, x2), fold_by_128, x3), data, n);
}

FASTFED_TARGET("avx2,vpclmulqdq,pclmul") inline __m256i fold(__m256i blocks, __m256i constants, __m256i next) {
    const __m256i low = _mm256_clmulepi64_epi128(blocks, constants, 0x00);
    const __m256i high = _mm256_clmulepi64_epi128(blocks, constants, 0x11);
    return _mm256_xor_si256(_mm256_xor_si256(low, high), next);
}

FASTFED_TARGET("avx2") inline __m256i load(const std::uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// n >= 128. Four ymm registers of two 128-bit lanes each fold 128 bytes per step: VPCLMULQDQ
// without AVX-512 (AMD Zen 3, Intel client cores), twice the bytes per multiply of update_pclmul.
FASTFED_TARGET("avx2,vpclmulqdq,pclmul") std::uint32_t update_vpclmul_avx2(std::uint32_t state, const std::uint8_t* data, std::size_t n) {
    __m256i y0 = _mm256_xor_si256(load(data), _mm256_zextsi128_si256(_mm_cvtsi32_si128(static_cast<int>(state))));
    __m256i y1 = load(data + 32), y2 = load(data + 64), y3 = load(data + 96);
    const __m256i fold_by_1024 = _mm256_set_epi64x(kFold1024High, kFold1024Low, kFold1024High, kFold1024Low);
    for (data += 128, n -= 128; n >= 128; data += 128, n -= 128) {
        y0 = fold(y0, fold_by_1024, load(data));
        y1 = fold(y1, fold_by_1024, load(data + 32));
        y2 = fold(y2, fold_by_1024, load(data + 64));
        y3 = fold(y3, fold_by_1024, load(data + 96));
    }
    const __m256i fold_by_256 = _mm256_set_epi64x(kFold256High, kFold256Low, kFold256High, kFold256Low);
    const __m256i y = fold(fold(fold(y0, fold_by_256, y1), fold_by_256, y2), fold_by_256, y3);
    // The two lanes of y are consecutive blocks: move the first to the position of the second.
    const __m128i folded = fold(_mm256_castsi256_si128(y), _mm_set_epi64x(kFold128High, kFold128Low), _mm256_extracti128_si256(y, 1));
    // finish is SSE code: clean the upper halves first (GCC tail-calls it without vzeroupper).
    _mm256_zeroupper();
    return finish(folded, data, n);
}

FASTFED_TARGET("avx512f,vpclmulqdq,pclmul") inline __m512i fold(__m512i blocks, __m512i constants, __m512i next) {
    const __m512i low = _mm512_clmulepi64_epi128(blocks, constants, 0x00);
    const __m512i high = _mm512_clmulepi64_epi128(blocks, constants, 0x11);
    return _mm512_xor_si512(_mm512_xor_si512(low, high), next);
}

// n >= 256. Four zmm registers of four 128-bit lanes each fold 256 bytes per step.
FASTFED_TARGET("avx512f,vpclmulqdq,pclmul") std::uint32_t update_vpclmul(std::uint32_t state, const std::uint8_t* data, std::size_t n) {
    __m512i z0 = _mm512_xor_si512(_mm512_loadu_si512(data), _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(state))));
    __m512i z1 = _mm512_loadu_si512(data + 64), z2 = _mm512_loadu_si512(data + 128), z3 = _mm512_loadu_si512(data + 192);
    const __m512i fold_by_2048 = _mm512_set_epi64(kFold2048High, kFold2048Low, kFold2048High, kFold2048Low, kFold2048High, kFold2048Low,
                                                  kFold2048High, kFold2048Low);
    for (data += 256, n -= 256; n >= 256; data += 256, n -= 256) {
        z0 = fold(z0, fold_by_2048, _mm512_loadu_si512(data));
        z1 = fold(z1, fold_by_2048, _mm512_loadu_si512(data + 64));
        z2 = fold(z2, fold_by_2048, _mm512_loadu_si512(data + 128));
        z3 = fold(z3, fold_by_2048, _mm512_loadu_si512(data + 192));
    }
    const __m512i fold_by_512 =
        _mm512_set_epi64(kFold512High, kFold512Low, kFold512High, kFold512Low, kFold512High, kFold512Low, kFold512High, kFold512Low);
    const __m512i z = fold(fold(fold(z0, fold_by_512, z1), fold_by_512, z2), fold_by_512, z3);
    // The four lanes of z are consecutive blocks: move each to the position of the last.
    alignas(64) __m128i lanes[4];
    _mm512_store_si512(lanes, z);
    __m128i folded = fold(lanes[2], _mm_set_epi64x(kFold128High, kFold128Low), lanes[3]);
    folded = fold(lanes[1], _mm_set_epi64x(kFold256High, kFold256Low), folded);
    folded = fold(lanes[0], _mm_set_epi64x(kFold384High, kFold384Low), folded);
    // finish is SSE code: clean the upper halves first (GCC tail-calls it without vzeroupper), or
    // every later SSE instruction, and the vector code after it, runs with dirty upper state.
    _mm256_zeroupper();
    return finish(folded, data, n);
}
#endif

// a * b modulo the polynomial, both reflected.
std::uint32_t multiply_modulo(std::uint32_t a, std::uint32_t b) {
    std::uint32_t product = 0;
    for (std::uint32_t bit = 1u << 31; bit != 0 && a != 0; bit >>= 1) {
        if (a & bit) {
            product ^= b;
            a ^= bit;
        }
        b = (b & 1u) ? (b >> 1) ^ kPolynomial : b >> 1;
    }
    return product;
}

// x^(2^k) modulo the polynomial for k = 0..63.
std::array<std::uint32_t, 64> make_power_table() {
    std::array<std::uint32_t, 64> powers{};
    powers[0] = 1u << 30;  // x^1
    for (std::size_t k = 1; k < powers.size(); ++k) powers[k] = multiply_modulo(powers[k - 1], powers[k - 1]);
    return powers;
}

// x^(8 n) modulo the polynomial.
std::uint32_t shift_by_bytes(std::size_t n) {
    static const std::array<std::uint32_t, 64> powers = make_power_table();
    std::uint32_t result = 1u << 31;  // x^0
    for (std::size_t k = 3; n != 0; n >>= 1, ++k)
        if (n & 1u) result = multiply_modulo(powers[k], result);
    return result;
}

// How crc32_update folds, narrowest first, and the methods' names (crc32_methods).
enum class crc32_method { tables, pclmul, vpclmul256, vpclmul512 };
constexpr const char* kMethodNames[] = {"tables", "pclmul", "vpclmul256", "vpclmul512"};

// The widest folding method the active instruction set allows on this CPU.
crc32_method widest_method() {
    const isa level = active_isa();
#if defined(FASTFED_X86_DISPATCH)
    if (level >= isa::avx512) return crc32_method::vpclmul512;
    // VPCLMULQDQ on 256-bit registers comes without AVX-512 on AMD Zen 3 and Intel client cores.
    static const bool vpclmul256 = __builtin_cpu_supports("vpclmulqdq");
    if (level >= isa::avx2) return vpclmul256 ? crc32_method::vpclmul256 : crc32_method::pclmul;
#endif
    (void)level;
    return crc32_method::tables;
}

std::uint32_t update(crc32_method method, std::uint32_t state, const std::uint8_t* data, std::size_t n) {
#if defined(FASTFED_X86_DISPATCH)
    // Each method needs a few blocks to fold; shorter data takes the next narrower one.
    if (method >= crc32_method::vpclmul512 && n >= 256) return update_vpclmul(state, data, n);
    if (method >= crc32_method::vpclmul256 && n >= 128) return update_vpclmul_avx2(state, data, n);
    if (method >= crc32_method::pclmul && n >= 64) return update_pclmul(state, data, n);
#endif
    (void)method;
    return update_tables(state, data, n);
}

}  // namespace

std::vector<std::string> crc32_methods() {
    return {std::begin(kMethodNames), std::begin(kMethodNames) + static_cast<int>(widest_method()) + 1};
}

std::uint32_t crc32_update(std::uint32_t crc, const std::uint8_t* data, std::size_t n, const std::string& method) {
    const std::vector<std::string> methods = crc32_methods();
    for (std::size_t index = 0; index < methods.size(); ++index)
        if (methods[index] == method) return ~update(static_cast<crc32_method>(index), ~crc, data, n);
    std::string names;
    for (const std::string& name : methods) names += (names.empty() ? "'" : ", '") + name + "'";
    throw std::invalid_argument("crc32: method '" + method + "' is not one this CPU runs (" + names + ")");
}

std::uint32_t crc32_update(std::uint32_t crc, const std::uint8_t* data, std::size_t n) { return ~update(widest_method(), ~crc, data, n); }

std::uint32_t crc32_shift(std::size_t length_b) { return shift_by_bytes(length_b); }

std::uint32_t crc32_combine_shifted(std::uint32_t shift, std::uint32_t crc_a, std::uint32_t crc_b) {
    return multiply_modulo(shift, crc_a) ^ crc_b;
}

std::uint32_t crc32_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::size_t length_b) {
    return crc32_combine_shifted(crc32_shift(length_b), crc_a, crc_b);
}

std::uint32_t crc32_parallel(std::uint32_t crc, const std::uint8_t* data, std::size_t n) {
    constexpr std::size_t kChunk = std::size_t{1} << 20;
    const std::size_t n_chunks = (n + kChunk - 1) / kChunk;
    // One core folds a megabyte in tens of microseconds, about what starting a thread costs.
    if (n_chunks < 4 || num_threads() < 2) return crc32_update(crc, data, n);
    std::vector<std::uint32_t> parts(n_chunks);
    parallel_for(n_chunks, 1, kChunk, [&](std::size_t first, std::size_t last) {
        for (std::size_t c = first; c < last; ++c) parts[c] = crc32_update(0, data + c * kChunk, std::min(kChunk, n - c * kChunk));
    });
    for (std::size_t c = 0; c < n_chunks; ++c) crc = crc32_combine(crc, parts[c], std::min(kChunk, n - c * kChunk));
    return crc;
}

}  // namespace fastfed
