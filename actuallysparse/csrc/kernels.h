// Sparse linear kernels: the three products of y = x W^T + b with W in CSR (int32 row pointers;
// int32 or, where a row's width fits, 16-bit column indices: 6 bytes a non-zero instead of 8).
//
// This header is torch-free so the per-instruction-set translation units compile fast;
// bindings.cpp owns threading (at::parallel_for) and calls the entry points below on
// ranges of work. Each instruction set (avx512, avx2, scalar) provides one KernelTable
// per dtype, compiled in its own file under its own `#pragma GCC target`, so one build holds
// every path and the CPU's features pick one at run time.
//
// Layout. A dense operand (the input x, or the output gradient) is packed batch-tile-major:
// tile t holds rows k = 0..K-1 of TW = nv * lanes batch columns, contiguous
// (pack[t][k][j] = x[t*TW + j][k], zero beyond the batch). One non-zero then costs one
// broadcast of its value and nv fused multiply-adds against one contiguous, aligned row of
// the tile, and the tile (K * TW elements) is reused by every row of W. nv is at most 4
// (a 4096-row tile of 32 floats is 512 KiB, within L2); the forward keeps 8 FMA chains in
// flight (several accumulator sets when nv < 4) to hide the FMA latency. Packing costs
// batch * K copies, small beside nnz * batch FMAs. A batch of one row is its own tile
// (TW = 1) and runs plain or gathering loops over the row.
//
// The input gradient is scattered along W's own rows (see backward in kernels_impl.h), so
// one CSR layout serves all three products and no step reads values through a permutation:
// reading W^T's values through the transposed pattern's permutation was 1.7-4x slower.
#pragma once
#include <cstdint>

namespace actuallysparse {

template <typename T, typename I = int32_t>
struct SpmmArgs {
  const int32_t* crow;   // (n_rows + 1,) row pointers of the pattern
  const I* col;          // (nnz,) column of each non-zero: a row of the packed operand
  const T* values;       // (nnz,) non-zeros
  const T* packed;       // packed operand, n_tiles tiles of k_rows * tw elements
  int64_t k_rows;        // rows of the packed operand
  int64_t tw;            // tile width (nv * lanes)
  int64_t batch;         // valid batch columns (the last tile may be partial)
  T* out;                // (batch, n_rows) row-major output
  int64_t n_rows;        // rows of the pattern = columns of out
  const T* bias;         // (n_rows,) or null
};

template <typename T, typename I = int32_t>
struct BackwardArgs {
  const int32_t* crow;   // (n_rows + 1,) row pointers of W
  const I* col;          // (nnz,)
  const T* values;       // (nnz,) W's values in their stored order
  const T* packed_rows;  // packed output gradient: tile rows are W's rows
  const T* packed_cols;  // packed input (tile rows are W's columns), or null without grad_values
  int64_t rows_k;        // rows per tile of packed_rows (out_features)
  int64_t cols_k;        // rows per tile of packed_cols (in_features)
  int64_t tw;
  T* grad_values;        // (nnz,) accumulated over tiles, or null when not wanted
};

// A forward work item of a convolution: this many output channels by this many output pixels
// (flattened over rows), whose partial sums share one buffer.
constexpr int kConvChannelChunk = 16;
constexpr int kConvPixelBlock = 16;
// Channels times pixels of one item's buffer of partial sums: a 2x2 max-pool fused into the
// forward takes pixel blocks of whole pairs of output rows (32 pixels at 16x16) and fewer
// channels, the same buffer.
constexpr int64_t kConvBlockCapacity = kConvChannelChunk * kConvPixelBlock;

// Output pixels a forward item covers when it pools 2x2 windows (stride 2) as it writes: whole
// pairs of rows, the fewest holding kConvPixelBlock pixels. More than kConvBlockCapacity (output
// rows over 128 pixels wide) cannot be fused.
inline int64_t conv_pool_block(int64_t out_w) {
  const int64_t pairs = kConvPixelBlock / (2 * out_w);
  return 2 * (pairs > 0 ? pairs : 1) * out_w;
}

// Vectors of output pixels in a run of the single-image forward (conv_forward_single): the lanes
// a run covers (the output rows laid at the padded width when the height's stride is 1, else one
// output row) cut into the fewest runs of at most kConvSingleMaxVectors vectors, evenly. A 2x2
// output at a padded width of 4 spans 6 lanes (one vector), 8x8 at 10 spans 78 (five of 16).
constexpr int kConvSingleMaxVectors = 6;
// Elements of zeros past a single image's packed input, which the last run's lanes may read: a
// run's lanes at the widest vector (16 floats, AVX-512).
constexpr int64_t kConvSingleSlack = kConvSingleMaxVectors * 16;

inline int64_t conv_single_span(int64_t out_h, int64_t out_w, int64_t padded_w, int64_t stride_h) {
  return stride_h == 1 ? (out_h - 1) * padded_w + out_w : out_w;
}

inline int conv_single_vectors(int64_t out_h, int64_t out_w, int64_t padded_w, int64_t stride_h, int lanes,
                               int max_vectors = kConvSingleMaxVectors) {
  const int64_t vectors = (conv_single_span(out_h, out_w, padded_w, stride_h) + lanes - 1) / lanes;
  const int64_t runs = (vectors + max_vectors - 1) / max_vectors;
  return static_cast<int>((vectors + runs - 1) / runs);
}

// Runs of `vectors` * lanes output pixels a single-image forward computes: over the output rows
// laid at the padded width when the height's stride is 1, else row by row.
inline int64_t conv_single_runs(int64_t out_h, int64_t out_w, int64_t padded_w, int64_t stride_h, int64_t vectors,
                                int lanes) {
  const int64_t run = vectors * lanes;
  const int64_t span = conv_single_span(out_h, out_w, padded_w, stride_h);
  return stride_h == 1 ? (span + run - 1) / run : out_h * ((span + run - 1) / run);
}

// A direct convolution (conv_impl.h): the padded input packed batch-tile-major, one offset
// per non-zero into that layout, W in CSR over output channels.
template <typename T>
struct ConvArgs {
  const int32_t* crow;   // (out_channels + 1,) row pointers
  const int32_t* off;    // (nnz,) offset of each non-zero's input row: (c*Hp + kh*dh)*Wp + kw*dw
  const T* values;       // (nnz,)
  const T* packed;       // n_tiles tiles of in_rows * tw elements (padded input)
  int64_t in_rows;       // C * Hp * Wp
  int64_t tw;
  int64_t batch;
  int64_t padded_w;      // Wp
  int64_t out_h, out_w;
  int64_t stride_h, stride_w;
  T* out;                // (batch, out_channels, out_h, out_w)
  int64_t n_rows;        // out_channels
  const T* bias;         // (out_channels,) or null
  const int32_t* block_ptr;  // (out_channels, n_blocks + 1): where each channel block starts in each row
  int64_t n_blocks;          // blocks of input channels (see conv_impl.h)
  const int32_t* pixel_base; // (out_h * out_w,) input row of each output pixel's window: y*sh*Wp + x*sw
  const uint16_t* off16;     // or null: the offsets as 16 bits, which hold them when C * Hp * Wp <= 65536
  int single_vectors;        // tile width 1: vectors a run (conv_single_vectors)
  int64_t single_block;      // tile width 1: packed rows (channels * Hp * Wp) a channel block spans, 0: all
  bool relu;                 // write max(output, 0)
  int64_t pixel_block;       // output pixels an item covers: kConvPixelBlock, or conv_pool_block with pool
  bool pool;                 // write the 2x2 max-pool of the output: out is (batch, out_channels, out_h/2, out_w/2)
};

template <typename T>
struct ConvBackwardArgs {
  const int32_t* crow;
  const int32_t* off;
  const T* values;
  const T* packed_grad;   // n_tiles tiles of (out_channels * grad_rows) * tw
  const T* packed_input;  // the padded input as in ConvArgs, or null without grad_values
  int64_t in_rows;
  int64_t tw;
  int64_t padded_w;
  int64_t out_h, out_w;
  int64_t stride_h, stride_w;
  int64_t n_rows;
  T* grad_values;         // (nnz,)
  const int32_t* block_ptr;  // as in ConvArgs, for the backward's channel blocks
  int64_t n_blocks;
  const int32_t* pixel_base; // as in ConvArgs
  int64_t grad_rows;         // rows of packed_grad per output channel: out_h * out_w, or its padded plane
  const int32_t* grad_base;  // (out_h * out_w,) row of each output pixel's gradient within its channel
};

template <typename T>
struct KernelTable {
  int lanes;  // elements per vector register
  // out[b, r] (+bias[r]) for r in [row_begin, row_end), b in tile `tile`.
  void (*spmm)(const SpmmArgs<T>&, int64_t tile, int64_t row_begin, int64_t row_end);
  // For the non-zeros k of rows [row_begin, row_end), on batch tile `tile`:
  //   grad_values[k] (+)= <packed_rows[tile][row_k], packed_cols[tile][col_k]>   (if grad_values)
  //   acc_tile[col_k] += values[k] * packed_rows[tile][row_k]                  (if acc_tile)
  void (*backward)(const BackwardArgs<T>&, int64_t tile, int64_t row_begin, int64_t row_end, T* acc_tile,
                   bool accumulate);
  // the same two over 16-bit column indices
  void (*spmm16)(const SpmmArgs<T, int16_t>&, int64_t tile, int64_t row_begin, int64_t row_end);
  void (*backward16)(const BackwardArgs<T, int16_t>&, int64_t tile, int64_t row_begin, int64_t row_end,
                     T* acc_tile, bool accumulate);
  // Convolution: output pixels [p_begin, p_begin + pixel_block) of channels [o_begin, o_end) on batch tile `tile`;
  // with a tile width of 1 (one image, stride 1 along the width), run p_begin (see conv_single_runs).
  void (*conv_forward)(const ConvArgs<T>&, int64_t tile, int64_t p_begin, int64_t o_begin, int64_t o_end);
  // Scatter the input gradient of channels [o_begin, o_end) into acc (one padded tile).
  void (*conv_grad_input)(const ConvBackwardArgs<T>&, int64_t tile, int64_t o_begin, int64_t o_end, T* acc);
  // grad_values of channels [o_begin, o_end), summed over batch tiles [0, n_tiles).
  void (*conv_grad_values)(const ConvBackwardArgs<T>&, int64_t n_tiles, int64_t o_begin, int64_t o_end);
  // Packing: dst[i * tw + j] = src[j * image_stride + i * step] for i < n, j < images (one row of
  // n elements per image, `step` apart, written into a batch tile of width tw).
  void (*pack_rows)(const T* src, int64_t image_stride, int64_t step, int64_t n, int64_t images, T* dst, int64_t tw);
};

KernelTable<float> scalar_table_f32();
KernelTable<double> scalar_table_f64();
KernelTable<float> avx2_table_f32();
KernelTable<double> avx2_table_f64();
KernelTable<float> avx512_table_f32();
KernelTable<double> avx512_table_f64();

}  // namespace actuallysparse
