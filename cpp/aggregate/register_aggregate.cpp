#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "../common/boundary.hpp"
#include "aggregate.hpp"
#include "quantized.hpp"
#include "robust.hpp"

namespace py = pybind11;

namespace fastfed {
namespace {

void weighted_sum_layer(const py::list& sources, const py::array_t<double, py::array::c_style | py::array::forcecast>& weights,
                        double divisor, py::array& out) {
    const std::size_t n_sources = py::len(sources);
    if (n_sources == 0) throw std::invalid_argument("sources: expected at least one array");
    if (weights.ndim() != 1 || static_cast<std::size_t>(weights.shape(0)) != n_sources)
        throw std::invalid_argument("weights: expected shape (" + std::to_string(n_sources) + ",)");
    require_flat_contiguous(out, "out");
    if (!out.writeable()) throw std::invalid_argument("out: array is read-only");
    const auto n = static_cast<std::size_t>(out.shape(0));

    std::vector<py::array> arrays;
    arrays.reserve(n_sources);
    for (std::size_t k = 0; k < n_sources; ++k) {
        auto array = py::reinterpret_borrow<py::object>(sources[k]);
        if (!py::isinstance<py::array>(array)) throw std::invalid_argument("sources[" + std::to_string(k) + "]: expected a numpy array");
        arrays.push_back(py::reinterpret_borrow<py::array>(array));
        const std::string name = "sources[" + std::to_string(k) + "]";
        require_flat_contiguous(arrays.back(), name.c_str());
        if (static_cast<std::size_t>(arrays.back().shape(0)) != n)
            throw std::invalid_argument(name + ": expected " + std::to_string(n) + " elements, got " +
                                        std::to_string(arrays.back().shape(0)));
        if (!arrays.back().dtype().equal(arrays.front().dtype())) throw std::invalid_argument(name + ": dtype differs from sources[0]");
    }
    const scalar_type source_type = scalar_type_of(arrays.front().dtype(), "sources");
    const scalar_type out_type = scalar_type_of(out.dtype(), "out");
    if (out_type != scalar_type::f64 && out_type != source_type)
        throw std::invalid_argument("out: dtype must be float64 or the sources' dtype");
    if (out_type != scalar_type::f64 && out_type != scalar_type::f32) throw std::invalid_argument("out: dtype must be float32 or float64");

    std::vector<const void*> pointers(n_sources);
    for (std::size_t k = 0; k < n_sources; ++k) pointers[k] = arrays[k].data();
    const double* weight_data = weights.data();
    void* out_data = out.mutable_data();

    // Safe: every Python object was converted above; `arrays` keeps the buffers alive until return.
    const py::gil_scoped_release release;
    dispatch_scalar(source_type, [&](auto source_tag) {
        using Source = decltype(source_tag);
        std::vector<const Source*> typed(n_sources);
        for (std::size_t k = 0; k < n_sources; ++k) typed[k] = static_cast<const Source*>(pointers[k]);
        if (out_type == scalar_type::f32) {
            if constexpr (std::is_same_v<Source, float>)
                aggregate::weighted_sum(typed, weight_data, divisor, static_cast<float*>(out_data), n);
        } else {
            aggregate::weighted_sum(typed, weight_data, divisor, static_cast<double*>(out_data), n);
        }
    });
}

void accumulate(py::array_t<double, py::array::c_style>& acc, const py::array& source, double weight) {
    require_flat_contiguous(acc, "acc");
    require_flat_contiguous(source, "source");
    if (!acc.writeable()) throw std::invalid_argument("acc: array is read-only");
    if (acc.shape(0) != source.shape(0))
        throw std::invalid_argument("source: expected " + std::to_string(acc.shape(0)) + " elements, got " +
                                    std::to_string(source.shape(0)));
    const scalar_type source_type = scalar_type_of(source.dtype(), "source");
    const auto n = static_cast<std::size_t>(acc.shape(0));
    double* acc_data = acc.mutable_data();
    const void* source_data = source.data();
    // Safe: only raw pointers are used below; the caller's references keep both buffers alive.
    const py::gil_scoped_release release;
    dispatch_scalar(source_type, [&](auto source_tag) {
        using Source = decltype(source_tag);
        aggregate::accumulate(acc_data, static_cast<const Source*>(source_data), weight, n);
    });
}

// The packed level arrays of weighted_sum_quantized and weighted_sum_levels, each checked to hold n values.
std::vector<packed_array> packed_list(const py::list& packed, std::size_t n, unsigned bits) {
    std::vector<packed_array> arrays;
    arrays.reserve(py::len(packed));
    for (std::size_t k = 0; k < py::len(packed); ++k) {
        auto object = py::reinterpret_borrow<py::object>(packed[k]);
        if (!py::isinstance<packed_array>(object)) throw std::invalid_argument("packed[" + std::to_string(k) + "]: expected a uint8 array");
        arrays.push_back(py::reinterpret_borrow<packed_array>(object));
        require_packed_size(arrays.back(), n, bits);
    }
    return arrays;
}

void require_checksums(const py::array& checksums, std::size_t n_clients) {
    if (!checksums.dtype().is(py::dtype::of<std::uint32_t>()) || checksums.ndim() != 1 ||
        static_cast<std::size_t>(checksums.shape(0)) != n_clients || !checksums.writeable() || !(checksums.flags() & py::array::c_style))
        throw std::invalid_argument("checksums: expected a writable, contiguous uint32 array of shape (" + std::to_string(n_clients) +
                                    ",)");
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
    require_checksums(checksums, n_clients);
    const auto n = static_cast<std::size_t>(out.shape(0));
    const std::vector<packed_array> arrays = packed_list(packed, n, bits);
    std::vector<const std::uint8_t*> pointers;
    for (const auto& array : arrays) pointers.push_back(array.data());
    const float* scale_data = scales.data();
    auto* checksum_data = static_cast<std::uint32_t*>(checksums.mutable_data());
    dispatch_float(out, "out", [&](auto tag) {
        using Output = decltype(tag);
        auto* out_data = static_cast<Output*>(out.mutable_data());
        // Safe: raw pointers only; `arrays` and the caller keep every buffer alive until return.
        const py::gil_scoped_release release;
        aggregate::weighted_sum_quantized(pointers, bits, scale_data, offset, divisor, out_data, n, checksum_data);
    });
}

// The K sources of a robust aggregate, checked like weighted_sum_layer's; out is float64 for float
// sources and the sources' dtype for integers; non_finite is a writable uint8 array of K flags.
struct robust_arguments {
    std::vector<py::array> arrays;
    scalar_type type;
    std::size_t n;
};

robust_arguments check_robust(const py::list& sources, const py::array& out, const py::array& non_finite) {
    const std::size_t n_sources = py::len(sources);
    if (n_sources == 0) throw std::invalid_argument("sources: expected at least one array");
    require_flat_contiguous(out, "out");
    if (!out.writeable()) throw std::invalid_argument("out: array is read-only");
    const auto n = static_cast<std::size_t>(out.shape(0));
    robust_arguments checked{{}, scalar_type::f64, n};
    checked.arrays.reserve(n_sources);
    for (std::size_t k = 0; k < n_sources; ++k) {
        auto object = py::reinterpret_borrow<py::object>(sources[k]);
        const std::string name = "sources[" + std::to_string(k) + "]";
        if (!py::isinstance<py::array>(object)) throw std::invalid_argument(name + ": expected a numpy array");
        checked.arrays.push_back(py::reinterpret_borrow<py::array>(object));
        const py::array& array = checked.arrays.back();
        require_flat_contiguous(array, name.c_str());
        if (static_cast<std::size_t>(array.shape(0)) != n)
            throw std::invalid_argument(name + ": expected " + std::to_string(n) + " elements, got " + std::to_string(array.shape(0)));
        if (!array.dtype().equal(checked.arrays.front().dtype())) throw std::invalid_argument(name + ": dtype differs from sources[0]");
    }
    checked.type = scalar_type_of(checked.arrays.front().dtype(), "sources");
    const bool float_sources = checked.type == scalar_type::f16 || checked.type == scalar_type::f32 || checked.type == scalar_type::f64;
    if (float_sources ? scalar_type_of(out.dtype(), "out") != scalar_type::f64 : !out.dtype().equal(checked.arrays.front().dtype()))
        throw std::invalid_argument("out: dtype must be float64 for float sources, or the sources' integer dtype");
    if (!non_finite.dtype().is(py::dtype::of<std::uint8_t>()) || non_finite.ndim() != 1 ||
        static_cast<std::size_t>(non_finite.shape(0)) != n_sources || !non_finite.writeable() || !(non_finite.flags() & py::array::c_style))
        throw std::invalid_argument("non_finite: expected a writable, contiguous uint8 array of shape (" + std::to_string(n_sources) +
                                    ",)");
    return checked;
}

template <class Run>
void run_robust(const robust_arguments& checked, py::array& out, py::array& non_finite, Run&& run) {
    std::vector<const void*> pointers;
    pointers.reserve(checked.arrays.size());
    for (const auto& array : checked.arrays) pointers.push_back(array.data());
    void* out_data = out.mutable_data();
    auto* flags = static_cast<unsigned char*>(non_finite.mutable_data());
    const std::size_t n = checked.n;
    // Safe: every Python object was converted above; `checked` keeps the buffers alive until return.
    const py::gil_scoped_release release;
    dispatch_scalar(checked.type, [&](auto source_tag) {
        using Source = decltype(source_tag);
        std::vector<const Source*> typed;
        typed.reserve(pointers.size());
        for (const void* pointer : pointers) typed.push_back(static_cast<const Source*>(pointer));
        run(typed, static_cast<aggregate::robust_output<Source>*>(out_data), n, flags);
    });
}

void median(const py::list& sources, py::array& out, py::array& non_finite) {
    const robust_arguments checked = check_robust(sources, out, non_finite);
    run_robust(checked, out, non_finite, [](const auto& typed, auto* out_data, std::size_t n, unsigned char* flags) {
        aggregate::median(typed, out_data, n, flags);
    });
}

void trimmed_mean(const py::list& sources, std::size_t cut, py::array& out, py::array& non_finite) {
    const robust_arguments checked = check_robust(sources, out, non_finite);
    if (2 * cut >= checked.arrays.size())
        throw std::invalid_argument("cut: expected fewer than half of the " + std::to_string(checked.arrays.size()) + " sources, got " +
                                    std::to_string(cut));
    run_robust(checked, out, non_finite, [cut](const auto& typed, auto* out_data, std::size_t n, unsigned char* flags) {
        aggregate::trimmed_mean(typed, cut, out_data, n, flags);
    });
}

// The corrections of weighted_sum_levels, one source per packed array: each holds its positions
// (uint32), then as many corrections (float32), 8 bytes per correction; `arrays` keeps them alive.
aggregate::level_corrections level_corrections(const std::optional<py::list>& sources, std::size_t n_packed,
                                               const std::optional<py::array_t<float, py::array::c_style>>& shares,
                                               std::vector<packed_array>& arrays) {
    aggregate::level_corrections corrections;
    if (!sources) {
        if (shares) throw std::invalid_argument("shares: expected None without corrections");
        return corrections;
    }
    const std::size_t n_clients = py::len(*sources);
    if (n_clients != n_packed)
        throw std::invalid_argument("corrections: expected one array per packed array (" + std::to_string(n_packed) + "), got " +
                                    std::to_string(n_clients));
    if (!shares || shares->ndim() != 1 || static_cast<std::size_t>(shares->shape(0)) != n_clients)
        throw std::invalid_argument("shares: expected a float32 array of shape (" + std::to_string(n_clients) + ",)");
    for (std::size_t k = 0; k < n_clients; ++k) {
        const std::string name = "corrections[" + std::to_string(k) + "]";
        const py::handle object = (*sources)[k];
        if (!py::isinstance<packed_array>(object)) throw std::invalid_argument(name + ": expected a uint8 array");
        arrays.push_back(py::reinterpret_borrow<packed_array>(object));
        require_flat_contiguous(arrays.back(), name.c_str());
        const auto size = static_cast<std::size_t>(arrays.back().shape(0));
        if (size % 8 != 0) throw std::invalid_argument(name + ": expected 8 bytes per correction, got " + std::to_string(size) + " bytes");
        corrections.sources.push_back(arrays.back().data());
        corrections.counts.push_back(size / 8);
    }
    corrections.shares = shares->data();
    return corrections;
}

std::ptrdiff_t weighted_sum_levels(const py::list& packed, unsigned bits, const py::array_t<float, py::array::c_style>& scales,
                                   std::size_t block, const std::optional<py::array_t<float, py::array::c_style>>& table,
                                   const py::array_t<std::uint32_t, py::array::c_style>& rows,
                                   const std::optional<py::array_t<double, py::array::c_style>>& offsets, double divisor, py::array& out,
                                   py::array& checksums, const std::optional<py::list>& corrections,
                                   const std::optional<py::array_t<float, py::array::c_style>>& shares, double limit) {
    require_bits(bits);
    require_block(block);
    require_flat_contiguous(out, "out");
    if (!out.writeable()) throw std::invalid_argument("out: array is read-only");
    const auto n = static_cast<std::size_t>(out.shape(0));
    if (n % block != 0) throw std::invalid_argument("out: expected a multiple of " + std::to_string(block) + " values");
    const std::size_t n_clients = py::len(packed);
    if (n_clients == 0) throw std::invalid_argument("packed: expected at least one array");
    if (scales.ndim() != 2 || static_cast<std::size_t>(scales.shape(0)) != n_clients ||
        static_cast<std::size_t>(scales.shape(1)) != n / block)
        throw std::invalid_argument("scales: expected shape (" + std::to_string(n_clients) + ", " + std::to_string(n / block) + ")");
    if (rows.ndim() != 2 || static_cast<std::size_t>(rows.shape(0)) != n_clients || rows.shape(1) != 2)
        throw std::invalid_argument("rows: expected a uint32 array of shape (" + std::to_string(n_clients) + ", 2)");
    require_checksums(checksums, n_clients);
    const std::vector<packed_array> arrays = packed_list(packed, n, bits);
    std::vector<const std::uint8_t*> pointers;
    for (const auto& array : arrays) pointers.push_back(array.data());
    // The table with eight spare floats, so that a row can be read as a whole vector at any row.
    std::vector<float> values;
    std::size_t n_rows = 0;
    if (table) {
        if (bits > 8) throw std::invalid_argument("bits: expected 1..8 with a table, got " + std::to_string(bits));
        n_rows = static_cast<std::size_t>(table->shape(0));
        if (table->ndim() != 2 || static_cast<std::size_t>(table->shape(1)) != (std::size_t{1} << bits) || n_rows == 0 ||
            (n_rows & (n_rows - 1)) != 0)
            throw std::invalid_argument("table: expected a float32 array of a power of two rows and " + std::to_string(1u << bits) +
                                        " columns");
        values.assign(table->data(), table->data() + table->size());
        values.resize(values.size() + 8, 0.0f);
    }
    std::size_t period = 0;
    if (offsets) {
        period = static_cast<std::size_t>(offsets->shape(1));
        if (offsets->ndim() != 2 || static_cast<std::size_t>(offsets->shape(0)) != n / block || period == 0 || (period & (period - 1)) != 0)
            throw std::invalid_argument("offsets: expected a float64 array of " + std::to_string(n / block) +
                                        " rows and a power of two columns");
    }
    const aggregate::level_values level_values{
        scales.data(), block, table ? values.data() : nullptr, n_rows, rows.data(), offsets ? offsets->data() : nullptr, period};
    std::vector<packed_array> correction_arrays;
    const aggregate::level_corrections level_corrections = fastfed::level_corrections(corrections, n_clients, shares, correction_arrays);
    auto* checksum_data = static_cast<std::uint32_t*>(checksums.mutable_data());
    std::ptrdiff_t invalid = -1;
    dispatch_float(out, "out", [&](auto tag) {
        using Output = decltype(tag);
        auto* out_data = static_cast<Output*>(out.mutable_data());
        // Safe: raw pointers only; `arrays`, `correction_arrays`, `values` and the caller keep every buffer alive until return.
        const py::gil_scoped_release release;
        invalid =
            aggregate::weighted_sum_levels(pointers, bits, level_values, level_corrections, limit, divisor, out_data, n, checksum_data);
    });
    return invalid;
}

}  // namespace

void register_aggregate(py::module_& m) {
    m.doc() = "Weighted sums of client buffers, float or packed quantized levels (tiled, multi-threaded, GIL released).";
    m.def("weighted_sum_layer", &weighted_sum_layer, py::arg("sources"), py::arg("weights"), py::arg("divisor"), py::arg("out"),
          "out[:] = sum_k weights[k] * sources[k] / divisor, accumulated in float64.");
    m.def("accumulate", &accumulate, py::arg("acc"), py::arg("source"), py::arg("weight"), "acc += weight * source, in float64.");
    m.def("weighted_sum_quantized", &weighted_sum_quantized, py::arg("packed"), py::arg("bits"), py::arg("scales"), py::arg("offset"),
          py::arg("divisor"), py::arg("out"), py::arg("checksums"),
          "out = (sum_k scales[k] * unpack(packed[k]) + offset) / divisor: float32 blocks of eight clients, float64 tiles; "
          "checksums[k] = crc32(packed[k], checksums[k]).");
    m.def("median", &median, py::arg("sources"), py::arg("out"), py::arg("non_finite"),
          "Coordinate-wise median of K sources (even K: the midpoint of the middle two); NaN where a coordinate holds one. "
          "non_finite[k] = 1 where sources[k] holds NaN or infinity.");
    m.def("trimmed_mean", &trimmed_mean, py::arg("sources"), py::arg("cut"), py::arg("out"), py::arg("non_finite"),
          "Coordinate-wise mean of K sources without the cut smallest and cut largest values; NaN where a coordinate holds "
          "one. non_finite[k] = 1 where sources[k] holds NaN or infinity.");
    m.def("weighted_sum_levels", &weighted_sum_levels, py::arg("packed"), py::arg("bits"), py::arg("scales"), py::arg("block"),
          py::arg("table"), py::arg("rows"), py::arg("offsets"), py::arg("divisor"), py::arg("out"), py::arg("checksums"),
          py::arg("corrections") = py::none(), py::arg("shares") = py::none(), py::arg("limit") = std::numeric_limits<double>::infinity(),
          "out[i] = (sum_k scales[k, i / block] * value_k(i) + offsets[i / block, (i / 8) % period]) / divisor, value_k(i) = "
          "table[row_k(i), level] or the level; checksums[k] = crc32(packed[k], checksums[k]). Then out[p] += shares[k] * c for each "
          "correction (p, c) of each client, read from corrections[k] (its positions as uint32, then its corrections as float32). "
          "Returns the first client whose positions do not increase or stay below len(out), or whose corrections are not finite or "
          "exceed limit in magnitude (nothing is summed then), else -1.");
}

}  // namespace fastfed
