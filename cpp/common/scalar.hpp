// Element types the kernels accept, and their exact conversion to double.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include <pybind11/numpy.h>

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

// Maps a NumPy dtype to a scalar_type; rejects non-native byte order and unsupported kinds.
inline scalar_type scalar_type_of(const pybind11::dtype& dtype, const char* argument) {
    const char order = dtype.byteorder();
    if (order == '>') throw std::invalid_argument(std::string(argument) + ": big-endian arrays must be converted by the caller");
    const char kind = dtype.kind();
    const auto size = dtype.itemsize();
    if (kind == 'f' && size == 2) return scalar_type::f16;
    if (kind == 'f' && size == 4) return scalar_type::f32;
    if (kind == 'f' && size == 8) return scalar_type::f64;
    if (kind == 'i' && size == 1) return scalar_type::i8;
    if (kind == 'i' && size == 2) return scalar_type::i16;
    if (kind == 'i' && size == 4) return scalar_type::i32;
    if (kind == 'i' && size == 8) return scalar_type::i64;
    if (kind == 'u' && size == 1) return scalar_type::u8;
    if (kind == 'u' && size == 2) return scalar_type::u16;
    if (kind == 'u' && size == 4) return scalar_type::u32;
    if (kind == 'u' && size == 8) return scalar_type::u64;
    throw std::invalid_argument(std::string(argument) + ": unsupported dtype kind '" + kind + "' of " + std::to_string(size) + " bytes");
}

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

// A 1-D, C-contiguous, aligned view checked at the boundary so kernels never index out of bounds.
inline void require_flat_contiguous(const pybind11::array& array, const char* argument) {
    if (array.ndim() != 1) throw std::invalid_argument(std::string(argument) + ": expected a 1-D array, got " + std::to_string(array.ndim()) + "-D");
    if (!(array.flags() & pybind11::array::c_style)) throw std::invalid_argument(std::string(argument) + ": expected a C-contiguous array");
    // Typed loads of a misaligned address are undefined behaviour (vector code may assume alignment).
    if (!(array.flags() & pybind11::detail::npy_api::NPY_ARRAY_ALIGNED_))
        throw std::invalid_argument(std::string(argument) + ": expected an aligned array (its address is not a multiple of the item size)");
}

}  // namespace fastfed
