#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "../common/boundary.hpp"
#include "rotate.hpp"

namespace py = pybind11;

namespace fastfed {
namespace {

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

void walsh_hadamard_binding(py::array& x, std::size_t block) {
    require_flat_contiguous(x, "x");
    if (!x.writeable()) throw std::invalid_argument("x: array is read-only");
    const auto n = static_cast<std::size_t>(x.shape(0));
    require_rotation_shape(n, block, n);
    dispatch_float(x, "x", [&](auto tag) {
        using Value = decltype(tag);
        auto* data = static_cast<Value*>(x.mutable_data());
        // Safe: raw pointer only; the caller holds x.
        const py::gil_scoped_release release;
        parallel_for(n / block, 1, block * 8, [&](std::size_t first, std::size_t last) {
            for (std::size_t b = first; b < last; ++b) run_vectorized([&] { rotate::hadamard(data + b * block, block); });
        });
    });
}

void rotate_blocks_binding(const py::array& x, std::size_t block, const std::vector<std::uint64_t>& keys, py::array& out) {
    require_float32(x, "x");
    require_float32(out, "out");
    if (!out.writeable()) throw std::invalid_argument("out: array is read-only");
    require_block(block);
    require_rounds(keys);
    const auto n = static_cast<std::size_t>(x.shape(0));
    const auto padded = static_cast<std::size_t>(out.shape(0));
    require_rotation_shape(n, block, padded);
    const auto* x_data = static_cast<const float*>(x.data());
    auto* out_data = static_cast<float*>(out.mutable_data());
    // Safe: raw pointers only; the caller holds x and out, keys is a local copy.
    const py::gil_scoped_release release;
    rotate::rotate_blocks(x_data, n, block, keys.data(), keys.size(), out_data, padded);
}

void unrotate_blocks_binding(py::array& y, std::size_t block, const std::vector<std::uint64_t>& keys, py::array& out) {
    require_float32(y, "y");
    require_float32(out, "out");
    if (!out.writeable() || !y.writeable()) throw std::invalid_argument("y and out must be writable");
    require_block(block);
    require_rounds(keys);
    const auto n = static_cast<std::size_t>(out.shape(0));
    const auto padded = static_cast<std::size_t>(y.shape(0));
    require_rotation_shape(n, block, padded);
    auto* y_data = static_cast<float*>(y.mutable_data());
    auto* out_data = static_cast<float*>(out.mutable_data());
    // Safe: raw pointers only; the caller holds y and out, keys is a local copy.
    const py::gil_scoped_release release;
    rotate::unrotate_blocks(y_data, padded, block, keys.data(), keys.size(), out_data, n);
}

}  // namespace

void register_rotate(py::module_& m) {
    m.doc() = "Randomized Walsh-Hadamard rotation.";
    m.def("rotate", &rotate_binding, py::arg("x"), py::arg("chunk"), py::arg("key"), py::arg("out").noconvert(),
          "out = blockwise H D pad(x): randomized Walsh-Hadamard rotation.");
    m.def("unrotate", &unrotate_binding, py::arg("y").noconvert(), py::arg("chunk"), py::arg("key"), py::arg("out"),
          "out = (D H y)[:len(out)], the inverse of rotate; y is overwritten.");
    m.def("walsh_hadamard", &walsh_hadamard_binding, py::arg("x").noconvert(), py::arg("block"),
          "In place: the unnormalized Walsh-Hadamard transform of every block of a float32 or float64 array.");
    m.def("rotate_blocks", &rotate_blocks_binding, py::arg("x"), py::arg("block"), py::arg("keys"), py::arg("out").noconvert(),
          "out = one or two rounds (one per key) of blockwise H D 2^-e on pad(x), in float32.");
    m.def("unrotate_blocks", &unrotate_blocks_binding, py::arg("y").noconvert(), py::arg("block"), py::arg("keys"),
          py::arg("out").noconvert(), "out = the inverse of rotate_blocks, its first len(out) values; y is overwritten.");
}

}  // namespace fastfed
