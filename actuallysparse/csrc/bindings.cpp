// Torch side of the kernels: argument checks, packing of the dense operand into batch tiles,
// threads (at::parallel_for, so torch.set_num_threads governs them and no second OpenMP
// runtime is loaded) and the choice of instruction set. Registered as operators in the
// `actuallysparse_kernels` namespace; actuallysparse/kernels.py wraps them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "kernels.h"

namespace actuallysparse {
namespace {

bool isa_supported(const std::string& isa) {
  __builtin_cpu_init();
  if (isa == "scalar") return true;
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return false;
}

template <typename T>
KernelTable<T> table_for(const std::string& isa);

template <>
KernelTable<float> table_for<float>(const std::string& isa) {
  if (isa == "avx512") return avx512_table_f32();
  if (isa == "avx2") return avx2_table_f32();
  return scalar_table_f32();
}

template <>
KernelTable<double> table_for<double>(const std::string& isa) {
  if (isa == "avx512") return avx512_table_f64();
  if (isa == "avx2") return avx2_table_f64();
  return scalar_table_f64();
}

void check_isa(const std::string& isa) {
  TORCH_CHECK(isa == "avx512" || isa == "avx2" || isa == "scalar",
              "instruction set must be 'avx512', 'avx2' or 'scalar', got '", isa, "'");
  TORCH_CHECK(isa_supported(isa), "this CPU does not support the '", isa,
              "' instruction set; choose 'avx2' or 'scalar'");
}

void check_pattern(const at::Tensor& crow, const at::Tensor& col, int64_t n_rows) {
  TORCH_CHECK(crow.scalar_type() == at::kInt && col.scalar_type() == at::kInt,
              "the native kernels take int32 indices, got ", crow.scalar_type(), " and ", col.scalar_type());
  TORCH_CHECK(crow.dim() == 1 && crow.numel() == n_rows + 1, "row pointers must have ", n_rows + 1,
              " entries, got ", crow.sizes());
  TORCH_CHECK(crow.is_contiguous() && col.is_contiguous(), "pattern indices must be contiguous");
  TORCH_CHECK(crow.device().is_cpu() && col.device().is_cpu(), "the native kernels run on the CPU");
}

// Tile width: enough vectors for the batch, at most four (see kernels.h); a single row is
// its own tile of width 1.
int64_t tile_width(int64_t batch, int lanes) {
  if (batch == 1) return 1;
  const int64_t nv = std::min<int64_t>(4, std::max<int64_t>(1, (batch + lanes - 1) / lanes));
  return nv * lanes;
}

// pack[t][k][j] = x[t*tw + j][k], zero-padded past the batch. Reads run along k.
template <typename T>
at::Tensor pack(const at::Tensor& x, int64_t tw) {
  const int64_t batch = x.size(0), k_rows = x.size(1);
  const int64_t n_tiles = (batch + tw - 1) / tw;
  at::Tensor out = at::empty({n_tiles, k_rows, tw}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const T* src = x.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  const int64_t sb = x.stride(0), sk = x.stride(1);
  constexpr int64_t kBlock = 64;
  const int64_t k_blocks = (k_rows + kBlock - 1) / kBlock;
  at::parallel_for(0, n_tiles * k_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / k_blocks, k0 = (item % k_blocks) * kBlock;
      const int64_t k1 = std::min(k_rows, k0 + kBlock);
      T* tile = dst + t * k_rows * tw;
      const int64_t nb = std::min(tw, batch - t * tw);
      for (int64_t j = 0; j < nb; ++j) {
        const T* row = src + (t * tw + j) * sb;
        for (int64_t k = k0; k < k1; ++k) tile[k * tw + j] = row[k * sk];
      }
      for (int64_t j = nb; j < tw; ++j)
        for (int64_t k = k0; k < k1; ++k) tile[k * tw + j] = T(0);
    }
  });
  return out;
}

at::Tensor spmm(const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                const at::Tensor& crow, const at::Tensor& col, int64_t n_rows, const std::string& isa) {
  check_isa(isa);
  check_pattern(crow, col, n_rows);
  TORCH_CHECK(x.dim() == 2, "input must be 2-D (batch, features), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "the native kernels run on the CPU, input is on ", x.device());
  TORCH_CHECK(values.dim() == 1 && values.numel() == col.numel(), "values must be 1-D with one entry per "
              "non-zero (", col.numel(), "), got ", values.sizes());
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "input dtype ", x.scalar_type(),
              " differs from the weight's ", values.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the native kernels take float32 or float64, got ", x.scalar_type());
  const at::Tensor vals = values.contiguous();
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == n_rows && b.scalar_type() == x.scalar_type(), "bias must be (", n_rows, ",) of ",
                x.scalar_type());
  }
  const int64_t batch = x.size(0);
  at::Tensor out = at::empty({batch, n_rows}, x.options());
  if (batch == 0 || n_rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "actuallysparse_spmm", [&] {
    const KernelTable<scalar_t> table = table_for<scalar_t>(isa);
    const int64_t tw = tile_width(batch, table.lanes);
    const at::Tensor packed = pack<scalar_t>(x, tw);
    SpmmArgs<scalar_t> args{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), vals.data_ptr<scalar_t>(),
                            packed.data_ptr<scalar_t>(), x.size(1), tw, batch, out.data_ptr<scalar_t>(),
                            n_rows, b.defined() ? b.data_ptr<scalar_t>() : nullptr};
    const int64_t n_tiles = packed.size(0);
    constexpr int64_t kChunk = 64;  // rows per work item: 4 row blocks
    const int64_t n_chunks = (n_rows + kChunk - 1) / kChunk;
    at::parallel_for(0, n_tiles * n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / n_chunks, r0 = (item % n_chunks) * kChunk;
        table.spmm(args, t, r0, std::min(n_rows, r0 + kChunk));
      }
    });
  });
  return out;
}

// grad_out @ W through W's rows: work items are (tile, slice of W's rows), each scattering into
// its own accumulation tile; a second pass sums the slices and writes them transposed.
at::Tensor scatter(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& crow,
                   const at::Tensor& col, int64_t in_features, const std::string& isa) {
  check_isa(isa);
  TORCH_CHECK(grad_out.dim() == 2, "grad_out must be 2-D, got ", grad_out.sizes());
  const int64_t n_rows = grad_out.size(1);
  check_pattern(crow, col, n_rows);
  TORCH_CHECK(grad_out.scalar_type() == values.scalar_type(), "grad_out and values dtypes differ");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "the native kernels take float32 or float64, got ", values.scalar_type());
  TORCH_CHECK(values.numel() == col.numel(), "values must have one entry per non-zero");
  const int64_t batch = grad_out.size(0);
  at::Tensor out = at::empty({batch, in_features}, grad_out.options());
  if (batch == 0 || in_features == 0) return out;
  const at::Tensor vals = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "actuallysparse_scatter", [&] {
    const KernelTable<scalar_t> table = table_for<scalar_t>(isa);
    const int64_t tw = tile_width(batch, table.lanes);
    const at::Tensor packed = pack<scalar_t>(grad_out, tw);
    const int64_t n_tiles = packed.size(0);
    const int64_t threads = at::get_num_threads();
    const int64_t slices = std::max<int64_t>(1, (threads + n_tiles - 1) / n_tiles);
    at::Tensor acc = at::zeros({n_tiles, slices, in_features, tw}, grad_out.options());
    ScatterArgs<scalar_t> args{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), vals.data_ptr<scalar_t>(),
                               packed.data_ptr<scalar_t>(), n_rows, tw};
    scalar_t* acc_data = acc.data_ptr<scalar_t>();
    const int32_t* crow_data = crow.data_ptr<int32_t>();
    const int64_t nnz = col.numel();
    at::parallel_for(0, n_tiles * slices, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / slices, s = item % slices;
        // slices of about equal non-zeros, not equal rows
        const int32_t* lo = std::lower_bound(crow_data, crow_data + n_rows + 1, (nnz * s) / slices);
        const int32_t* hi = std::lower_bound(crow_data, crow_data + n_rows + 1, (nnz * (s + 1)) / slices);
        const int64_t r0 = lo - crow_data, r1 = s + 1 == slices ? n_rows : hi - crow_data;
        table.scatter(args, t, r0, r1, acc_data + item * in_features * tw);
      }
    });
    scalar_t* dst = out.data_ptr<scalar_t>();
    constexpr int64_t kBlock = 64;
    const int64_t blocks = (in_features + kBlock - 1) / kBlock;
    at::parallel_for(0, n_tiles * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / blocks, c0 = (item % blocks) * kBlock;
        const int64_t c1 = std::min(in_features, c0 + kBlock);
        const int64_t nb = std::min(tw, batch - t * tw);
        const scalar_t* first = acc_data + t * slices * in_features * tw;
        for (int64_t s = 1; s < slices; ++s) {
          scalar_t* sum = const_cast<scalar_t*>(first);
          const scalar_t* part = first + s * in_features * tw;
          for (int64_t i = c0 * tw; i < c1 * tw; ++i) sum[i] += part[i];
        }
        for (int64_t b = 0; b < nb; ++b)
          for (int64_t c = c0; c < c1; ++c) dst[(t * tw + b) * in_features + c] = first[c * tw + b];
      }
    });
  });
  return out;
}

at::Tensor sddmm(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                 const std::string& isa) {
  check_isa(isa);
  const int64_t n_rows = grad_out.size(1);
  check_pattern(crow, col, n_rows);
  TORCH_CHECK(grad_out.dim() == 2 && x.dim() == 2 && grad_out.size(0) == x.size(0),
              "grad_out and input must be 2-D with one batch, got ", grad_out.sizes(), " and ", x.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out and input dtypes differ");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the native kernels take float32 or float64, got ", x.scalar_type());
  const int64_t batch = x.size(0);
  at::Tensor grad_values = at::zeros({col.numel()}, x.options());
  if (batch == 0 || col.numel() == 0) return grad_values;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "actuallysparse_sddmm", [&] {
    const KernelTable<scalar_t> table = table_for<scalar_t>(isa);
    const int64_t tw = tile_width(batch, table.lanes);
    const at::Tensor packed_rows = pack<scalar_t>(grad_out, tw);
    const at::Tensor packed_cols = pack<scalar_t>(x, tw);
    SddmmArgs<scalar_t> args{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), packed_rows.data_ptr<scalar_t>(),
                             packed_cols.data_ptr<scalar_t>(), n_rows, x.size(1), tw,
                             grad_values.data_ptr<scalar_t>()};
    const int64_t n_tiles = packed_rows.size(0);
    // Threads own rows (so no two write one grad_values entry); each walks every tile.
    at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = 0; t < n_tiles; ++t) table.sddmm(args, t, begin, end, t > 0);
    });
  });
  return grad_values;
}

}  // namespace
}  // namespace actuallysparse

TORCH_LIBRARY(actuallysparse_kernels, m) {
  m.def("spmm(Tensor x, Tensor values, Tensor? bias, Tensor crow, Tensor col, int n_rows, str isa) -> Tensor");
  m.def("scatter(Tensor grad_out, Tensor values, Tensor crow, Tensor col, int in_features, str isa) -> Tensor");
  m.def("sddmm(Tensor grad_out, Tensor x, Tensor crow, Tensor col, str isa) -> Tensor");
  m.def("isa_supported(str isa) -> bool", &actuallysparse::isa_supported);
}

TORCH_LIBRARY_IMPL(actuallysparse_kernels, CPU, m) {
  m.impl("spmm", &actuallysparse::spmm);
  m.impl("sddmm", &actuallysparse::sddmm);
  m.impl("scatter", &actuallysparse::scatter);
}
