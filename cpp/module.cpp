// fastfed._core: the native kernels. Each submodule mirrors a folder of cpp/ and a module of
// fastfed.kernels (the NumPy reference and Numba twins).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "common/cpu.hpp"
#include "common/crc32.hpp"
#include "common/parallel.hpp"

namespace py = pybind11;

namespace fastfed {
void register_aggregate(py::module_& m);
void register_quantize(py::module_& m);
void register_rotate(py::module_& m);

namespace {

// A contiguous buffer borrowed from any bytes-like object; non-contiguous exporters are refused.
class borrowed_bytes {
 public:
    explicit borrowed_bytes(const py::object& object) {
        if (PyObject_GetBuffer(object.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
    }
    borrowed_bytes(const borrowed_bytes&) = delete;
    borrowed_bytes& operator=(const borrowed_bytes&) = delete;
    ~borrowed_bytes() { PyBuffer_Release(&view_); }
    const std::uint8_t* data() const { return static_cast<const std::uint8_t*>(view_.buf); }
    std::size_t size() const { return static_cast<std::size_t>(view_.len); }

 private:
    Py_buffer view_{};
};

std::uint32_t crc32(const py::object& data, std::uint32_t value) {
    const borrowed_bytes bytes(data);
    // Safe: the buffer stays exported until `bytes` is destroyed, after the GIL is re-taken.
    const py::gil_scoped_release release;
    return crc32_parallel(value, bytes.data(), bytes.size());
}

std::uint32_t crc32_using(const py::object& data, std::uint32_t value, const std::string& method) {
    const borrowed_bytes bytes(data);
    return crc32_update(value, bytes.data(), bytes.size(), method);
}

}  // namespace
}  // namespace fastfed

PYBIND11_MODULE(_core, m) {
    m.doc() = "fastfed native kernels";
    m.def("num_threads", &fastfed::num_threads, "Threads the native kernels use.");
    m.def("set_num_threads", &fastfed::set_num_threads, py::arg("n"),
          "Sets the threads the native kernels use; 0 restores the default (FASTFED_NUM_THREADS or all cores).");
    m.def("pool_threads", &fastfed::started_threads,
          "Threads the kernels can run on now, the caller included: num_threads() unless the system refused to start more.");
    m.def("isa", [] { return fastfed::isa_name(fastfed::active_isa()); }, "The instruction set level the kernels use.");
    m.def("best_isa", [] { return fastfed::isa_name(fastfed::best_isa()); }, "The highest instruction set level this CPU supports.");
    m.def(
        "set_isa", [](const std::string& name) { fastfed::set_isa(fastfed::isa_from_name(name)); }, py::arg("name"),
        "Sets the instruction set level: 'baseline', 'avx2' or 'avx512' (at most best_isa()); results do not depend on it.");
    m.def("crc32", &fastfed::crc32, py::arg("data"), py::arg("value") = 0,
          "zlib-compatible CRC-32 of a bytes-like object, continued from value; folded with carry-less multiplication.");
    m.def("crc32_methods", &fastfed::crc32_methods,
          "How this CPU can fold CRC-32 at the active instruction set, narrowest first; crc32 uses the last.");
    m.def("crc32_using", &fastfed::crc32_using, py::arg("data"), py::arg("value"), py::arg("method"),
          "crc32 folded by one of crc32_methods(), on one thread: for tests that check every method.");
    auto aggregate = m.def_submodule("aggregate");
    fastfed::register_aggregate(aggregate);
    auto quantize = m.def_submodule("quantize");
    fastfed::register_quantize(quantize);
    auto rotate = m.def_submodule("rotate");
    fastfed::register_rotate(rotate);
}
