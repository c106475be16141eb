// fastfed._core: the native kernels. Each submodule mirrors a folder of cpp/ and a module of
// fastfed.kernels (the NumPy reference and Numba twins).
#include <pybind11/pybind11.h>

#include "common/parallel.hpp"

namespace py = pybind11;

namespace fastfed {
void register_aggregate(py::module_& m);
void register_quantize(py::module_& m);
}  // namespace fastfed

PYBIND11_MODULE(_core, m) {
    m.doc() = "fastfed native kernels";
    m.def("num_threads", &fastfed::num_threads, "Threads the native kernels use.");
    m.def("set_num_threads", &fastfed::set_num_threads, py::arg("n"),
          "Sets the threads the native kernels use; 0 restores the default (FASTFED_NUM_THREADS or all cores).");
    auto aggregate = m.def_submodule("aggregate");
    fastfed::register_aggregate(aggregate);
    auto quantize = m.def_submodule("quantize");
    fastfed::register_quantize(quantize);
}
