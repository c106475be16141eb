#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "../common/scalar.hpp"
#include "quantize.hpp"

namespace py = pybind11;

namespace fastfed {
namespace {

using packed_array = py::array_t<std::uint8_t, py::array::c_style>;
using float64_array = py::array_t<double, py::array::c_style>;

void require_bits(unsigned bits) {
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

py::tuple min_max(const py::array& x) {
    require_flat_contiguous(x, "x");
    if (x.shape(0) == 0) throw std::invalid_argument("x: expected at least one element");
    const auto n = static_cast<std::size_t>(x.shape(0));
    quantize::min_max_result result{};
    dispatch_float(x, "x", [&](auto tag) {
        using Source = decltype(tag);
        const auto* data = static_cast<const Source*>(x.data());
        // Safe: raw pointer only; the caller holds x.
        const py::gil_scoped_release release;
        result = quantize::min_max(data, n);
    });
    if (!result.finite) throw std::invalid_argument("x: contains NaN or infinite values");
    return py::make_tuple(result.minimum, result.maximum);
}

void quantize_pack(const py::array& x, unsigned bits, bool stochastic, std::uint64_t key, double offset, double scale, packed_array& out) {
    require_bits(bits);
    require_flat_contiguous(x, "x");
    require_flat_contiguous(out, "out");
    const auto n = static_cast<std::size_t>(x.shape(0));
    if (static_cast<std::size_t>(out.shape(0)) != quantize::packed_bytes(n, bits))
        throw std::invalid_argument("out: expected " + std::to_string(quantize::packed_bytes(n, bits)) + " bytes");
    std::uint8_t* out_data = out.mutable_data();
    dispatch_float(x, "x", [&](auto tag) {
        using Source = decltype(tag);
        const auto* data = static_cast<const Source*>(x.data());
        // Safe: raw pointers only; the caller holds x and out.
        const py::gil_scoped_release release;
        quantize::quantize_pack(data, n, bits, stochastic, key, offset, scale, out_data);
    });
}

void require_packed_size(const packed_array& packed, std::size_t n, unsigned bits) {
    require_flat_contiguous(packed, "packed");
    if (static_cast<std::size_t>(packed.shape(0)) != quantize::packed_bytes(n, bits))
        throw std::invalid_argument("packed: expected " + std::to_string(quantize::packed_bytes(n, bits)) + " bytes for " + std::to_string(n) +
                                    " values of " + std::to_string(bits) + " bits, got " + std::to_string(packed.shape(0)));
}

void unpack_dequantize(const packed_array& packed, unsigned bits, double offset, double step, py::array& out) {
    require_bits(bits);
    require_flat_contiguous(out, "out");
    if (!out.writeable()) throw std::invalid_argument("out: array is read-only");
    const auto n = static_cast<std::size_t>(out.shape(0));
    require_packed_size(packed, n, bits);
    const std::uint8_t* packed_data = packed.data();
    dispatch_float(out, "out", [&](auto tag) {
        using Output = decltype(tag);
        auto* out_data = static_cast<Output*>(out.mutable_data());
        // Safe: raw pointers only; the caller holds packed and out.
        const py::gil_scoped_release release;
        quantize::unpack_dequantize(packed_data, n, bits, offset, step, out_data);
    });
}

void unpack_dequantize_accumulate(const packed_array& packed, unsigned bits, double offset, double step, double weight, float64_array& acc) {
    require_bits(bits);
    require_flat_contiguous(acc, "acc");
    if (!acc.writeable()) throw std::invalid_argument("acc: array is read-only");
    const auto n = static_cast<std::size_t>(acc.shape(0));
    require_packed_size(packed, n, bits);
    const std::uint8_t* packed_data = packed.data();
    double* acc_data = acc.mutable_data();
    // Safe: raw pointers only; the caller holds packed and acc.
    const py::gil_scoped_release release;
    quantize::unpack_dequantize_accumulate(packed_data, n, bits, offset, step, weight, acc_data);
}

void weighted_sum_quantized(const py::list& packed, unsigned bits, const py::array_t<float, py::array::c_style>& scales, double offset,
                            double divisor, py::array& out, py::array& checksums) {
    require_bits(bits);
    require_flat_contiguous(out, "out");
    if (!out.writeable()) throw std::invalid_argument("out: array is read-only");
    const std::size_t n_clients = py::len(packed);
    if (n_clients == 0) throw std::invalid_argument("packed: expected at least one array");
    if (scales.ndim() != 1 || static_cast<std::size_t>(scales.shape(0)) != n_clients)
        throw std::invalid_argument("scales: expected shape (" + std::to_string(n_clients) + ",)");
    if (!checksums.dtype().is(py::dtype::of<std::uint32_t>()) || checksums.ndim() != 1 ||
        static_cast<std::size_t>(checksums.shape(0)) != n_clients || !checksums.writeable() || !(checksums.flags() & py::array::c_style))
        throw std::invalid_argument("checksums: expected a writable, contiguous uint32 array of shape (" + std::to_string(n_clients) + ",)");
    const auto n = static_cast<std::size_t>(out.shape(0));
    std::vector<packed_array> arrays;
    arrays.reserve(n_clients);
    std::vector<const std::uint8_t*> pointers;
    pointers.reserve(n_clients);
    for (std::size_t k = 0; k < n_clients; ++k) {
        auto object = py::reinterpret_borrow<py::object>(packed[k]);
        if (!py::isinstance<packed_array>(object)) throw std::invalid_argument("packed[" + std::to_string(k) + "]: expected a uint8 array");
        arrays.push_back(py::reinterpret_borrow<packed_array>(object));
        require_packed_size(arrays.back(), n, bits);
        pointers.push_back(arrays.back().data());
    }
    const float* scale_data = scales.data();
    auto* checksum_data = static_cast<std::uint32_t*>(checksums.mutable_data());
    dispatch_float(out, "out", [&](auto tag) {
        using Output = decltype(tag);
        auto* out_data = static_cast<Output*>(out.mutable_data());
        // Safe: raw pointers only; `arrays` and the caller keep every buffer alive until return.
        const py::gil_scoped_release release;
        quantize::weighted_sum_quantized(pointers, bits, scale_data, offset, divisor, out_data, n, checksum_data);
    });
}

void require_rotation_shape(std::size_t n, std::size_t chunk, std::size_t padded) {
    if (chunk == 0 || (chunk & (chunk - 1)) != 0) throw std::invalid_argument("chunk: expected a power of two, got " + std::to_string(chunk));
    if (padded % chunk != 0 || padded < n || padded - n >= chunk)
        throw std::invalid_argument("padded length " + std::to_string(padded) + " does not fit " + std::to_string(n) + " values in chunks of " +
                                    std::to_string(chunk));
}

void rotate(const py::array& x, std::size_t chunk, std::uint64_t key, float64_array& out) {
    require_flat_contiguous(x, "x");
    require_flat_contiguous(out, "out");
    const auto n = static_cast<std::size_t>(x.shape(0));
    const auto padded = static_cast<std::size_t>(out.shape(0));
    require_rotation_shape(n, chunk, padded);
    double* out_data = out.mutable_data();
    dispatch_float(x, "x", [&](auto tag) {
        using Source = decltype(tag);
        const auto* data = static_cast<const Source*>(x.data());
        // Safe: raw pointers only; the caller holds x and out.
        const py::gil_scoped_release release;
        quantize::rotate(data, n, chunk, key, out_data, padded);
    });
}

void unrotate(float64_array& y, std::size_t chunk, std::uint64_t key, py::array& out) {
    require_flat_contiguous(y, "y");
    require_flat_contiguous(out, "out");
    if (!out.writeable() || !y.writeable()) throw std::invalid_argument("y and out must be writable");
    const auto n = static_cast<std::size_t>(out.shape(0));
    const auto padded = static_cast<std::size_t>(y.shape(0));
    require_rotation_shape(n, chunk, padded);
    double* y_data = y.mutable_data();
    dispatch_float(out, "out", [&](auto tag) {
        using Output = decltype(tag);
        auto* out_data = static_cast<Output*>(out.mutable_data());
        // Safe: raw pointers only; the caller holds y and out.
        const py::gil_scoped_release release;
        quantize::unrotate(y_data, padded, chunk, key, out_data, n);
    });
}

}  // namespace

void register_quantize(py::module_& m) {
    m.doc() = "Uniform quantization, bit-packing and randomized Hadamard rotation.";
    m.def("min_max", &min_max, py::arg("x"), "(min, max) of a finite float array; ValueError on NaN or infinity.");
    m.def("quantize_pack", &quantize_pack, py::arg("x"), py::arg("bits"), py::arg("stochastic"), py::arg("key"), py::arg("offset"),
          py::arg("scale"), py::arg("out"), "out = pack(round((x - offset) * scale)), b bits per value, LSB first.");
    m.def("unpack_dequantize", &unpack_dequantize, py::arg("packed"), py::arg("bits"), py::arg("offset"), py::arg("step"), py::arg("out"),
          "out = offset + unpack(packed) * step.");
    m.def("unpack_dequantize_accumulate", &unpack_dequantize_accumulate, py::arg("packed"), py::arg("bits"), py::arg("offset"),
          py::arg("step"), py::arg("weight"), py::arg("acc").noconvert(), "acc += weight * float32(offset + unpack(packed) * step).");
    m.def("weighted_sum_quantized", &weighted_sum_quantized, py::arg("packed"), py::arg("bits"), py::arg("scales"), py::arg("offset"),
          py::arg("divisor"), py::arg("out"), py::arg("checksums"),
          "out = (sum_k scales[k] * unpack(packed[k]) + offset) / divisor: float32 blocks of eight clients, float64 tiles; "
          "checksums[k] = crc32(packed[k], checksums[k]).");
    m.def("rotate", &rotate, py::arg("x"), py::arg("chunk"), py::arg("key"), py::arg("out").noconvert(),
          "out = blockwise H D pad(x): randomized Walsh-Hadamard rotation.");
    m.def("unrotate", &unrotate, py::arg("y").noconvert(), py::arg("chunk"), py::arg("key"), py::arg("out"),
          "out = (D H y)[:len(out)], the inverse of rotate; y is overwritten.");
}

}  // namespace fastfed
