// Direct sparse 2-D convolution: the three products of y = conv2d(x, W) + b with W's non-zeros
// in CSR over output channels (int32), written once over a vector type V as in kernels_impl.h.
// No im2col matrix is built.
//
// Layout. The input is packed padded and batch-tile-major: tile t holds, for every input
// channel c and padded position (h, w), TW batch columns contiguous:
//   pack[t][(c * Hp + h) * Wp + w][j] = x[t*TW + j][c][h - pad_top][w - pad_left]  (zero outside).
// A non-zero (o, c, kh, kw) is stored once as the offset of its input "row" in that layout,
//   off_k = (c * Hp + kh * dh) * Wp + kw * dw,
// in 16 bits where C * Hp * Wp <= 65536 (every VGG11 layer on 32x32 images: 6 bytes a
// non-zero with its value, not 8; the forward takes either, the value gradient 32 bits),
// so output pixel (y, x) of channel o reads rows off_k + pixel_base[p], pixel_base[p] = y*sh*Wp + x*sw
// for the flattened pixel p = y * out_w + x: the same broadcast
// of the value and NV fused multiply-adds per non-zero as the linear kernel, with the pixel's
// base added to every column. The output gradient is packed the same way over (o, pixel), padded
// when the input gradient runs as a forward over it (see below).
//
// Loop order, measured in one process on VGG11's CIFAR layers (3x3, 64-512 channels, 16x16 to
// 2x2, B=64, 0.9 sparse; AMD EPYC with AVX2, 2 threads; numbers are sums over the six layers
// unless said):
// - batch tiles of 16 floats, a cache line a row (two AVX2 vectors, one AVX-512 vector): against
//   8 floats the forward took 1.4x as long, against 32 floats 1.1x (the input rows a tile reads
//   then outgrow L2). On an Intel Xeon (L1d 48 KiB, L2 2 MiB; the widths switched call by call in
//   one process, fastest of 25-30), AVX-512 tiles of one vector against two (32 floats): forward
//   30.7 against 35.7 ms, both gradients 68.5 against 73.6, the pruned VGG11_bn's SGD step 192
//   against 205 ms and its folded inference 40.6 against 45.7 (lower quartiles); AVX2 there, two
//   vectors against four: 32.6 and 79.1 ms against 37.2 and 81.8. At 32 floats an item's partial
//   sums (16 channels of 16 pixels, see below) take 32 KiB, a Zen 4's whole L1d, which may make
//   the narrower tile win there too (not measured on a Zen 4);
// - forward: per batch tile, 16 output channels share a buffer of partial sums for 16 output
//   pixels (flattened over rows), and the input channels are walked in blocks whose rows fit 64 KiB,
//   PX pixels x NV vectors of accumulators (8 FMA chains) per (channel, block): 38 ms against
//   44 ms walking all channels at once;
// - gradients: the value gradient takes four non-zeros at a time so each output-gradient vector
//   loaded serves four products, walking input channels in blocks of 128 KiB of padded planes
//   (34 ms against 40 unblocked). The input gradient of a stride-1 layer is the forward kernel
//   itself, run over the padded output gradient with the pattern transposed over channels and
//   its taps flipped (cached with the pattern, see conv_transpose_pattern in functional.py; the
//   values are gathered through its permutation once per call). Otherwise it scatters along the
//   same non-zeros into an accumulation tile of the padded input's layout (48 ms blocked against
//   56 unblocked). Measured on an AVX-512 EPYC (Zen 5, B=64, 0.9, the seven layers at width 1):
//   both gradients 41.3 ms scattered against 36.4 transposed, and the pruned VGG11_bn's SGD step
//   (csr+native, a timing script) 102 -> 83 ms (the scatter's accumulation tiles, summed and
//   unpadded, are gone). Built per call by a counting sort and read through the permutation
//   inside the kernel (AVX2 EPYC), the same idea had taken 1.56x the forward's time against 1.47x
//   for the scatter.
// - one image (stride 1 along the width) takes conv_forward_single, vectors over output pixels:
//   at B=1, 0.9, against batch tiles of one vector (7 of 8 lanes idle), 0.72 vs 2.26 ms at 64->128
//   @32, 0.28 vs 0.64 @8, 1.64 vs 2.04 @4 and 1.45 vs 2.00 @2 (dense: 1.48, 0.42, 1.12, 1.93).
// Tried and dropped (AMD EPYC Zen 4, AVX-512, B=64, 0.9, VGG11's six layer shapes; both variants
// in one build and one process, calls interleaved, fastest of 15 to 25 each):
// - the value gradient in the forward's loop order (per channel block and tile, each group of
//   pixels' output gradient held in registers for each channel of a chunk of 16 in turn, the
//   input rows the group reads staying in L1 across the chunk, a vector of partial sums per
//   non-zero in memory): 30.4 against 30.1 ms on two threads, 49.3 against 49.3 on one; faster
//   at 4x4 and 2x2, slower at 16x16.
// - the forward's sums left tile-major and written out afterwards by 8x8 register transposes,
//   each image's rows whole: 19.1 against 18.6 ms. The stores cost about a third of the 64->128
//   @16x16 layer's forward (timed with the output not written), but that is the output's memory,
//   not the transposition: streaming stores, asking for the output's lines ahead, and writing an
//   item's output image by image across its channels (so one image's planes, 64 KiB apart, do not
//   crowd one cache set) gained nothing either (the last 18.5 against 18.8 ms).
// - keeping the forward's packed input for the backward (it is packed twice): both packings of
//   the value gradient take about 2.3 ms of its 25 (the six layers with one non-zero each); a
//   kept copy would save the input's part of that at the cost of one more input-sized tensor
//   held from forward to backward. Not done.
// Also tried and dropped on an Intel Xeon (AVX-512, L2 2 MiB; same method, fastest of 20-30):
// - 32-float tiles kept where a layer's packed input tile fits half of L2 (the small layers of a
//   quarter-width VGG11, where one run had read 32 floats 5 % faster): level with 16 floats
//   everywhere, both at width 0.25 (5.65/9.90 against 5.49/9.99 ms, forward/both gradients) and
//   at width 1 (29.5/66.8 against 30.1/66.3).
// - the value gradient with one vector a pixel taking two pixels a step, one accumulator each
//   (eight FMA chains instead of four): level (79.5 ms with it, 79.1 without); it is bound by
//   reading the input rows, not by the chains.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include "kernels.h"

namespace actuallysparse {
namespace impl {

// Requests for the cache lines of [begin, end), one every 64 bytes from begin (a prefetch never
// faults): where W streams from memory, the hardware's prefetchers alone left it idle (see spmv
// in kernels_impl.h and conv_forward_single below). Not aligned down first: spmv asks for
// consecutive ranges, and the extra line a range then overlaps cost it 7 % with W in cache.
template <typename E>
inline void prefetch_range(const E* begin, const E* end) {
  const char* stop = reinterpret_cast<const char*>(end);
  for (const char* at = reinterpret_cast<const char*>(begin); at < stop; at += 64) __builtin_prefetch(at, 0, 3);
}

// An output as written: max(v, 0) with the ReLU fused (NaN stays NaN, as in torch.relu).
template <typename T>
inline T output(T v, bool relu) { return relu && v < T(0) ? T(0) : v; }

// A block of n rows (output pixels, or rows of W) by tw batch columns, written transposed with its
// bias (per row, or one for all) and the ReLU if asked: dst[b * stride + i] = block[i][b] + bias for
// i < n, b < nb, whole vectors of rows gathered at stride tw. (Sampling put a third of the
// 64->128 @16x16 layer's forward at B=64 on the scalar loop this replaced, but in its stores to
// the output, which miss the cache either way: timed, the two were level.)
template <typename V>
inline void store_transposed(const typename V::T* block, int64_t tw, int64_t n, int64_t nb,
                             const typename V::T* row_bias, typename V::T bias, bool relu, typename V::T* dst,
                             int64_t stride) {
  using T = typename V::T;
  constexpr int W = V::lanes;
  alignas(64) int32_t idx[W];
  for (int i = 0; i < W; ++i) idx[i] = static_cast<int32_t>(i * tw);
  const typename V::reg all = V::set1(bias);
  for (int64_t b = 0; b < nb; ++b) {
    T* out = dst + b * stride;
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      const typename V::reg v = V::add(V::gather(block + i * tw + b, idx), row_bias ? V::loadu(row_bias + i) : all);
      V::storeu(out + i, relu ? V::relu(v) : v);
    }
    for (; i < n; ++i) out[i] = output(block[i * tw + b] + (row_bias ? row_bias[i] : bias), relu);
  }
}

// Forward of output pixels [p_begin, p_begin + pixel_block) (flattened over rows, so small images
// fill whole groups too), channels [o_begin, o_end), one batch tile. Partial sums for every
// channel of the item sit in `buf`; the input channels are walked in blocks small enough for the
// input rows a block of pixels reads to stay in L2 (64 KiB), and for each block every group of PX
// pixels passes over the chunk's channels: it loads PX pixels of partial sums into registers,
// adds the (channel, block)'s non-zeros and stores them back. Groups outside channels keep the
// rows one group reads in L1 across the chunk; channels outside groups (as before) walked the
// whole block's rows per channel. With the wider groups below and the gathered store above,
// measured against the previous kernel (AVX-512 EPYC, B=64, 0.9, VGG11's six layer shapes,
// forward in evaluation mode, each build in its own process, calls interleaved; sum of the
// fastest of 30 rounds): 21.8 -> 20.2 ms on two threads, 31.7 -> 28.0 ms on one.
// Output pixels a group keeps in registers for NV vectors of batch columns: eight FMA chains in
// flight (two pixels at least), as in the linear kernel; with the 32 registers of AVX-512, twice
// as many, so each pass loads and stores half as many partial sums a product.
template <int NV>
constexpr int kGroupPixels = NV >= 3 ? 2 : 8 / NV;
template <typename V, int NV>
constexpr int kForwardPixels = sizeof(typename V::reg) == 64 ? 2 * kGroupPixels<NV> : kGroupPixels<NV>;

// body(std::integral_constant<int, G>(), p) for groups of G pixels covering [begin, end): whole
// groups of PX, then the rest in groups of PX/2, PX/4, ..., 1 (each at most once: fewer than
// twice the group are left by then). With one AVX-512 vector a pixel (forward PX = 16, scatter
// 8), a 2x2 output is one group of four, where four single pixels took the forward 1.5x as long
// and the backward (scatter and value gradient) 1.1x (VGG11's 512->512 @2x2 layer, B=64, 0.9,
// Intel Xeon).
template <int PX, typename F>
inline void pixel_groups(int64_t begin, int64_t end, F&& body) {
  int64_t p = begin;
  for (; p + PX <= end; p += PX) body(std::integral_constant<int, PX>(), p);
  if constexpr (PX > 1) pixel_groups<PX / 2>(p, end, body);
}

// PX pixels of partial sums in registers, NV vectors each, through the non-zeros [begin, end) of
// one (channel, block) pass.
template <typename V, int NV, int PX, typename O>
inline void conv_forward_group(const typename V::T* pack, const int32_t* pixel_base, const typename V::T* values,
                               const O* offsets, int32_t begin, int32_t end, typename V::T* sums) {
  using T = typename V::T;
  constexpr int W = V::lanes;
  constexpr int TW = NV * W;
  typename V::reg acc[PX][NV];
  const T* src[PX];
  for (int q = 0; q < PX; ++q) {
    src[q] = pack + static_cast<int64_t>(pixel_base[q]) * TW;
    for (int v = 0; v < NV; ++v) acc[q][v] = V::load(sums + q * TW + v * W);
  }
  for (int32_t k = begin; k < end; ++k) {
    const typename V::reg w = V::set1(values[k]);
    const int64_t off = static_cast<int64_t>(offsets[k]) * TW;
    for (int q = 0; q < PX; ++q)
      for (int v = 0; v < NV; ++v) acc[q][v] = V::fmadd(w, V::load(src[q] + off + v * W), acc[q][v]);
  }
  for (int q = 0; q < PX; ++q)
    for (int v = 0; v < NV; ++v) V::store(sums + q * TW + v * W, acc[q][v]);
}

// The 2x2 max-pool (stride 2) of the rows [r0, r0 + rows) of one channel's partial sums (out_w
// pixels a row, TW batch columns each; rows even), written transposed with the bias and ReLU:
// both commute with the maximum, exactly, so this is what pooling the written output gives.
template <typename V, int NV>
void store_pooled(const ConvArgs<typename V::T>& a, const typename V::T* sums, int64_t r0, int64_t rows, int64_t b0,
                  int64_t nb, int64_t o, typename V::T bias) {
  using T = typename V::T;
  constexpr int W = V::lanes;
  constexpr int TW = NV * W;
  const int64_t ow = a.out_w, pooled_w = ow / 2, n = rows / 2 * pooled_w;
  const int64_t pooled_pixels = (a.out_h / 2) * pooled_w;
  alignas(64) T pooled[kConvBlockCapacity / 4][TW];
  for (int64_t pr = 0; pr < rows / 2; ++pr)
    for (int64_t pc = 0; pc < pooled_w; ++pc) {
      const T* q = sums + (2 * pr * ow + 2 * pc) * TW;
      for (int v = 0; v < NV; ++v) {
        const typename V::reg top = V::max(V::load(q + v * W), V::load(q + TW + v * W));
        const typename V::reg bottom = V::max(V::load(q + ow * TW + v * W), V::load(q + (ow + 1) * TW + v * W));
        V::store(pooled[pr * pooled_w + pc] + v * W, V::max(top, bottom));
      }
    }
  store_transposed<V>(pooled[0], TW, n, nb, nullptr, bias, a.relu,
                      a.out + (b0 * a.n_rows + o) * pooled_pixels + r0 / 2 * pooled_w, a.n_rows * pooled_pixels);
}

template <typename V, int NV, int PX, typename O>
void conv_forward_nv(const ConvArgs<typename V::T>& a, const O* offsets, int64_t tile, int64_t p_begin,
                     int64_t o_begin, int64_t o_end) {
  using T = typename V::T;
  constexpr int W = V::lanes;
  constexpr int TW = NV * W;
  const T* pack = a.packed + tile * a.in_rows * TW;
  const int64_t b0 = tile * TW;
  const int64_t nb = (a.batch - b0) < TW ? (a.batch - b0) : TW;
  // pooled, an odd last row is in no window and is not computed
  const int64_t pixels = (a.pool ? a.out_h / 2 * 2 : a.out_h) * a.out_w;
  const int64_t pb = a.pixel_block;
  const int64_t p_end = (p_begin + pb) < pixels ? (p_begin + pb) : pixels;
  alignas(64) T buf[kConvBlockCapacity][TW];  // [channel - o_begin][pixel - p_begin], pb pixels a channel
  std::memset(buf, 0, (o_end - o_begin) * pb * sizeof(buf[0]));
  // every channel of the chunk over one group of pixels before the next group: the input rows
  // a group reads stay in L1 across the chunk
  const auto pass = [&](auto px, int64_t block, int64_t p) {
    constexpr int G = decltype(px)::value;
    for (int64_t o = o_begin; o < o_end; ++o) {
      const int32_t* ptr = a.block_ptr + o * (a.n_blocks + 1) + block;
      if (ptr[0] == ptr[1]) continue;
      conv_forward_group<V, NV, G>(pack, a.pixel_base + p, a.values, offsets, ptr[0], ptr[1],
                                   buf[(o - o_begin) * pb + p - p_begin]);
    }
  };
  for (int64_t block = 0; block < a.n_blocks; ++block)
    pixel_groups<PX>(p_begin, p_end, [&](auto px, int64_t p) { pass(px, block, p); });
  for (int64_t o = o_begin; o < o_end; ++o) {
    const T bias = a.bias ? a.bias[o] : T(0);
    const T* sums = buf[(o - o_begin) * pb];
    if (a.pool) {
      store_pooled<V, NV>(a, sums, p_begin / a.out_w, (p_end - p_begin) / a.out_w, b0, nb, o, bias);
    } else {
      const int64_t all = a.out_h * a.out_w;
      store_transposed<V>(sums, TW, p_end - p_begin, nb, nullptr, bias, a.relu,
                          a.out + (b0 * a.n_rows + o) * all + p_begin, a.n_rows * all);
    }
  }
}

// Forward of a single image with stride 1 along the width (tile width 1: plain padded planes):
// vectors run over output pixels instead of the batch, so no lane is wasted on a batch of one.
// A run is R vectors of pixels (see conv_single_vectors and conv_single_runs in kernels.h). With
// stride 1 down the height, runs tile the output rows laid out at the padded width, so a 4x4
// output fills 22 lanes instead of 64; the lanes that fall on padding are computed and not
// stored. Otherwise each output row has its own runs. The packed input has kConvSingleSlack
// elements of slack at its end for the last run's reads. Every pixel of a 2x2 output fits one
// vector (R = 1): the two 512->512 @2x2 layers of VGG11 at B=1, 0.9 took 237 and 250 us with two
// vectors a run. Each non-zero's value and offset are loaded once a run, so the fewer runs the
// fewer loads: up to six vectors a run. Measured in one process (AVX-512 EPYC, B=1, 0.9), VGG11's
// 8x8 layers (78 lanes: one run of five vectors instead of three of two) took 48 against 56 us
// (128->256) and 93 against 111 (256->256); the other layers were unchanged.
// Input channels are walked in blocks whose rows one run reads stay in L1 (single_image_block in
// bindings.cpp): each channel of the item takes its row's non-zeros of one block, its partial
// sums kept in `partial` until the last block adds the bias. Each row asks for the next row's
// values and offsets as it starts: in a whole model W comes from memory (evicted by the layers
// between two calls), and the hardware's prefetchers alone left the stream idle. Measured (Intel
// Xeon with AVX-512, B=1, 0.9, the 512->512 @4x4 layer, W evicted by a 128 MB sweep before each
// call) 427 -> 363 us; the folded pruned VGG11_bn at B=1 timed interleaved with dense (three runs
// of each build, 60 calls each) 1.88-2.02 -> 1.75-1.88 ms, with W in cache alike.
template <typename V, int R, typename O>
void conv_forward_single(const ConvArgs<typename V::T>& a, const O* offsets, int64_t run, int64_t o_begin,
                         int64_t o_end) {
  using T = typename V::T;
  constexpr int W = V::lanes;
  constexpr int L = R * W;      // lanes a run
  constexpr int S = (8 + R - 1) / R;  // accumulator sets over consecutive non-zeros: 8-12 FMA chains in flight
  const int64_t pixels = a.out_h * a.out_w;
  int64_t start;       // input offset of the run's first lane
  int64_t target[L];   // output pixel of each lane, or -1
  if (a.stride_h == 1) {
    start = run * L;
    for (int i = 0; i < L; ++i) {
      const int64_t y = (start + i) / a.padded_w, x = (start + i) % a.padded_w;
      target[i] = (y < a.out_h && x < a.out_w) ? y * a.out_w + x : -1;
    }
  } else {
    const int64_t per_row = (a.out_w + L - 1) / L;
    const int64_t y = run / per_row, x0 = (run % per_row) * L;
    start = y * a.stride_h * a.padded_w + x0;
    for (int i = 0; i < L; ++i) target[i] = x0 + i < a.out_w ? y * a.out_w + x0 + i : -1;
  }
  const T* src = a.packed + start;
  alignas(64) T lanes[L];
  // Channel blocks: each row's non-zeros of one block of input channels (offsets below `limit`)
  // for every channel of the item, then the next block, the partial sums kept in `partial`.
  const int64_t n = o_end - o_begin;
  const int64_t step = a.single_block > 0 ? a.single_block : a.in_rows;
  alignas(64) T partial[kConvChannelChunk][L];
  int32_t cursor[kConvChannelChunk];
  for (int64_t i = 0; i < n; ++i) cursor[i] = a.crow[o_begin + i];
  for (int64_t limit = step;; limit += step) {
    const bool first = limit == step, last = limit >= a.in_rows;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t o = o_begin + i;
      const int32_t end = a.crow[o + 1];
      // the next row's values and offsets requested while this one computes (see below)
      if (first && o + 1 < a.n_rows) {
        prefetch_range(a.values + a.crow[o + 1], a.values + a.crow[o + 2]);
        prefetch_range(offsets + a.crow[o + 1], offsets + a.crow[o + 2]);
      }
      typename V::reg acc[S][R];
      for (int s = 0; s < S; ++s)
        for (int r = 0; r < R; ++r) acc[s][r] = s == 0 && !first ? V::load(partial[i] + r * W) : V::zero();
      int32_t k = cursor[i];
      // offsets grow along a row, so a group whose last offset is below the limit lies in the block
      for (; k + S <= end && (last || offsets[k + S - 1] < limit); k += S)
        for (int s = 0; s < S; ++s) {
          const typename V::reg w = V::set1(a.values[k + s]);
          const T* at = src + offsets[k + s];
          for (int r = 0; r < R; ++r) acc[s][r] = V::fmadd(w, V::loadu(at + r * W), acc[s][r]);
        }
      for (; k < end && (last || offsets[k] < limit); ++k) {
        const typename V::reg w = V::set1(a.values[k]);
        const T* at = src + offsets[k];
        for (int r = 0; r < R; ++r) acc[0][r] = V::fmadd(w, V::loadu(at + r * W), acc[0][r]);
      }
      cursor[i] = k;
      const typename V::reg bias = V::set1(a.bias && last ? a.bias[o] : T(0));
      for (int r = 0; r < R; ++r) {
        typename V::reg sum = bias;
        for (int s = 0; s < S; ++s) sum = V::add(sum, acc[s][r]);
        V::store(last ? lanes + r * W : partial[i] + r * W, sum);
      }
      if (!last) continue;
      T* dst = a.out + o * pixels;
      for (int j = 0; j < L; ++j)
        if (target[j] >= 0) dst[target[j]] = output(lanes[j], a.relu);
    }
    if (last) return;
  }
}

template <typename V, typename O>
void conv_forward_with(const ConvArgs<typename V::T>& a, const O* offsets, int64_t tile, int64_t p_begin,
                       int64_t o_begin, int64_t o_end) {
  if (a.tw == 1) {  // p_begin: the run
    switch (a.single_vectors) {
      case 1: return conv_forward_single<V, 1>(a, offsets, p_begin, o_begin, o_end);
      case 2: return conv_forward_single<V, 2>(a, offsets, p_begin, o_begin, o_end);
      case 3: return conv_forward_single<V, 3>(a, offsets, p_begin, o_begin, o_end);
      case 4: return conv_forward_single<V, 4>(a, offsets, p_begin, o_begin, o_end);
      case 5: return conv_forward_single<V, 5>(a, offsets, p_begin, o_begin, o_end);
      case 6: return conv_forward_single<V, 6>(a, offsets, p_begin, o_begin, o_end);
      default: return;
    }
  }
  switch (a.tw / V::lanes) {
    case 1: return conv_forward_nv<V, 1, kForwardPixels<V, 1>>(a, offsets, tile, p_begin, o_begin, o_end);
    case 2: return conv_forward_nv<V, 2, kForwardPixels<V, 2>>(a, offsets, tile, p_begin, o_begin, o_end);
    case 3: return conv_forward_nv<V, 3, kForwardPixels<V, 3>>(a, offsets, tile, p_begin, o_begin, o_end);
    case 4: return conv_forward_nv<V, 4, kForwardPixels<V, 4>>(a, offsets, tile, p_begin, o_begin, o_end);
    default: return;
  }
}

// Offsets of 16 bits where the packed input's rows fit them (C * Hp * Wp <= 65536), else 32.
template <typename V>
void conv_forward(const ConvArgs<typename V::T>& a, int64_t tile, int64_t p_begin, int64_t o_begin, int64_t o_end) {
  if (a.off16) return conv_forward_with<V>(a, a.off16, tile, p_begin, o_begin, o_end);
  return conv_forward_with<V>(a, a.off, tile, p_begin, o_begin, o_end);
}

// Input gradient of channels [o_begin, o_end) on one batch tile: for PX output pixels at a time
// the output gradient stays in registers while every non-zero of the channel adds value * g into
// the rows of `acc` (the padded input's layout, one tile) that those pixels read in the forward.
// Input channels are taken in blocks whose part of `acc` stays in L2.
template <typename V, int NV, int PX>
void conv_grad_input_nv(const ConvBackwardArgs<typename V::T>& a, int64_t tile, int64_t o_begin, int64_t o_end,
                        typename V::T* acc) {
  using T = typename V::T;
  constexpr int W = V::lanes;
  constexpr int TW = NV * W;
  const int64_t pixels = a.out_h * a.out_w;
  const T* grad = a.packed_grad + tile * a.n_rows * a.grad_rows * TW;
  for (int64_t block = 0; block < a.n_blocks; ++block) {
    for (int64_t o = o_begin; o < o_end; ++o) {
      const int32_t* ptr = a.block_ptr + o * (a.n_blocks + 1) + block;
      const int32_t begin = ptr[0], end = ptr[1];
      if (begin == end) continue;
      const T* g_channel = grad + o * a.grad_rows * TW;
      // G pixels' output gradient in registers while the channel's non-zeros of the block pass
      const auto group = [&](auto px, int64_t p) {
        constexpr int G = decltype(px)::value;
        typename V::reg g[G][NV];
        T* dst[G];
        for (int q = 0; q < G; ++q) {
          dst[q] = acc + static_cast<int64_t>(a.pixel_base[p + q]) * TW;
          const T* g_pixel = g_channel + static_cast<int64_t>(a.grad_base[p + q]) * TW;
          for (int v = 0; v < NV; ++v) g[q][v] = V::load(g_pixel + v * W);
        }
        for (int32_t k = begin; k < end; ++k) {
          const typename V::reg w = V::set1(a.values[k]);
          const int64_t off = static_cast<int64_t>(a.off[k]) * TW;
          for (int q = 0; q < G; ++q)
            for (int v = 0; v < NV; ++v) {
              T* d = dst[q] + off + v * W;
              V::store(d, V::fmadd(w, g[q][v], V::load(d)));
            }
        }
      };
      pixel_groups<PX>(0, pixels, group);
    }
  }
}

// Value gradient of channels [o_begin, o_end) over batch tiles [0, n_tiles):
// dv[k] = sum over tiles, pixels p and batch columns j of g[o][p][j] * x[off_k + base_p][j], four
// non-zeros at a time (two accumulators each, eight chains). The tiles are summed in registers
// and each non-zero's lanes reduced once: reduced per tile, the horizontal sums and the stores
// cost as much as the products in the 2x2 and 4x4 layers (16 and 32 products a non-zero a tile).
// The groups of four are counted from the row's start, so a channel block hands the group that
// crosses its end to the next block's pass instead of running a part-empty one: at 16x16 a block
// holds three channels, about 2.7 non-zeros of a row at 0.9, and a part-empty group computes all
// four products. Measured (B=64, 0.9, AVX-512 EPYC, the seven VGG11 layers, value gradient only):
// 22.2 -> 21.4 ms at width 1, 3.74 -> 3.55 ms at width 0.375. Eight non-zeros a group (one
// accumulator each) measured 24.2 against 23.4 ms for four.
template <typename V, int NV>
void conv_grad_values_nv(const ConvBackwardArgs<typename V::T>& a, int64_t n_tiles, int64_t o_begin,
                         int64_t o_end) {
  using T = typename V::T;
  constexpr int W = V::lanes;
  constexpr int TW = NV * W;
  constexpr int KB = 4;
  const int64_t pixels = a.out_h * a.out_w;
  const int64_t grad_tile = a.n_rows * a.grad_rows * TW, input_tile = a.in_rows * TW;
  for (int64_t index = 0; index < a.n_blocks * (o_end - o_begin); ++index) {
    const int64_t block = index / (o_end - o_begin), o = o_begin + index % (o_end - o_begin);
    const int32_t* ptr = a.block_ptr + o * (a.n_blocks + 1) + block;
    const int32_t begin = ptr[0], end = ptr[1];
    const int32_t row_begin = a.crow[o], row_end = a.crow[o + 1];
    const int32_t first = row_begin + (begin - row_begin + KB - 1) / KB * KB;
    for (int32_t k0 = first; k0 < end; k0 += KB) {
      const int kb = (row_end - k0) < KB ? (row_end - k0) : KB;
      int64_t off[KB];
      for (int j = 0; j < KB; ++j) off[j] = static_cast<int64_t>(a.off[k0 + (j < kb ? j : 0)]) * TW;
      typename V::reg acc[KB][2];
      for (int j = 0; j < KB; ++j) acc[j][0] = acc[j][1] = V::zero();
      for (int64_t t = 0; t < n_tiles; ++t) {
        const T* g_channel = a.packed_grad + t * grad_tile + o * a.grad_rows * TW;
        // each non-zero's rows through its own pointer: one base register a non-zero and the
        // pixel's row as the index, where adding offset and row per load held the loop to half
        // the products' rate (38 instructions a pixel for 8 products, against 22)
        const T* rows[KB];
        for (int j = 0; j < KB; ++j) rows[j] = a.packed_input + t * input_tile + off[j];
        for (int64_t p = 0; p < pixels; ++p) {
          const int64_t at = static_cast<int64_t>(a.pixel_base[p]) * TW;
          const T* g_pixel = g_channel + static_cast<int64_t>(a.grad_base[p]) * TW;
          for (int v = 0; v < NV; ++v) {
            const typename V::reg g = V::load(g_pixel + v * W);
            for (int j = 0; j < KB; ++j) acc[j][v & 1] = V::fmadd(g, V::load(rows[j] + at + v * W), acc[j][v & 1]);
          }
        }
      }
      for (int j = 0; j < kb; ++j) a.grad_values[k0 + j] = V::hsum(V::add(acc[j][0], acc[j][1]));
    }
  }
}

template <typename V>
void conv_grad_input(const ConvBackwardArgs<typename V::T>& a, int64_t tile, int64_t o_begin, int64_t o_end,
                     typename V::T* acc) {
  switch (a.tw / V::lanes) {
    case 1: return conv_grad_input_nv<V, 1, kGroupPixels<1>>(a, tile, o_begin, o_end, acc);
    case 2: return conv_grad_input_nv<V, 2, kGroupPixels<2>>(a, tile, o_begin, o_end, acc);
    case 3: return conv_grad_input_nv<V, 3, kGroupPixels<3>>(a, tile, o_begin, o_end, acc);
    case 4: return conv_grad_input_nv<V, 4, kGroupPixels<4>>(a, tile, o_begin, o_end, acc);
    default: return;
  }
}

template <typename V>
void conv_grad_values(const ConvBackwardArgs<typename V::T>& a, int64_t n_tiles, int64_t o_begin, int64_t o_end) {
  switch (a.tw / V::lanes) {
    case 1: return conv_grad_values_nv<V, 1>(a, n_tiles, o_begin, o_end);
    case 2: return conv_grad_values_nv<V, 2>(a, n_tiles, o_begin, o_end);
    case 3: return conv_grad_values_nv<V, 3>(a, n_tiles, o_begin, o_end);
    case 4: return conv_grad_values_nv<V, 4>(a, n_tiles, o_begin, o_end);
    default: return;
  }
}

}  // namespace impl
}  // namespace actuallysparse
