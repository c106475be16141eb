#include <pybind11/pybind11.h>

#include <string>

#include "../common/boundary.hpp"
#include "rotate.hpp"

namespace py = pybind11;

namespace fastfed {
namespace {

void require_rotation_shape(std::size_t n, std::size_t chunk, std::size_t padded) {
    if (chunk == 0 || (chunk & (chunk - 1)) != 0)
        throw std::invalid_argument("chunk: expected a power of two, got " + std::to_string(chunk));
    if (padded % chunk != 0 || padded < n || padded - n >= chunk)
        throw std::invalid_argument("padded length " + std::to_string(padded) + " does not fit " + std::to_string(n) +
                                    " values in chunks of " + std::to_string(chunk));
}

void rotate_binding(const py::array& x, std::size_t chunk, std::uint64_t key, float64_array& out) {
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
        rotate::rotate(data, n, chunk, key, out_data, padded);
    });
}

void unrotate_binding(float64_array& y, std::size_t chunk, std::uint64_t key, py::array& out) {
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
        rotate::unrotate(y_data, padded, chunk, key, out_data, n);
    });
}

}  // namespace

void register_rotate(py::module_& m) {
    m.doc() = "Randomized Walsh-Hadamard rotation.";
    m.def("rotate", &rotate_binding, py::arg("x"), py::arg("chunk"), py::arg("key"), py::arg("out").noconvert(),
          "out = blockwise H D pad(x): randomized Walsh-Hadamard rotation.");
    m.def("unrotate", &unrotate_binding, py::arg("y").noconvert(), py::arg("chunk"), py::arg("key"), py::arg("out"),
          "out = (D H y)[:len(out)], the inverse of rotate; y is overwritten.");
}

}  // namespace fastfed
