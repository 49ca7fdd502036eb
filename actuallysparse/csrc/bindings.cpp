// Torch side of the kernels: argument checks, packing of the dense operand into batch tiles,
// threads (at::parallel_for, so torch.set_num_threads governs them and no second OpenMP
// runtime is loaded) and the choice of instruction set. Registered as operators in the
// `actuallysparse_kernels` namespace; actuallysparse/kernels.py wraps them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <iterator>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "kernels.h"
#include "pooling.h"

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

const std::string kIsas[] = {"avx512", "avx2", "scalar"};  // best first

// The instruction set a call runs on: the one named, else the one the environment variable
// ACTUALLYSPARSE_ISA names, else the best this CPU has. The variable is read here, at every call:
// getenv sees what Python's os.environ sets (it writes through to the process's environment), and
// costs a few dozen nanoseconds where an os.environ lookup took 0.6 us of each product's call.
const std::string& chosen_isa(const std::string& requested) {
  std::string name = requested;
  if (name.empty()) {
    for (const char* c = std::getenv("ACTUALLYSPARSE_ISA"); c != nullptr && *c != '\0'; ++c)
      if (!std::isspace(static_cast<unsigned char>(*c))) name += static_cast<char>(std::tolower(*c));
    if (name.empty()) {
      static const std::string& best = *std::find_if(std::begin(kIsas), std::end(kIsas), isa_supported);
      return best;
    }
  }
  const std::string* isa = std::find(std::begin(kIsas), std::end(kIsas), name);
  const char* source = requested.empty() ? "ACTUALLYSPARSE_ISA=" : "";
  TORCH_CHECK_VALUE(isa != std::end(kIsas), source, "'", name,
                    "' is not an instruction set; use one of avx512, avx2, scalar");
  if (!isa_supported(*isa)) {
    std::string supported;
    for (const std::string& other : kIsas)
      if (isa_supported(other)) supported += (supported.empty() ? "" : ", ") + other;
    TORCH_CHECK(false, source, "'", name, "' names an instruction set this CPU lacks; it supports only ", supported);
  }
  return *isa;
}

void check_pattern(const at::Tensor& crow, const at::Tensor& col, int64_t n_rows) {
  TORCH_CHECK(crow.scalar_type() == at::kInt && (col.scalar_type() == at::kInt || col.scalar_type() == at::kShort),
              "the native kernels take int32 row pointers and int32 or int16 column indices, got ",
              crow.scalar_type(), " and ", col.scalar_type());
  TORCH_CHECK(crow.dim() == 1 && crow.numel() == n_rows + 1, "row pointers must have ", n_rows + 1,
              " entries, got ", crow.sizes());
  TORCH_CHECK(crow.is_contiguous() && col.is_contiguous(), "pattern indices must be contiguous");
  TORCH_CHECK(crow.device().is_cpu() && col.device().is_cpu(), "the native kernels run on the CPU");
}

// Calls body(I{}) with I the column indices' type (int32_t or int16_t; check_pattern allows only these).
template <typename F>
void with_column_type(const at::Tensor& col, F&& body) {
  if (col.scalar_type() == at::kShort) {
    body(int16_t{});
  } else {
    body(int32_t{});
  }
}

template <typename T, typename I>
auto spmm_kernel(const KernelTable<T>& table) {
  if constexpr (sizeof(I) == 2) return table.spmm16;
  else return table.spmm;
}

template <typename T, typename I>
auto backward_kernel(const KernelTable<T>& table) {
  if constexpr (sizeof(I) == 2) return table.backward16;
  else return table.backward;
}

// The input and values a product takes: on the CPU, float32 or float64 alike, one value per non-zero.
void check_operands(const at::Tensor& x, const at::Tensor& values, const at::Tensor& col) {
  TORCH_CHECK(x.device().is_cpu(), "the native kernels run on the CPU, input is on ", x.device());
  TORCH_CHECK(values.dim() == 1 && values.numel() == col.numel(), "values must be 1-D with one entry per "
              "non-zero (", col.numel(), "), got ", values.sizes());
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "input dtype ", x.scalar_type(),
              " differs from the weight's ", values.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the native kernels take float32 or float64, got ", x.scalar_type());
}

// The bias as a contiguous tensor, or an undefined one for none.
at::Tensor checked_bias(const c10::optional<at::Tensor>& bias, int64_t n_rows, at::ScalarType dtype) {
  if (!bias.has_value()) return at::Tensor();
  const at::Tensor b = bias->contiguous();
  TORCH_CHECK(b.numel() == n_rows && b.scalar_type() == dtype, "bias must be (", n_rows, ",) of ", dtype);
  return b;
}

// Tile width: enough vectors for the batch, at most four (see kernels.h); a single row is
// its own tile of width 1. Tried on an Intel Xeon and not taken: forward tiles of two AVX-512
// vectors at B=64, so each of two threads takes a tile instead of half of W's rows over one.
// 4096x4096 at 0.9 ran 3.8-4.2 against 5.7-6.0 ms in two processes, but level (4.17 against
// 4.13) in a third, and the pruned VGG11_bn's folded inference level (48.3 against 49.2 ms).
int64_t tile_width(int64_t batch, int lanes) {
  if (batch == 1) return 1;
  const int64_t nv = std::min<int64_t>(4, std::max<int64_t>(1, (batch + lanes - 1) / lanes));
  return nv * lanes;
}

// pack[t][k][j] = x[t*tw + j][k], zero-padded past the batch. Reads run along k. A contiguous
// single row is already in that layout and is used as it is; small copies stay on one thread
// (waking the pool costs more than copying a few thousand elements).
template <typename T>
at::Tensor pack(const KernelTable<T>& table, const at::Tensor& x, int64_t tw) {
  const int64_t batch = x.size(0), k_rows = x.size(1);
  if (tw == 1 && batch == 1 && x.is_contiguous()) return x.view({1, k_rows, 1});
  const int64_t n_tiles = (batch + tw - 1) / tw;
  at::Tensor out = at::empty({n_tiles, k_rows, tw}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const T* src = x.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  const int64_t sb = x.stride(0), sk = x.stride(1);
  constexpr int64_t kBlock = 64;
  const int64_t k_blocks = (k_rows + kBlock - 1) / kBlock;
  constexpr int64_t kMinElementsPerThread = 1 << 15;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / (kBlock * tw));
  at::parallel_for(0, n_tiles * k_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / k_blocks, k0 = (item % k_blocks) * kBlock;
      const int64_t k1 = std::min(k_rows, k0 + kBlock);
      T* tile = dst + t * k_rows * tw;
      const int64_t nb = std::min(tw, batch - t * tw);
      table.pack_rows(src + t * tw * sb + k0 * sk, sb, sk, k1 - k0, nb, tile + k0 * tw, tw);
      for (int64_t j = nb; j < tw; ++j)
        for (int64_t k = k0; k < k1; ++k) tile[k * tw + j] = T(0);
    }
  });
  return out;
}

at::Tensor spmm(const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                const at::Tensor& crow, const at::Tensor& col, int64_t n_rows, const std::string& requested_isa) {
  const std::string& isa = chosen_isa(requested_isa);
  check_pattern(crow, col, n_rows);
  TORCH_CHECK(x.dim() == 2, "input must be 2-D (batch, features), got ", x.sizes());
  check_operands(x, values, col);
  const at::Tensor vals = values.contiguous();
  const at::Tensor b = checked_bias(bias, n_rows, x.scalar_type());
  const int64_t batch = x.size(0);
  at::Tensor out = at::empty({batch, n_rows}, x.options());
  if (batch == 0 || n_rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "actuallysparse_spmm", [&] {
    const KernelTable<scalar_t> table = table_for<scalar_t>(isa);
    const int64_t tw = tile_width(batch, table.lanes);
    const at::Tensor packed = pack<scalar_t>(table, x, tw);
    with_column_type(col, [&](auto column) {
      using I = decltype(column);
      SpmmArgs<scalar_t, I> args{crow.data_ptr<int32_t>(), col.data_ptr<I>(), vals.data_ptr<scalar_t>(),
                                 packed.data_ptr<scalar_t>(), x.size(1), tw, batch, out.data_ptr<scalar_t>(),
                                 n_rows, b.defined() ? b.data_ptr<scalar_t>() : nullptr};
      const auto kernel = spmm_kernel<scalar_t, I>(table);
      const int64_t n_tiles = packed.size(0);
      constexpr int64_t kChunk = 64;  // rows per work item: 4 row blocks
      const int64_t n_chunks = (n_rows + kChunk - 1) / kChunk;
      at::parallel_for(0, n_tiles * n_chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t t = item / n_chunks, r0 = (item % n_chunks) * kChunk;
          kernel(args, t, r0, std::min(n_rows, r0 + kChunk));
        }
      });
    });
  });
  return out;
}

// First row of slice s when rows [0, n_rows) are cut into `slices` parts of about equal non-zeros.
int64_t slice_start(const int32_t* crow, int64_t n_rows, int64_t nnz, int64_t s, int64_t slices) {
  if (s == 0) return 0;
  if (s == slices) return n_rows;
  return std::lower_bound(crow, crow + n_rows + 1, (nnz * s) / slices) - crow;
}

// The gradients over W's rows. The value gradient's work items are slices of W's rows with about
// equal non-zeros, one per thread; each walks every batch tile and owns its rows' grad_values. The
// input gradient is scattered into accumulation tiles of the input's layout, written transposed
// into grad_x at the end: where the batch tiles share out evenly over the threads (every tile costs
// the same, full or not), each item is a tile and walks all of W's rows into its own accumulation
// tile; otherwise the items are the row slices, each with its own tiles, summed at the end. By
// tiles that sum is gone and the accumulation tiles take 1/threads of the bytes. Measured against
// row slices for both (AMD EPYC Zen 4, 2 threads, 4096x4096, both gradients, the two in one build
// and process, calls interleaved, fastest of 11): with AVX2 (two tiles from B=64) 6.93 -> 6.82 ms
// at B=64, 14.4 -> 13.8 at B=128 and 28.9 -> 27.5 at B=256 at 0.9, 1.55 -> 1.33, 2.69 -> 2.43 and
// 5.45 -> 4.82 at 0.99; with AVX-512 (two tiles from B=128) 16.3 -> 15.2 and 30.1 -> 28.3 at 0.9,
// 2.07 -> 1.96 and 5.12 -> 4.58 at 0.99, where a first run had read 0.9 at 0.98x and 0.96x and 0.99
// at 1.12x both (unchanged paths differed by up to 16 % in that run). 512x4096 gained up to 1.6x at
// 0.99, 4096x512 ran level. Narrower tiles for the input gradient alone where the batch's tiles do
// not share out (one tile of 64 on two threads with AVX-512; the output gradient packed again at
// half the width) were mixed on the same CPU: 0.96-0.98x for 4096x4096 at B=64, 0.80-0.92x for
// 4096x512, up to 1.8x for 512x4096; not taken.
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x,
                                            const at::Tensor& values, const at::Tensor& crow,
                                            const at::Tensor& col, bool need_input, bool need_values,
                                            const std::string& requested_isa) {
  const std::string& isa = chosen_isa(requested_isa);
  TORCH_CHECK(grad_out.dim() == 2 && x.dim() == 2 && grad_out.size(0) == x.size(0),
              "grad_out and input must be 2-D with one batch, got ", grad_out.sizes(), " and ", x.sizes());
  const int64_t n_rows = grad_out.size(1), in_features = x.size(1), batch = x.size(0);
  check_pattern(crow, col, n_rows);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && values.scalar_type() == x.scalar_type(),
              "grad_out, input and values must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the native kernels take float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(values.dim() == 1 && values.numel() == col.numel(), "values must have one entry per non-zero");
  // a gradient not asked for comes back empty
  // Both are written whole below (every non-zero by the first tile, every input entry by the
  // unpacking), so they start uninitialised unless nothing is computed.
  at::Tensor grad_x = at::empty({need_input ? batch : 0, in_features}, x.options());
  at::Tensor grad_values = at::empty({need_values ? col.numel() : 0}, x.options());
  if (batch == 0 || col.numel() == 0 || (!need_input && !need_values)) return {grad_x.zero_(), grad_values.zero_()};
  const at::Tensor vals = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "actuallysparse_backward", [&] {
    const KernelTable<scalar_t> table = table_for<scalar_t>(isa);
    const int64_t tw = tile_width(batch, table.lanes);
    const at::Tensor packed_rows = pack<scalar_t>(table, grad_out, tw);
    const at::Tensor packed_cols = need_values ? pack<scalar_t>(table, x, tw) : at::Tensor();
    const int64_t n_tiles = packed_rows.size(0);
    const int64_t threads = at::get_num_threads();
    const bool input_by_tiles = need_input && n_tiles % threads == 0;
    const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(threads, n_rows));
    const int64_t acc_slices = input_by_tiles ? 1 : slices;
    // zeroed tile by tile just before each is scattered into (see the convolution's backward)
    at::Tensor acc = need_input ? at::empty({acc_slices, n_tiles, in_features, tw}, x.options()) : at::Tensor();
    scalar_t* acc_data = need_input ? acc.data_ptr<scalar_t>() : nullptr;
    const int32_t* crow_data = crow.data_ptr<int32_t>();
    const int64_t nnz = col.numel();
    with_column_type(col, [&](auto column) {
      using I = decltype(column);
      BackwardArgs<scalar_t, I> args{crow_data, col.data_ptr<I>(), vals.data_ptr<scalar_t>(),
                                     packed_rows.data_ptr<scalar_t>(),
                                     need_values ? packed_cols.data_ptr<scalar_t>() : nullptr, n_rows, in_features, tw,
                                     need_values ? grad_values.data_ptr<scalar_t>() : nullptr};
      const auto kernel = backward_kernel<scalar_t, I>(table);
      // a tile's accumulation, zeroed just before the scatter into it (in its cache)
      const auto zeroed = [&](int64_t s, int64_t t) {
        scalar_t* tile_acc = acc_data + (s * n_tiles + t) * in_features * tw;
        std::fill(tile_acc, tile_acc + in_features * tw, scalar_t(0));
        return tile_acc;
      };
      if (need_values || !input_by_tiles) {
        at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
          for (int64_t s = begin; s < end; ++s) {
            const int64_t r0 = slice_start(crow_data, n_rows, nnz, s, slices);
            const int64_t r1 = slice_start(crow_data, n_rows, nnz, s + 1, slices);
            for (int64_t t = 0; t < n_tiles; ++t)
              kernel(args, t, r0, r1, need_input && !input_by_tiles ? zeroed(s, t) : nullptr, t > 0);
          }
        });
      }
      if (!input_by_tiles) return;
      BackwardArgs<scalar_t, I> input_args = args;
      input_args.grad_values = nullptr;
      at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) kernel(input_args, t, 0, n_rows, zeroed(0, t), false);
      });
    });
    if (!need_input) return;
    scalar_t* dst = grad_x.data_ptr<scalar_t>();
    constexpr int64_t kBlock = 64;
    const int64_t blocks = (in_features + kBlock - 1) / kBlock;
    const int64_t slice_stride = n_tiles * in_features * tw;
    at::parallel_for(0, n_tiles * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / blocks, c0 = (item % blocks) * kBlock;
        const int64_t c1 = std::min(in_features, c0 + kBlock);
        const int64_t nb = std::min(tw, batch - t * tw);
        scalar_t* first = acc_data + t * in_features * tw;
        for (int64_t s = 1; s < acc_slices; ++s) {
          const scalar_t* part = first + s * slice_stride;
          for (int64_t i = c0 * tw; i < c1 * tw; ++i) first[i] += part[i];
        }
        for (int64_t b = 0; b < nb; ++b)
          for (int64_t c = c0; c < c1; ++c) dst[(t * tw + b) * in_features + c] = first[c * tw + b];
      }
    });
  });
  return {grad_x, grad_values};
}


// ------------------------------------------------------------------ convolution
// geometry = [kh, kw, stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_bottom, pad_left, pad_right]
struct ConvGeometry {
  int64_t kh, kw, sh, sw, dh, dw, pt, pb, pl, pr;
  int64_t channels, height, width, padded_h, padded_w, out_h, out_w;
};

ConvGeometry conv_geometry(int64_t channels, int64_t height, int64_t width, at::IntArrayRef g) {
  TORCH_CHECK(g.size() == 10, "convolution geometry must hold 10 integers, got ", g.size());
  ConvGeometry c{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], 0, 0, 0, 0, 0, 0, 0};
  TORCH_CHECK(c.kh > 0 && c.kw > 0 && c.sh > 0 && c.sw > 0 && c.dh > 0 && c.dw > 0 && c.pt >= 0 && c.pb >= 0 &&
              c.pl >= 0 && c.pr >= 0, "kernel size, stride and dilation must be positive and padding >= 0, got ", g);
  TORCH_CHECK(channels >= 0 && height >= 0 && width >= 0, "channels, height and width must be >= 0, got ", channels,
              ", ", height, " and ", width);
  c.channels = channels;
  c.height = height;
  c.width = width;
  c.padded_h = c.height + c.pt + c.pb;
  c.padded_w = c.width + c.pl + c.pr;
  const int64_t span_h = c.dh * (c.kh - 1) + 1, span_w = c.dw * (c.kw - 1) + 1;
  TORCH_CHECK(c.padded_h >= span_h && c.padded_w >= span_w, "padded input ", c.padded_h, "x", c.padded_w,
              " is smaller than the dilated kernel ", span_h, "x", span_w);
  c.out_h = (c.padded_h - span_h) / c.sh + 1;
  c.out_w = (c.padded_w - span_w) / c.sw + 1;
  TORCH_CHECK(c.channels * c.padded_h * c.padded_w <= INT32_MAX, "input too large for int32 offsets");
  return c;
}

ConvGeometry conv_geometry(const at::Tensor& x, at::IntArrayRef g) {
  TORCH_CHECK(x.dim() == 4, "convolution input must be 4-D (batch, channels, height, width), got ", x.sizes());
  return conv_geometry(x.size(1), x.size(2), x.size(3), g);
}

// Each non-zero's input row in the padded layout (see conv_impl.h): its column is c*kh*kw + i*kw + j.
// Runs on every forward and backward, so it looks offsets up in a table of the C * kh * kw
// possible columns (built without a division) instead of dividing per non-zero: at 512x512x3x3,
// 0.9 sparse, the per-non-zero divisions cost about 1 ms a call. The lookup runs on every thread
// and checks the columns' range once per chunk, after the loop, so the loop has no branch: at one
// image it had taken as long as the 512->512 @2x2 convolution itself (a fifth of that layer's
// profile, with the other thread idle meanwhile). Tried and dropped: no pass at all for one image,
// its kernel looking each column's offset up itself; the dependent loads (column, table, input)
// made the 2x2 and 4x4 layers slower than this pass (512->512 @2x2: 178 against 142 us).
// With `narrow`, offsets that fit 16 bits (the padded input has at most 65536 rows) come back as
// int16 holding them unsigned (ConvArgs::off16): with its value a non-zero is 6 bytes to read
// instead of 8, and at one image the forward is bound by those reads.
bool offsets_fit_16_bits(const ConvGeometry& g) { return g.channels * g.padded_h * g.padded_w <= (1 << 16); }

at::Tensor conv_offsets(const at::Tensor& col, const ConvGeometry& g, bool narrow) {
  const int64_t columns = g.channels * g.kh * g.kw;
  std::vector<int32_t> table(columns);
  for (int64_t c = 0, at = 0; c < g.channels; ++c)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j, ++at)
        table[at] = static_cast<int32_t>((c * g.padded_h + i * g.dh) * g.padded_w + j * g.dw);
  const bool short_offsets = narrow && offsets_fit_16_bits(g);
  at::Tensor off = at::empty({col.numel()}, col.options().dtype(short_offsets ? at::kShort : at::kInt));
  const int32_t* lookup = table.data();
  with_column_type(col, [&](auto column) {
    using I = decltype(column);
    const I* src = col.data_ptr<I>();
    const auto fill = [&](auto* dst) {
      using O = std::remove_pointer_t<decltype(dst)>;
      constexpr int64_t kGrain = 1 << 15;
      at::parallel_for(0, col.numel(), kGrain, [&](int64_t begin, int64_t end) {
        bool outside = false;
        for (int64_t k = begin; k < end; ++k) {
          const int64_t c = src[k];
          outside |= c < 0 || c >= columns;
          dst[k] = static_cast<O>(lookup[c < 0 || c >= columns ? 0 : c]);
        }
        if (!outside) return;
        for (int64_t k = begin; k < end; ++k)
          TORCH_CHECK(src[k] >= 0 && src[k] < columns, "a non-zero's column ", src[k], " lies outside the ",
                      columns, " columns of ", g.channels, " input channels x ", g.kh, "x", g.kw, " taps");
      });
    };
    if (short_offsets)
      fill(reinterpret_cast<uint16_t*>(off.data_ptr<int16_t>()));
    else
      fill(off.data_ptr<int32_t>());
  });
  return off;
}

// conv_offsets as an operator, for a caller that keeps them for repeated calls at one input size
// (the layer's inference cache: at one image the pass costs a large share of the product).
at::Tensor input_offsets(const at::Tensor& col, int64_t channels, int64_t height, int64_t width,
                         at::IntArrayRef geometry) {
  TORCH_CHECK((col.scalar_type() == at::kInt || col.scalar_type() == at::kShort) && col.dim() == 1 &&
              col.is_contiguous(), "column indices must be contiguous 1-D int32 or int16, got ", col.sizes(), " ",
              col.scalar_type());
  return conv_offsets(col, conv_geometry(channels, height, width, geometry), true);
}

// Where each block of `block_channels` input channels starts in each row of the pattern:
// (n_rows, n_blocks + 1), the columns of a row being sorted by channel (c * kh * kw + tap).
at::Tensor channel_block_ptr(const at::Tensor& crow, const at::Tensor& col, int64_t n_rows, const ConvGeometry& g,
                             int64_t block_channels) {
  const int64_t n_blocks = (g.channels + block_channels - 1) / block_channels;
  at::Tensor ptr = at::empty({n_rows, n_blocks + 1}, crow.options());
  const int32_t* rows = crow.data_ptr<int32_t>();
  int32_t* out = ptr.data_ptr<int32_t>();
  const int64_t span = block_channels * g.kh * g.kw;
  with_column_type(col, [&](auto column) {
    const auto* cols = col.data_ptr<decltype(column)>();
    // a pass over the non-zeros at every call, split over the threads (on one thread, 1.4 % of the
    // samples of the pruned VGG11_bn's inference at batch 64)
    at::parallel_for(0, n_rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        int32_t k = rows[o];
        int32_t* row = out + o * (n_blocks + 1);
        for (int64_t b = 0; b < n_blocks; ++b) {
          row[b] = k;
          while (k < rows[o + 1] && cols[k] < (b + 1) * span) ++k;
        }
        row[n_blocks] = rows[o + 1];
      }
    });
  });
  return ptr;
}

// pixel_base[y * out_w + x] = y * sh * Wp + x * sw: where output pixel (y, x)'s window starts in
// the padded layout.
at::Tensor pixel_bases(const ConvGeometry& g, const at::TensorOptions& options) {
  at::Tensor bases = at::empty({g.out_h * g.out_w}, options);
  int32_t* out = bases.data_ptr<int32_t>();
  for (int64_t y = 0; y < g.out_h; ++y)
    for (int64_t x = 0; x < g.out_w; ++x) out[y * g.out_w + x] = static_cast<int32_t>(y * g.sh * g.padded_w + x * g.sw);
  return bases;
}

// Input channels per block: the forward keeps the input rows one block of 16 output pixels reads
// within 64 KiB, the backward a block's whole padded planes within 128 KiB (both in L2). Measured
// in one process on VGG11's CIFAR layers at 0.9, B=64 (AMD EPYC, AVX2, 2 threads; sum over the six
// layers): forward 38 ms at 64 KiB against 52 at 16 KiB, 42 at 256 KiB and 44 unblocked; input
// gradient 48 ms at 128 KiB against 56 unblocked, value gradient 34 against 40. Smaller backward
// blocks slowed the value gradient (AMD EPYC Zen 4, AVX-512, the budget switched between calls in
// one process: 25.4 ms at 128 KiB against 26.0, 26.4, 27.8, 29.7 and 30.1 at 64, 32, 16, 8 and 4).
// With 16-float AVX-512 tiles on an Intel Xeon (L2 2 MiB) neither budget gained from moving:
// the six layers' forward and both gradients took 31.5/69.3 ms as they are, 31.1/69.6 with
// 32 KiB and 34.7/73.7 with 128 KiB forward blocks, 31.5/71.8 and 31.3/73.7 with 64 and 256 KiB
// backward ones.
constexpr int64_t kForwardBlockBytes = 64 << 10;
constexpr int64_t kBackwardBlockBytes = 128 << 10;

int64_t channels_per_block(int64_t bytes_per_channel, int64_t budget, int64_t channels) {
  return std::max<int64_t>(1, std::min<int64_t>(channels, budget / std::max<int64_t>(1, bytes_per_channel)));
}

// The single-image forward's channel blocks (packed rows a block spans, 0 for one block): as
// many input channels as keep the rows one run of `run_lanes` pixels reads within three quarters
// of L1d (read at run time; 32 KiB where the system does not say). Walking all channels for
// every output channel re-read the packed planes from L2 once they outgrew L1. Measured in one
// process (Intel Xeon with AVX-512, L1d 48 KiB, B=1, 0.9, 11 interleaved rounds), VGG11's
// layers unblocked against blocked at 36 KiB: 256->256 @8x8 (100 KiB of planes) 158 -> 129 us,
// 512->512 @4x4 (72 KiB) 220 -> 171 us, the others (34-50 KiB read a run) within 3 %; the six
// summed 713 -> 635 us, and 24, 32 and 40 KiB alike.
int64_t l1d_bytes() {
  static const int64_t bytes = [] {
    const long reported = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    return reported > 0 ? int64_t(reported) : int64_t(32) << 10;
  }();
  return bytes;
}

int64_t single_image_block(const ConvGeometry& g, int64_t run_lanes, int64_t element_bytes) {
  const int64_t plane = g.padded_h * g.padded_w;
  const int64_t window = std::min(plane, run_lanes + (g.kh - 1) * g.dh * g.padded_w + (g.kw - 1) * g.dw);
  const int64_t channels = channels_per_block(window * element_bytes, l1d_bytes() * 3 / 4, g.channels);
  return channels < g.channels ? channels * plane : 0;
}

// Convolution tiles are whole vectors even for a batch of one (no spmv-like path), as many as
// make a tile's row kConvTileBytes (one cache line: 16 floats, two AVX2 vectors or one AVX-512
// vector; see conv_impl.h for the measurements), at least one; `tile_vectors` > 0 overrides that
// cap, for measuring other widths.
constexpr int64_t kConvTileBytes = 64;

int64_t conv_tile_width(int64_t batch, int lanes, int64_t element_bytes, int64_t tile_vectors) {
  TORCH_CHECK(tile_vectors >= 0 && tile_vectors <= 4, "tile_vectors must be 0 (automatic) to 4, got ", tile_vectors);
  const int64_t cap = tile_vectors > 0 ? tile_vectors : std::max<int64_t>(1, kConvTileBytes / (lanes * element_bytes));
  return std::min<int64_t>(cap, std::max<int64_t>(1, (batch + lanes - 1) / lanes)) * lanes;
}

// pack[t][(c*Hp + h)*Wp + w][j] = x[t*tw + j][c][h - pt][w - pl], zero in the padding and past the batch.
// A tile width of 1 gets kConvSingleSlack elements of zeros past the end, which the single-image
// forward's last vectors may read.
template <typename T>
at::Tensor pack_padded(const KernelTable<T>& table, const at::Tensor& x, int64_t tw, const ConvGeometry& g) {
  const int64_t batch = x.size(0);
  const int64_t n_tiles = (batch + tw - 1) / tw;
  const int64_t plane = g.padded_h * g.padded_w;
  // Uninitialised, then each plane zeroes only what the copy below does not write (its padding,
  // and lanes past the batch): a zeroed buffer would be written twice (measured: zero-filling was
  // 9-15 % of a pruned VGG11_bn's step).
  at::Tensor out = at::empty({n_tiles * g.channels * plane * tw + (tw == 1 ? kConvSingleSlack : 0)}, x.options());
  const T* src = x.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  if (tw == 1) std::fill(dst + n_tiles * g.channels * plane, dst + out.numel(), T(0));
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  // as in pack: a small copy stays on one thread (a single image's planes are a few KiB)
  constexpr int64_t kMinElementsPerThread = 1 << 15;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / (plane * tw));
  at::parallel_for(0, n_tiles * g.channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / g.channels, c = item % g.channels;
      const int64_t nb = std::min(tw, batch - t * tw);
      T* tile = dst + (t * g.channels + c) * plane * tw;
      if (nb < tw) {
        std::fill(tile, tile + plane * tw, T(0));
      } else {
        const int64_t row = g.padded_w * tw;
        std::fill(tile, tile + g.pt * row, T(0));
        std::fill(tile + (g.pt + g.height) * row, tile + plane * tw, T(0));
        for (int64_t h = g.pt; h < g.pt + g.height; ++h) {
          std::fill(tile + h * row, tile + h * row + g.pl * tw, T(0));
          std::fill(tile + h * row + (g.pl + g.width) * tw, tile + (h + 1) * row, T(0));
        }
      }
      const T* images = src + t * tw * sn + c * sc;
      for (int64_t h = 0; h < g.height; ++h)
        table.pack_rows(images + h * sh, sn, sw, g.width, nb, tile + ((h + g.pt) * g.padded_w + g.pl) * tw, tw);
    }
  });
  return out;
}

// Whether the forward can pool 2x2 windows as it writes: batch tiles (not the single-image path)
// and items of whole pairs of output rows that fit the partial sums' buffer.
bool conv_pools_in_kernel(int64_t tw, const ConvGeometry& g) {
  return tw > 1 && conv_pool_block(g.out_w) <= kConvBlockCapacity;
}

// The forward kernel over an input already packed by pack_padded at tile width tw for geometry g:
// out (batch, n_rows, g.out_h, g.out_w), or with `pool` (where conv_pools_in_kernel) its 2x2
// max-pool (batch, n_rows, g.out_h / 2, g.out_w / 2). A tile width of 1 takes the single-image path.
template <typename T>
void run_conv_forward(const KernelTable<T>& table, const at::Tensor& packed, int64_t tw, int64_t batch,
                      const ConvGeometry& g, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& off,
                      const T* values, const T* bias, int64_t n_rows, at::Tensor& out, bool relu = false,
                      bool pool = false) {
  const bool single = tw == 1;
  TORCH_INTERNAL_ASSERT(!pool || conv_pools_in_kernel(tw, g), "pooling in the forward needs batch tiles");
  const int64_t pixel_block = pool ? conv_pool_block(g.out_w) : kConvPixelBlock;
  // the input rows one block of output pixels reads, per channel
  const int64_t out_rows = std::min<int64_t>(g.out_h, (pixel_block + g.out_w - 1) / g.out_w);
  const int64_t in_rows_read = (out_rows - 1) * g.sh + (g.kh - 1) * g.dh + 1;
  const int64_t in_cols_read = out_rows > 1 ? g.padded_w
                                            : (std::min<int64_t>(g.out_w, pixel_block) - 1) * g.sw + (g.kw - 1) * g.dw + 1;
  const int64_t block_channels = channels_per_block(in_rows_read * in_cols_read * tw * int64_t(sizeof(T)),
                                                    kForwardBlockBytes, g.channels);
  // the single-image path walks whole rows of the pattern and needs neither blocks nor pixel bases
  const at::Tensor block_ptr = single ? at::Tensor() : channel_block_ptr(crow, col, n_rows, g, block_channels);
  const at::Tensor bases = single ? at::Tensor() : pixel_bases(g, crow.options());
  const bool short_offsets = off.scalar_type() == at::kShort;
  const int vectors = single ? conv_single_vectors(g.out_h, g.out_w, g.padded_w, g.sh, table.lanes) : 0;
  const int64_t single_block = single ? single_image_block(g, vectors * table.lanes, sizeof(T)) : 0;
  ConvArgs<T> args{crow.data_ptr<int32_t>(), short_offsets ? nullptr : off.data_ptr<int32_t>(), values,
                   packed.data_ptr<T>(),
                   g.channels * g.padded_h * g.padded_w, tw, batch, g.padded_w, g.out_h, g.out_w, g.sh, g.sw,
                   out.data_ptr<T>(), n_rows, bias,
                   single ? nullptr : block_ptr.data_ptr<int32_t>(), single ? 0 : block_ptr.size(1) - 1,
                   single ? nullptr : bases.data_ptr<int32_t>(),
                   short_offsets ? reinterpret_cast<const uint16_t*>(off.data_ptr<int16_t>()) : nullptr, vectors,
                   single_block, relu, pixel_block, pool};
  // as many channels an item as the partial sums' buffer holds for its pixels
  const int64_t chunk_rows = std::min<int64_t>(kConvChannelChunk, kConvBlockCapacity / pixel_block);
  const int64_t n_chunks = (n_rows + chunk_rows - 1) / chunk_rows;
  if (single) {
    const int64_t runs = conv_single_runs(g.out_h, g.out_w, g.padded_w, g.sh, vectors, table.lanes);
    at::parallel_for(0, runs * n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t run = item / n_chunks, chunk = item % n_chunks;
        table.conv_forward(args, 0, run, chunk * chunk_rows, std::min(n_rows, (chunk + 1) * chunk_rows));
      }
    });
    return;
  }
  const int64_t n_tiles = (batch + tw - 1) / tw;
  // pooled, an odd last output row is in no window
  const int64_t pixels = (pool ? g.out_h / 2 * 2 : g.out_h) * g.out_w;
  const int64_t pixel_blocks = (pixels + pixel_block - 1) / pixel_block;
  // Items run tile, then block of output pixels, then channel chunk: one thread's consecutive
  // items share the input rows of one pixel block.
  at::parallel_for(0, n_tiles * pixel_blocks * n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item % n_chunks, rest = item / n_chunks;
      const int64_t block = rest % pixel_blocks, t = rest / pixel_blocks;
      table.conv_forward(args, t, block * pixel_block, chunk * chunk_rows,
                         std::min(n_rows, (chunk + 1) * chunk_rows));
    }
  });
}

int64_t lane_count(const std::string& isa, at::ScalarType dtype) {
  return dtype == at::kDouble ? table_for<double>(isa).lanes : table_for<float>(isa).lanes;
}

// The instruction set of a single image's forward: on AVX-512, AVX2's where every output pixel
// fits one of its vectors (a 2x2 output spans 6 lanes at its padded width of 4). There a 16-lane
// load crosses a cache line at 8 of a 3x3 kernel's 9 taps, an 8-lane load at 2. Measured (AVX-512
// EPYC, B=1, 0.9, the two in one process, interleaved, median of 15 rounds): VGG11's two
// 512->512 @2x2 layers 125 -> 99 and 102 us; 4x4 outputs (22 lanes) ran alike on both, and wider
// ones 5-16 % slower on AVX2, so they keep AVX-512.
const std::string& single_image_isa(const std::string& isa, const ConvGeometry& g, at::ScalarType dtype) {
  static const std::string avx2 = "avx2";
  if (isa != "avx512" || !isa_supported(avx2)) return isa;
  return conv_single_span(g.out_h, g.out_w, g.padded_w, g.sh) <= lane_count(avx2, dtype) ? avx2 : isa;
}

at::Tensor conv2d(const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& crow, const at::Tensor& col, int64_t n_rows, at::IntArrayRef geometry,
                  const std::string& requested_isa, int64_t tile_vectors, const c10::optional<at::Tensor>& offsets,
                  bool relu, bool pool) {
  const std::string& isa = chosen_isa(requested_isa);
  check_pattern(crow, col, n_rows);
  check_operands(x, values, col);
  const ConvGeometry g = conv_geometry(x, geometry);
  if (offsets.has_value())
    TORCH_CHECK(offsets->dim() == 1 && offsets->numel() == col.numel() && offsets->is_contiguous() &&
                offsets->device() == col.device() && (offsets->scalar_type() == at::kInt ||
                (offsets->scalar_type() == at::kShort && offsets_fit_16_bits(g))), "offsets must be the ",
                col.numel(), " contiguous offsets conv_offsets gives for this pattern and input size (int16 only "
                "where they fit), got ", offsets->sizes(), " ", offsets->scalar_type());
  const at::Tensor vals = values.contiguous();
  const at::Tensor b = checked_bias(bias, n_rows, x.scalar_type());
  TORCH_CHECK(!pool || (g.out_h >= 2 && g.out_w >= 2), "pooling 2x2 windows needs an output of at least 2x2, got ",
              g.out_h, "x", g.out_w);
  const int64_t batch = x.size(0);
  // one image with stride 1 along the width: vectors over the pixels of a row (tile width 1)
  const bool single = batch == 1 && g.sw == 1 && tile_vectors == 0;
  const std::string& kernel_isa = single ? single_image_isa(isa, g, x.scalar_type()) : isa;
  const int64_t lanes = lane_count(kernel_isa, x.scalar_type());
  const int64_t tw = single ? 1 : conv_tile_width(batch, lanes, x.element_size(), tile_vectors);
  // pooled as the forward writes where it can, else after it
  const bool pool_in_kernel = pool && conv_pools_in_kernel(tw, g);
  at::Tensor out = pool_in_kernel ? at::empty({batch, n_rows, g.out_h / 2, g.out_w / 2}, x.options())
                                  : at::empty({batch, n_rows, g.out_h, g.out_w}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor off = offsets.has_value() ? *offsets : conv_offsets(col, g, true);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "actuallysparse_conv2d", [&] {
    const KernelTable<scalar_t> table = table_for<scalar_t>(kernel_isa);
    const at::Tensor packed = pack_padded<scalar_t>(table, x, tw, g);
    run_conv_forward<scalar_t>(table, packed, tw, batch, g, crow, col, off, vals.data_ptr<scalar_t>(),
                               b.defined() ? b.data_ptr<scalar_t>() : nullptr, n_rows, out, relu, pool_in_kernel);
  });
  return pool && !pool_in_kernel ? std::get<0>(max_pool2x2(out, false)) : out;
}

// The geometry of the input gradient as a convolution of the output gradient, when the layer's
// stride is 1: the taps flipped, the same dilation, and each side padded by the dilated kernel's
// reach less the layer's padding there. Empty when the stride is not 1 or a side's padding
// exceeds that reach (the gradient would need cropping, not padding).
std::vector<int64_t> input_grad_geometry(const ConvGeometry& g) {
  const int64_t reach_h = (g.kh - 1) * g.dh, reach_w = (g.kw - 1) * g.dw;
  if (g.sh != 1 || g.sw != 1 || g.pt > reach_h || g.pb > reach_h || g.pl > reach_w || g.pr > reach_w) return {};
  return {g.kh, g.kw, 1, 1, g.dh, g.dw, reach_h - g.pt, reach_h - g.pb, reach_w - g.pl, reach_w - g.pr};
}

// The gradients of a convolution. The value gradient runs over slices of output channels (each
// owns its non-zeros' entries and walks every tile). The input gradient is, where the layer's
// geometry allows (input_grad_geometry) and the pattern of the flipped transposed weight is given
// (t_crow, t_col over input channels, columns o * kh * kw + flipped tap; perm: where each of its
// entries sits in `values`), the forward kernel run over the padded output gradient. Otherwise it
// is scattered along W's rows over (slice, tile) items into their own padded accumulation tiles,
// summed and unpadded at the end.
std::tuple<at::Tensor, at::Tensor> conv2d_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& values, const at::Tensor& crow,
                                                   const at::Tensor& col, at::IntArrayRef geometry, bool need_input,
                                                   bool need_values, const std::string& requested_isa,
                                                   int64_t tile_vectors, const c10::optional<at::Tensor>& t_crow,
                                                   const c10::optional<at::Tensor>& t_col,
                                                   const c10::optional<at::Tensor>& perm) {
  const std::string& isa = chosen_isa(requested_isa);
  check_operands(x, values, col);
  const ConvGeometry g = conv_geometry(x, geometry);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(2) == g.out_h &&
              grad_out.size(3) == g.out_w, "grad_out must be (", x.size(0), ", out_channels, ", g.out_h, ", ", g.out_w,
              "), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out and input must share a dtype");
  const int64_t n_rows = grad_out.size(1), batch = x.size(0), nnz = col.numel();
  check_pattern(crow, col, n_rows);
  TORCH_CHECK(t_crow.has_value() == t_col.has_value() && t_col.has_value() == perm.has_value(),
              "the transposed pattern takes t_crow, t_col and perm together");
  if (t_crow.has_value()) {
    check_pattern(*t_crow, *t_col, g.channels);
    TORCH_CHECK(t_col->numel() == nnz && perm->dim() == 1 && perm->numel() == nnz && perm->scalar_type() == at::kInt &&
                perm->is_contiguous(), "the transposed pattern must hold the ", nnz, " non-zeros, with int32 "
                "positions, got ", t_col->numel(), " columns and positions ", perm->sizes(), " ", perm->scalar_type());
  }
  const std::vector<int64_t> geometry_t = t_crow.has_value() ? input_grad_geometry(g) : std::vector<int64_t>{};
  // The padded output gradient both gradients then read is (Ho + 2 reach) x (Wo + 2 reach): at
  // 2x2 pixels and a 3x3 kernel four times the plane. Measured (B=64, 0.9, AVX-512 EPYC), both
  // gradients at 512->512 @2x2 took 3.0 ms transposed against 2.8 scattered, at @4x4 (2.25 times
  // the plane) 8.1 against 9.3: planes padded beyond 3 times their size keep the scatter.
  const bool transposed = need_input && !geometry_t.empty() &&
      (g.out_h + geometry_t[6] + geometry_t[7]) * (g.out_w + geometry_t[8] + geometry_t[9]) <= 3 * g.out_h * g.out_w;
  // Both are written whole below (every non-zero by the first tile, every input pixel by the
  // forward or the unpadding), so they start uninitialised unless nothing is computed.
  at::Tensor grad_x = at::empty(need_input ? x.sizes() : at::IntArrayRef{0}, x.options());
  at::Tensor grad_values = at::empty({need_values ? nnz : 0}, x.options());
  if (batch == 0 || nnz == 0 || (!need_input && !need_values)) return {grad_x.zero_(), grad_values.zero_()};
  const at::Tensor vals = values.contiguous();
  const int32_t* crow_data = crow.data_ptr<int32_t>();
  // the output gradient as the input of the input gradient's convolution (transposed only)
  const ConvGeometry gt = transposed ? conv_geometry(grad_out, geometry_t) : ConvGeometry{};
  TORCH_CHECK(!transposed || (gt.out_h == g.height && gt.out_w == g.width), "internal: the input gradient's "
              "convolution gives ", gt.out_h, "x", gt.out_w, ", not ", g.height, "x", g.width);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "actuallysparse_conv2d_backward", [&] {
    const KernelTable<scalar_t> table = table_for<scalar_t>(isa);
    const int64_t tw = conv_tile_width(batch, table.lanes, sizeof(scalar_t), tile_vectors);
    // Transposed: one padded packing of grad_out serves both gradients; each output pixel's
    // gradient row then sits at (y + top) * Wp' + x + left of its channel's plane.
    const at::Tensor packed_grad = transposed ? pack_padded<scalar_t>(table, grad_out, tw, gt)
                                              : pack<scalar_t>(table, grad_out.reshape({batch, -1}), tw);
    const auto input_grad_as_forward = [&] {
      // the values in the transposed pattern's order: a gather over threads (torch's index_select
      // ran on one, 0.7 ms a step of the pruned VGG11_bn)
      at::Tensor vals_t = at::empty_like(vals);
      const scalar_t* v = vals.data_ptr<scalar_t>();
      const int32_t* order = perm->data_ptr<int32_t>();
      scalar_t* gathered = vals_t.data_ptr<scalar_t>();
      std::atomic<bool> outside{false};
      at::parallel_for(0, nnz, 1 << 15, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const uint32_t at = static_cast<uint32_t>(order[k]);
          if (at >= static_cast<uint64_t>(nnz)) {
            outside.store(true, std::memory_order_relaxed);
            continue;
          }
          gathered[k] = v[at];
        }
      });
      TORCH_CHECK(!outside.load(), "perm must hold positions of the ", nnz, " non-zeros, got one outside [0, ", nnz,
                  ")");
      run_conv_forward<scalar_t>(table, packed_grad, tw, batch, gt, *t_crow, *t_col, conv_offsets(*t_col, gt, true),
                                 vals_t.data_ptr<scalar_t>(), nullptr, g.channels, grad_x);
    };
    // without the value gradient, nothing below walks W's own rows
    if (transposed && !need_values) return input_grad_as_forward();
    const at::Tensor off = conv_offsets(col, g, false);
    const int64_t grad_rows = transposed ? gt.padded_h * gt.padded_w : g.out_h * g.out_w;
    at::Tensor grad_base = at::empty({g.out_h * g.out_w}, crow.options());
    int32_t* grad_base_data = grad_base.data_ptr<int32_t>();
    for (int64_t y = 0, p = 0; y < g.out_h; ++y)
      for (int64_t w = 0; w < g.out_w; ++w, ++p)
        grad_base_data[p] = static_cast<int32_t>(transposed ? (y + gt.pt) * gt.padded_w + w + gt.pl : p);
    const at::Tensor packed_input = need_values ? pack_padded<scalar_t>(table, x, tw, g) : at::Tensor();
    const int64_t n_tiles = (batch + tw - 1) / tw;
    const int64_t in_rows = g.channels * g.padded_h * g.padded_w;
    const int64_t block_channels = channels_per_block(g.padded_h * g.padded_w * tw * int64_t(sizeof(scalar_t)),
                                                      kBackwardBlockBytes, g.channels);
    const at::Tensor block_ptr = channel_block_ptr(crow, col, n_rows, g, block_channels);
    const at::Tensor bases = pixel_bases(g, crow.options());
    ConvBackwardArgs<scalar_t> args{crow_data, off.data_ptr<int32_t>(), vals.data_ptr<scalar_t>(),
                                    packed_grad.data_ptr<scalar_t>(),
                                    need_values ? packed_input.data_ptr<scalar_t>() : nullptr, in_rows, tw, g.padded_w,
                                    g.out_h, g.out_w, g.sh, g.sw, n_rows,
                                    need_values ? grad_values.data_ptr<scalar_t>() : nullptr,
                                    block_ptr.data_ptr<int32_t>(), block_ptr.size(1) - 1, bases.data_ptr<int32_t>(),
                                    grad_rows, grad_base_data};
    const int64_t threads = at::get_num_threads();
    if (need_values) {
      const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(threads, n_rows));
      at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
        for (int64_t s = begin; s < end; ++s) {
          const int64_t r0 = slice_start(crow_data, n_rows, nnz, s, slices);
          const int64_t r1 = slice_start(crow_data, n_rows, nnz, s + 1, slices);
          table.conv_grad_values(args, n_tiles, r0, r1);
        }
      });
    }
    if (!need_input) return;
    if (transposed) return input_grad_as_forward();
    const int64_t slices = std::max<int64_t>(1, std::min<int64_t>((threads + n_tiles - 1) / n_tiles, n_rows));
    // Each item zeroes its own accumulation tile just before scattering into it (in its cache),
    // instead of one separate pass over every tile.
    at::Tensor acc = at::empty({slices, n_tiles, in_rows, tw}, x.options());
    scalar_t* acc_data = acc.data_ptr<scalar_t>();
    at::parallel_for(0, slices * n_tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t s = item / n_tiles, t = item % n_tiles;
        scalar_t* tile_acc = acc_data + (s * n_tiles + t) * in_rows * tw;
        std::fill(tile_acc, tile_acc + in_rows * tw, scalar_t(0));
        table.conv_grad_input(args, t, slice_start(crow_data, n_rows, nnz, s, slices),
                              slice_start(crow_data, n_rows, nnz, s + 1, slices), tile_acc);
      }
    });
    scalar_t* dst = grad_x.data_ptr<scalar_t>();
    const int64_t plane = g.padded_h * g.padded_w;
    const int64_t slice_stride = n_tiles * in_rows * tw;
    at::parallel_for(0, n_tiles * g.channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / g.channels, c = item % g.channels;
        const int64_t nb = std::min(tw, batch - t * tw);
        scalar_t* first = acc_data + (t * in_rows + c * plane) * tw;
        for (int64_t s = 1; s < slices; ++s) {
          const scalar_t* part = first + s * slice_stride;
          for (int64_t i = 0; i < plane * tw; ++i) first[i] += part[i];
        }
        for (int64_t j = 0; j < nb; ++j) {
          scalar_t* image = dst + ((t * tw + j) * g.channels + c) * g.height * g.width;
          for (int64_t h = 0; h < g.height; ++h) {
            const scalar_t* row = first + ((h + g.pt) * g.padded_w + g.pl) * tw + j;
            for (int64_t w = 0; w < g.width; ++w) image[h * g.width + w] = row[w * tw];
          }
        }
      }
    });
  });
  return {grad_x, grad_values};
}

}  // namespace
}  // namespace actuallysparse

TORCH_LIBRARY(actuallysparse_kernels, m) {
  m.def("spmm(Tensor x, Tensor values, Tensor? bias, Tensor crow, Tensor col, int n_rows, str isa) -> Tensor");
  m.def("backward(Tensor grad_out, Tensor x, Tensor values, Tensor crow, Tensor col, bool need_input, "
        "bool need_values, str isa) -> (Tensor, Tensor)");
  m.def("conv2d(Tensor x, Tensor values, Tensor? bias, Tensor crow, Tensor col, int n_rows, int[] geometry, "
        "str isa, int tile_vectors=0, Tensor? offsets=None, bool relu=False, bool pool=False) -> Tensor");
  m.def("conv_offsets(Tensor col, int channels, int height, int width, int[] geometry) -> Tensor");
  m.def("conv2d_backward(Tensor grad_out, Tensor x, Tensor values, Tensor crow, Tensor col, int[] geometry, "
        "bool need_input, bool need_values, str isa, int tile_vectors=0, Tensor? t_crow=None, Tensor? t_col=None, "
        "Tensor? perm=None) -> (Tensor, Tensor)");
  m.def("isa_supported(str isa) -> bool", &actuallysparse::isa_supported);
  m.def("chosen_isa(str requested) -> str", [](const std::string& requested) { return actuallysparse::chosen_isa(requested); });
}

TORCH_LIBRARY_IMPL(actuallysparse_kernels, CPU, m) {
  m.impl("spmm", &actuallysparse::spmm);
  m.impl("backward", &actuallysparse::backward);
  m.impl("conv2d", &actuallysparse::conv2d);
  m.impl("conv2d_backward", &actuallysparse::conv2d_backward);
  m.impl("conv_offsets", &actuallysparse::input_offsets);
}
