// Element types the kernels accept, and their exact conversion to double.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace fastfed {

// IEEE 754 binary16 stored as its bit pattern; NumPy's float16 has the same layout.
struct half_bits {
    std::uint16_t bits;
};

inline float half_to_float(std::uint16_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu;
    const std::uint32_t mantissa = h & 0x3ffu;
    std::uint32_t bits;
    if (exponent == 0) {
        // Zero or subnormal: mantissa * 2^-24 is exact in float.
        const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
        std::memcpy(&bits, &magnitude, sizeof bits);
        bits |= sign;
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);  // inf or NaN, payload kept
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

template <class T>
inline double to_double(T value) {
    return static_cast<double>(value);
}
template <>
inline double to_double<half_bits>(half_bits value) {
    return static_cast<double>(half_to_float(value.bits));
}

enum class scalar_type { f16, f32, f64, i8, i16, i32, i64, u8, u16, u32, u64 };

// Calls fn(T{}) with T the C++ type for `type`.
template <class Fn>
decltype(auto) dispatch_scalar(scalar_type type, Fn&& fn) {
    switch (type) {
        case scalar_type::f16: return fn(half_bits{});
        case scalar_type::f32: return fn(float{});
        case scalar_type::f64: return fn(double{});
        case scalar_type::i8: return fn(std::int8_t{});
        case scalar_type::i16: return fn(std::int16_t{});
        case scalar_type::i32: return fn(std::int32_t{});
        case scalar_type::i64: return fn(std::int64_t{});
        case scalar_type::u8: return fn(std::uint8_t{});
        case scalar_type::u16: return fn(std::uint16_t{});
        case scalar_type::u32: return fn(std::uint32_t{});
        case scalar_type::u64: return fn(std::uint64_t{});
    }
    throw std::logic_error("unreachable scalar type");
}

}  // namespace fastfed
