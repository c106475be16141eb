// Checks at the Python boundary: NumPy arrays are validated here, so kernels see clean typed buffers
// and never index out of bounds. Every check throws std::invalid_argument (ValueError in Python)
// naming the argument.
#pragma once

#include <pybind11/numpy.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "pack.hpp"
#include "scalar.hpp"

namespace fastfed {

namespace py = pybind11;

// Maps a NumPy dtype to a scalar_type; rejects non-native byte order and unsupported kinds.
inline scalar_type scalar_type_of(const py::dtype& dtype, const char* argument) {
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

// A 1-D, C-contiguous, aligned view checked at the boundary so kernels never index out of bounds.
inline void require_flat_contiguous(const py::array& array, const char* argument) {
    if (array.ndim() != 1)
        throw std::invalid_argument(std::string(argument) + ": expected a 1-D array, got " + std::to_string(array.ndim()) + "-D");
    if (!(array.flags() & py::array::c_style)) throw std::invalid_argument(std::string(argument) + ": expected a C-contiguous array");
    // Typed loads of a misaligned address are undefined behaviour (vector code may assume alignment).
    if (!(array.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
        throw std::invalid_argument(std::string(argument) + ": expected an aligned array (its address is not a multiple of the item size)");
}

using packed_array = py::array_t<std::uint8_t, py::array::c_style>;
using float64_array = py::array_t<double, py::array::c_style>;

inline void require_bits(unsigned bits) {
    if (bits < 1 || bits > 16) throw std::invalid_argument("bits: expected 1..16, got " + std::to_string(bits));
}

// Float sources (float32 or float64) dispatch; anything else is rejected at the boundary.
template <class Fn>
void dispatch_float(const py::array& array, const char* argument, Fn&& fn) {
    const scalar_type type = scalar_type_of(array.dtype(), argument);
    if (type == scalar_type::f32) return fn(float{});
    if (type == scalar_type::f64) return fn(double{});
    throw std::invalid_argument(std::string(argument) + ": expected float32 or float64");
}

inline void require_packed_size(const packed_array& packed, std::size_t n, unsigned bits) {
    require_flat_contiguous(packed, "packed");
    if (static_cast<std::size_t>(packed.shape(0)) != pack::packed_bytes(n, bits))
        throw std::invalid_argument("packed: expected " + std::to_string(pack::packed_bytes(n, bits)) + " bytes for " + std::to_string(n) +
                                    " values of " + std::to_string(bits) + " bits, got " + std::to_string(packed.shape(0)));
}

inline void require_rotation_shape(std::size_t n, std::size_t chunk, std::size_t padded) {
    if (chunk == 0 || (chunk & (chunk - 1)) != 0)
        throw std::invalid_argument("chunk: expected a power of two, got " + std::to_string(chunk));
    if (padded % chunk != 0 || padded < n || padded - n >= chunk)
        throw std::invalid_argument("padded length " + std::to_string(padded) + " does not fit " + std::to_string(n) +
                                    " values in chunks of " + std::to_string(chunk));
}

// The rotation blocks of RotatedQuantizer's kernels: whole groups of eight levels and sixteen-lane sums.
inline void require_block(std::size_t block) {
    if (block < 64 || (block & (block - 1)) != 0)
        throw std::invalid_argument("block: expected a power of two >= 64, got " + std::to_string(block));
}

inline void require_rounds(const std::vector<std::uint64_t>& keys) {
    if (keys.size() != 1 && keys.size() != 2)
        throw std::invalid_argument("keys: expected one or two rotation keys (one per round), got " + std::to_string(keys.size()));
}

inline void require_float32(const py::array& array, const char* argument) {
    require_flat_contiguous(array, argument);
    if (scalar_type_of(array.dtype(), argument) != scalar_type::f32)
        throw std::invalid_argument(std::string(argument) + ": expected float32");
}

}  // namespace fastfed
