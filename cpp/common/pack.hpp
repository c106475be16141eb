// Bit-packing of b-bit levels (1 <= b <= 16), little-endian and LSB-first: value i occupies bits
// [i*b, (i+1)*b) of the stream, and bit g of the stream is bit (g % 8) of byte g / 8. Every 8 values
// fill exactly b bytes, so groups of 8 are packed and unpacked independently, in parallel.
#pragma once

#include <cstddef>
#include <cstdint>

// uint8_t may alias anything, so loops over packed bytes vectorize only with this promise.
#if defined(__GNUC__) || defined(_MSC_VER)
#define FASTFED_RESTRICT __restrict
#else
#define FASTFED_RESTRICT
#endif

namespace fastfed::pack {

inline std::size_t packed_bytes(std::size_t n, unsigned bits) { return (n * bits + 7) / 8; }

// Writes level(i) for every value i in [begin, end) of the stream; begin is a multiple of 8, and
// only the stream's last group may end inside a byte.
template <class Level>
void pack_range(std::size_t begin, std::size_t end, unsigned bits, std::uint8_t* out, Level&& level) {
    std::uint8_t* byte = out + (begin / 8) * bits;
    std::uint64_t buffer = 0;
    unsigned filled = 0;
    for (std::size_t i = begin; i < end; ++i) {
        buffer |= static_cast<std::uint64_t>(level(i)) << filled;
        filled += bits;
        while (filled >= 8) {
            *byte++ = static_cast<std::uint8_t>(buffer);
            buffer >>= 8;
            filled -= 8;
        }
    }
    if (filled > 0) *byte = static_cast<std::uint8_t>(buffer);
}

// Calls emit(i, q) for every value i in [begin, end) of the packed stream; begin is a multiple of 8.
template <class Emit>
void unpack_range(const std::uint8_t* packed, std::size_t begin, std::size_t end, unsigned bits, Emit&& emit) {
    if (bits == 8) {
        for (std::size_t i = begin; i < end; ++i) emit(i, static_cast<std::uint32_t>(packed[i]));
        return;
    }
    const std::uint64_t mask = (std::uint64_t{1} << bits) - 1;
    const std::uint8_t* byte = packed + (begin / 8) * bits;
    std::uint64_t buffer = 0;
    unsigned filled = 0;
    for (std::size_t i = begin; i < end; ++i) {
        while (filled < bits) {
            buffer |= static_cast<std::uint64_t>(*byte++) << filled;
            filled += 8;
        }
        emit(i, static_cast<std::uint32_t>(buffer & mask));
        buffer >>= bits;
        filled -= bits;
    }
}

}  // namespace fastfed::pack
