#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "../common/boundary.hpp"
#include "quantize.hpp"

namespace py = pybind11;

namespace fastfed {
namespace {

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

void unpack_dequantize_accumulate(const packed_array& packed, unsigned bits, double offset, double step, double weight,
                                  float64_array& acc) {
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

}  // namespace

void register_quantize(py::module_& m) {
    m.doc() = "Uniform quantization and bit-packing.";
    m.def("min_max", &min_max, py::arg("x"), "(min, max) of a finite float array; ValueError on NaN or infinity.");
    m.def("quantize_pack", &quantize_pack, py::arg("x"), py::arg("bits"), py::arg("stochastic"), py::arg("key"), py::arg("offset"),
          py::arg("scale"), py::arg("out"), "out = pack(round((x - offset) * scale)), b bits per value, LSB first.");
    m.def("unpack_dequantize", &unpack_dequantize, py::arg("packed"), py::arg("bits"), py::arg("offset"), py::arg("step"), py::arg("out"),
          "out = offset + unpack(packed) * step.");
    m.def("unpack_dequantize_accumulate", &unpack_dequantize_accumulate, py::arg("packed"), py::arg("bits"), py::arg("offset"),
          py::arg("step"), py::arg("weight"), py::arg("acc").noconvert(), "acc += weight * float32(offset + unpack(packed) * step).");
}

}  // namespace fastfed
