// Bit-packing of b-bit levels (1 <= b <= 16), little-endian and LSB-first: value i occupies bits
// [i*b, (i+1)*b) of the stream, and bit g of the stream is bit (g % 8) of byte g / 8. Every 8 values
// fill exactly b bytes, so groups of 8 are packed and unpacked independently, in parallel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

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

// Eight levels of `bits` bits, one per byte of `bytes` (little-endian), packed into the low 8 * bits
// bits: three rounds each merge pairs of neighbouring units, moving the upper one down next to the
// lower one (units of 8, 16 and 32 bits holding bits, 2 bits and 4 bits of levels).
// The held bits at the start of each pair of units: the lower unit's mask in round `round` (0..2).
constexpr std::uint64_t lower_mask(unsigned bits, unsigned round) {
    const unsigned unit = 8u << round, held = bits << round;
    std::uint64_t lower = 0;
    for (unsigned lane = 0; lane < 64; lane += 2 * unit) lower |= ((std::uint64_t{1} << held) - 1) << lane;
    return lower;
}

template <unsigned Bits>
inline std::uint64_t pack_eight(std::uint64_t bytes) {
    constexpr std::uint64_t lower[3] = {lower_mask(Bits, 0), lower_mask(Bits, 1), lower_mask(Bits, 2)};
    bytes = (bytes & lower[0]) | ((bytes >> (8 - Bits)) & (lower[0] << Bits));
    bytes = (bytes & lower[1]) | ((bytes >> (16 - 2 * Bits)) & (lower[1] << (2 * Bits)));
    return (bytes & lower[2]) | ((bytes >> (32 - 4 * Bits)) & (lower[2] << (4 * Bits)));
}

template <unsigned Bits>
void pack_bytes(const std::uint8_t* levels, std::size_t n, std::uint8_t* out) {
    for (std::size_t i = 0; i < n; i += 8, out += Bits) {
        std::uint64_t bytes;
        std::memcpy(&bytes, levels + i, 8);
        const std::uint64_t packed = pack_eight<Bits>(bytes);
        std::memcpy(out, &packed, Bits);  // little-endian, as the stream is
    }
}

// Packs levels[0, n) (one byte each, n a multiple of 8) at `bits` (1..8) bits per level into out.
inline void pack_bytes(const std::uint8_t* levels, std::size_t n, unsigned bits, std::uint8_t* out) {
    switch (bits) {
        case 1: return pack_bytes<1>(levels, n, out);
        case 2: return pack_bytes<2>(levels, n, out);
        case 3: return pack_bytes<3>(levels, n, out);
        case 4: return pack_bytes<4>(levels, n, out);
        case 5: return pack_bytes<5>(levels, n, out);
        case 6: return pack_bytes<6>(levels, n, out);
        case 7: return pack_bytes<7>(levels, n, out);
        default: std::memcpy(out, levels, n);
    }
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
