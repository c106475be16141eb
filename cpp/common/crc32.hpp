// CRC-32 with zlib's polynomial (reflected 0xEDB88320), compatible with zlib.crc32:
// crc32_update(crc32_update(0, a), b) == zlib.crc32(a + b).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fastfed {

// The CRC-32 of data[0, n) continued from `crc` (0 starts a new checksum). Folds 64 to 256 bytes
// per step with carry-less multiplication where the CPU has it (Gopal et al. 2009, "Fast CRC
// Computation for Generic Polynomials Using PCLMULQDQ Instruction"), else slice-by-8 tables.
std::uint32_t crc32_update(std::uint32_t crc, const std::uint8_t* data, std::size_t n);

// How crc32_update can fold on this CPU at the active instruction set, narrowest first, by name:
// "tables" (slice-by-8), "pclmul" (128-bit registers), "vpclmul256" (AVX2 CPUs that have VPCLMULQDQ),
// "vpclmul512" (AVX-512); crc32_update uses the last. The named overload folds with one of them
// (std::invalid_argument for any other), so that tests check each against zlib on any machine.
std::vector<std::string> crc32_methods();
std::uint32_t crc32_update(std::uint32_t crc, const std::uint8_t* data, std::size_t n, const std::string& method);

// crc32(a + b) from crc32(a), crc32(b) and len(b), as zlib's crc32_combine: crc(a) is moved
// past len(b) bytes by multiplying with x^(8 len(b)) modulo the polynomial.
std::uint32_t crc32_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::size_t length_b);

// crc32_combine in two steps, for many combines over one length: shift = crc32_shift(length_b),
// then crc32_combine_shifted(shift, crc_a, crc_b) costs a single multiplication.
std::uint32_t crc32_shift(std::size_t length_b);
std::uint32_t crc32_combine_shifted(std::uint32_t shift, std::uint32_t crc_a, std::uint32_t crc_b);

// crc32_update over megabyte chunks on all kernel threads, combined in order.
std::uint32_t crc32_parallel(std::uint32_t crc, const std::uint8_t* data, std::size_t n);

}  // namespace fastfed
