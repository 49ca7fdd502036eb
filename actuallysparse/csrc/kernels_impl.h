// The kernels, written once over a vector type V (Lanes below; Avx2F32/F64 and Avx512F32/F64
// in kernels_avx2.cpp / kernels_avx512.cpp), for the packed layout described in kernels.h.
//
// spmm (forward): for one batch tile and a range of W's rows, row r accumulates
//   acc[0..nv) += value_k * packed[col_k][0..TW)   for k in row r,
// then writes acc transposed into out[b][r] through a small block buffer, so stores to the
// row-major output stay within a few cache lines. Measured on a 2-core AMD EPYC (AVX2),
// 4096x4096 at 0.9, one thread, B=64: ~7 ms against ~33 ms for dense GEMM and ~21 ms for
// MKL's CSR multiply. It is bound by L2 bandwidth (one 32-byte load per FMA); a variant
// walking the tile in L1-sized column blocks was 2-3x slower (per-block overhead and
// mispredicted row ends), and tiles of 2 vectors instead of 4 were 5-15 % slower.
// A tile as large as L2 does not change that (AMD EPYC Zen 5, L2 1 MiB, AVX2, 2 threads, 4096
// rows with 410 non-zeros each over 8192 columns: a 1 MiB tile at 4 vectors): 4 vectors ran the
// forward, input gradient and value gradient at B=64 in 3.96, 7.58, 4.86 ms, 2 vectors in 5.28,
// 7.86, 6.37 (each tile re-reads all of W). Walking each block of columns of W's rows in place
// (a table of where each block starts in each row) was slower in the backward in 71 of 72
// comparisons (AVX2 and AVX-512, B=64-256, 4096 and 8192 columns), by up to 140 % at 8 blocks,
// where the same blocks as separate compact matrices gained up to 20 %. The in-place walk
// reads W's values and indices with holes, the likely cause; a gain looks to need the values
// stored block by block.
// A batch of one row takes spmv instead: no padding to a vector of batch columns.
#pragma once
#include <cstdint>
#include <cstring>
#include "kernels.h"
#include "conv_impl.h"

namespace actuallysparse {
namespace impl {

// dst[i * tw + j] = src[j * image_stride + i * step] for i < n, j < images: one row of n elements
// per image, `step` apart, written transposed into a batch tile of width tw (KernelTable::pack_rows),
// one image at a time. Internal linkage: each file's copy is compiled for its instruction set.
namespace {
template <typename T>
inline void pack_rows_scalar(const T* src, int64_t image_stride, int64_t step, int64_t n, int64_t images, T* dst,
                             int64_t tw) {
  for (int64_t j = 0; j < images; ++j) {
    const T* row = src + j * image_stride;
    for (int64_t i = 0; i < n; ++i) dst[i * tw + j] = row[i * step];
  }
}
}  // namespace

// A "vector" of L elements as a plain array: the portable path (compiled for baseline x86-64).
template <typename TT, int L>
struct Lanes {
  using T = TT;
  static constexpr int lanes = L;
  struct reg { T v[L]; };
  static reg zero() { reg r; for (int i = 0; i < L; ++i) r.v[i] = T(0); return r; }
  static reg set1(T x) { reg r; for (int i = 0; i < L; ++i) r.v[i] = x; return r; }
  static reg load(const T* p) { reg r; for (int i = 0; i < L; ++i) r.v[i] = p[i]; return r; }
  static void store(T* p, const reg& a) { for (int i = 0; i < L; ++i) p[i] = a.v[i]; }
  static reg add(const reg& a, const reg& b) { reg r; for (int i = 0; i < L; ++i) r.v[i] = a.v[i] + b.v[i]; return r; }
  static reg mul(const reg& a, const reg& b) { reg r; for (int i = 0; i < L; ++i) r.v[i] = a.v[i] * b.v[i]; return r; }
  static reg fmadd(const reg& a, const reg& b, const reg& c) {
    reg r; for (int i = 0; i < L; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i]; return r;
  }
  static T hsum(const reg& a) { T s = T(0); for (int i = 0; i < L; ++i) s += a.v[i]; return s; }
  static reg loadu(const T* p) { return load(p); }
  static void storeu(T* p, const reg& a) { store(p, a); }
  static reg gather(const T* base, const int32_t* idx) { reg r; for (int i = 0; i < L; ++i) r.v[i] = base[idx[i]]; return r; }
  static reg gather16(const T* base, const int16_t* idx) {
    reg r; for (int i = 0; i < L; ++i) r.v[i] = base[idx[i]]; return r;
  }
  static reg reduce_lanes(const reg* acc) { reg r; for (int i = 0; i < L; ++i) r.v[i] = hsum(acc[i]); return r; }
  static reg relu(const reg& a) {  // NaN stays NaN
    reg r; for (int i = 0; i < L; ++i) r.v[i] = a.v[i] < T(0) ? T(0) : a.v[i]; return r;
  }
  static reg max(const reg& a, const reg& b) {  // NaN if either is
    reg r; for (int i = 0; i < L; ++i) r.v[i] = (a.v[i] != a.v[i] || a.v[i] > b.v[i]) ? a.v[i] : b.v[i]; return r;
  }
  static void pack_rows(const T* src, int64_t image_stride, int64_t step, int64_t n, int64_t images, T* dst,
                        int64_t tw) {
    pack_rows_scalar(src, image_stride, step, n, images, dst, tw);
  }
};

constexpr int kRowBlock = 16;  // rows per block buffer before the transposed store

// L entries of base at the column indices idx[0..L), 32- or 16-bit.
template <typename V, typename I>
inline typename V::reg gather_at(const typename V::T* base, const I* idx) {
  if constexpr (sizeof(I) == 2) return V::gather16(base, idx);
  else return V::gather(base, idx);
}

// Non-zeros ahead of the one in use whose values and indices spmv asks for. W streams from
// memory once a call, which the hardware's prefetchers alone did not keep busy: measured (Intel
// Xeon with AVX-512, 4096x4096 at 0.9, B=1, W evicted by a 256 MB sweep before each call, median
// of 12 interleaved rounds) 0.605 ms without, 0.467 / 0.399 / 0.382 / 0.381 ms at 256 / 512 /
// 1024 / 2048 ahead, and 0.275 -> 0.253 ms with W in cache. The same requests a row ahead in the
// batched forward (spmm_nv) gained nothing at B=16 and 64: there the tile's loads bound it.
constexpr int32_t kSpmvPrefetchAhead = 1024;

// A batch of one row: dot products of each row of W with the input row, L non-zeros at a
// time through a gather (the row stays in L1), two accumulators in flight.
template <typename V, typename I>
void spmv(const SpmmArgs<typename V::T, I>& a, int64_t row_begin, int64_t row_end) {
  using T = typename V::T;
  constexpr int L = V::lanes;
  const T* x = a.packed;
  const int32_t prefetch_last = a.crow[a.n_rows] - kSpmvPrefetchAhead - 2 * L;  // stay within W's arrays
  for (int64_t r = row_begin; r < row_end; ++r) {
    typename V::reg acc0 = V::zero(), acc1 = V::zero();
    int32_t k = a.crow[r];
    const int32_t end = a.crow[r + 1];
    for (; k + 2 * L <= end; k += 2 * L) {
      if (k <= prefetch_last) {
        prefetch_range(a.values + k + kSpmvPrefetchAhead, a.values + k + kSpmvPrefetchAhead + 2 * L);
        prefetch_range(a.col + k + kSpmvPrefetchAhead, a.col + k + kSpmvPrefetchAhead + 2 * L);
      }
      acc0 = V::fmadd(V::loadu(a.values + k), gather_at<V>(x, a.col + k), acc0);
      acc1 = V::fmadd(V::loadu(a.values + k + L), gather_at<V>(x, a.col + k + L), acc1);
    }
    if (k + L <= end) {
      acc0 = V::fmadd(V::loadu(a.values + k), gather_at<V>(x, a.col + k), acc0);
      k += L;
    }
    T sum = V::hsum(V::add(acc0, acc1));
    for (; k < end; ++k) sum += a.values[k] * x[a.col[k]];
    a.out[r] = sum + (a.bias ? a.bias[r] : T(0));
  }
}

// Backward for a batch of one row: dv[k] = g[r] * x[col_k], dx[col_k] += v[k] * g[r].
template <typename T, typename I, bool kDX, bool kDV>
void backward_one(const BackwardArgs<T, I>& a, int64_t row_begin, int64_t row_end, T* acc, bool accumulate) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T g = a.packed_rows[r];
    for (int32_t k = a.crow[r]; k < a.crow[r + 1]; ++k) {
      const int32_t c = a.col[k];
      if (kDV) a.grad_values[k] = (accumulate ? a.grad_values[k] : T(0)) + g * a.packed_cols[c];
      if (kDX) acc[c] += a.values[k] * g;
    }
  }
}

// A batch tile of NV vectors: each row of W passes once over the whole packed tile. Splitting
// W's columns into two or four slices, each swept over all rows with its partial sums added into
// the output so that the slice of the tile in use fits half of L2, was slower at every batch
// measured, so a tile as large as L2 does not bound this loop: on a Zen 4 EPYC (L2 1 MiB, which
// the AVX-512 tile of a 4096-column layer fills), 4096x4096 at 0.9, 2 threads, dense ÷ ours over
// three alternating processes, B=64 went 5.6-8.8x (one sweep) -> 4.7-5.3x (two) -> 4.3-5.0x
// (four) and B=256 5.0-6.0x -> 3.7-4.8x -> 3.8x; with AVX2 (a 512 KiB tile) B=64 5.9-6.2x ->
// 4.7-4.9x -> 3.8-4.6x. Nor did tiles of two vectors, which keep the tile within half of L2 where
// four fill it (the cap switched between calls in one process, same CPU and layer, fastest of 11):
// with AVX-512, two vectors ran the forward 2-4 % faster at 0.9 and both gradients alike (four
// against two: 7.0 and 7.2 ms at B=64, 28.0 and 27.8 at B=256); with AVX2 (512 KiB against 256,
// a Zen 3's whole L2 against half of it), four vectors ran both gradients in 7.4 ms against 8.5
// at B=64, 14.8 against 16.9 at B=128 and 29.3 against 33.2 at B=256.
template <typename V, int NV, typename I>
void spmm_nv(const SpmmArgs<typename V::T, I>& a, int64_t tile, int64_t row_begin, int64_t row_end) {
  using T = typename V::T;
  constexpr int W = V::lanes;
  constexpr int TW = NV * W;
  const T* pack = a.packed + tile * a.k_rows * TW;
  const int64_t b0 = tile * TW;
  const int64_t nb = (a.batch - b0) < TW ? (a.batch - b0) : TW;
  alignas(64) T block[kRowBlock][TW];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowBlock) {
    const int64_t r1 = (r0 + kRowBlock) < row_end ? (r0 + kRowBlock) : row_end;
    for (int64_t r = r0; r < r1; ++r) {
      // S independent sets of NV accumulators, so S * NV >= 8 FMA chains are in flight
      // (FMA latency 4, two per cycle); one set alone made the loop latency-bound.
      constexpr int S = NV >= 4 ? 2 : (NV == 3 ? 3 : 8 / NV);
      typename V::reg acc[S][NV];
      for (int s = 0; s < S; ++s)
        for (int v = 0; v < NV; ++v) acc[s][v] = V::zero();
      const int32_t begin = a.crow[r], end = a.crow[r + 1];
      const I* cols = a.col;
      int32_t k = begin;
      for (; k + S <= end; k += S) {
        for (int s = 0; s < S; ++s) {
          const T value = a.values[k + s];
          const typename V::reg w = V::set1(value);
          const T* src = pack + static_cast<int64_t>(cols[k + s]) * TW;
          for (int v = 0; v < NV; ++v) acc[s][v] = V::fmadd(w, V::load(src + v * W), acc[s][v]);
        }
      }
      for (; k < end; ++k) {
        const T value = a.values[k];
        const typename V::reg w = V::set1(value);
        const T* src = pack + static_cast<int64_t>(cols[k]) * TW;
        for (int v = 0; v < NV; ++v) acc[0][v] = V::fmadd(w, V::load(src + v * W), acc[0][v]);
      }
      for (int s = 1; s < S; ++s)
        for (int v = 0; v < NV; ++v) acc[0][v] = V::add(acc[0][v], acc[s][v]);
      for (int v = 0; v < NV; ++v) V::store(block[r - r0] + v * W, acc[0][v]);
    }
    store_transposed<V>(block[0], TW, r1 - r0, nb, a.bias ? a.bias + r0 : nullptr, T(0), false,
                        a.out + b0 * a.n_rows + r0, a.n_rows);
  }
}

template <typename V, typename I>
void spmm(const SpmmArgs<typename V::T, I>& a, int64_t tile, int64_t row_begin, int64_t row_end) {
  if (a.tw == 1) return spmv<V, I>(a, row_begin, row_end);
  switch (a.tw / V::lanes) {
    case 1: return spmm_nv<V, 1, I>(a, tile, row_begin, row_end);
    case 2: return spmm_nv<V, 2, I>(a, tile, row_begin, row_end);
    case 3: return spmm_nv<V, 3, I>(a, tile, row_begin, row_end);
    case 4: return spmm_nv<V, 4, I>(a, tile, row_begin, row_end);
    default: return;
  }
}

// backward: the gradients over W's rows. For W's row r, the tile row g of the output gradient
// stays in registers while each non-zero k
//   - adds <g, packed input row col_k> into grad_values[k] (L non-zeros at a time, their
//     dot products leaving as one vector through a transposing reduction), and
//   - adds value_k * g into row col_k of an (in_features x TW) accumulation tile: the input
//     gradient scattered along W's own rows, so values are read in their stored order and
//     no transposed pattern or permutation is needed.
template <typename V, int NV, typename I, bool kDX, bool kDV>
void backward_nv(const BackwardArgs<typename V::T, I>& a, int64_t tile, int64_t row_begin, int64_t row_end,
                 typename V::T* acc_tile, bool accumulate) {
  using T = typename V::T;
  constexpr int W = V::lanes;
  constexpr int TW = NV * W;
  constexpr int L = V::lanes;
  const T* rows = a.packed_rows + tile * a.rows_k * TW;
  const T* cols = kDV ? a.packed_cols + tile * a.cols_k * TW : nullptr;
  for (int64_t r = row_begin; r < row_end; ++r) {
    typename V::reg g[NV];
    for (int v = 0; v < NV; ++v) g[v] = V::load(rows + r * TW + v * W);
    const int32_t begin = a.crow[r], end = a.crow[r + 1];
    int32_t k = begin;
    for (; k + L <= end; k += L) {
      typename V::reg dots[L];
      for (int j = 0; j < L; ++j) {
        const int64_t c = a.col[k + j];
        if (kDV) {
          const T* src = cols + c * TW;
          dots[j] = V::mul(g[0], V::load(src));
          for (int v = 1; v < NV; ++v) dots[j] = V::fmadd(g[v], V::load(src + v * W), dots[j]);
        }
        if (kDX) {
          const typename V::reg w = V::set1(a.values[k + j]);
          T* dst = acc_tile + c * TW;
          for (int v = 0; v < NV; ++v) V::store(dst + v * W, V::fmadd(w, g[v], V::load(dst + v * W)));
        }
      }
      if (kDV) {
        typename V::reg sums = V::reduce_lanes(dots);
        if (accumulate) sums = V::add(sums, V::loadu(a.grad_values + k));
        V::storeu(a.grad_values + k, sums);
      }
    }
    for (; k < end; ++k) {
      const int64_t c = a.col[k];
      if (kDV) {
        const T* src = cols + c * TW;
        typename V::reg dot = V::mul(g[0], V::load(src));
        for (int v = 1; v < NV; ++v) dot = V::fmadd(g[v], V::load(src + v * W), dot);
        const T sum = V::hsum(dot);
        a.grad_values[k] = accumulate ? a.grad_values[k] + sum : sum;
      }
      if (kDX) {
        const typename V::reg w = V::set1(a.values[k]);
        T* dst = acc_tile + c * TW;
        for (int v = 0; v < NV; ++v) V::store(dst + v * W, V::fmadd(w, g[v], V::load(dst + v * W)));
      }
    }
  }
}

template <typename V, typename I, bool kDX, bool kDV>
void backward_as(const BackwardArgs<typename V::T, I>& a, int64_t tile, int64_t row_begin, int64_t row_end,
                 typename V::T* acc_tile, bool accumulate) {
  if (a.tw == 1) return backward_one<typename V::T, I, kDX, kDV>(a, row_begin, row_end, acc_tile, accumulate);
  switch (a.tw / V::lanes) {
    case 1: return backward_nv<V, 1, I, kDX, kDV>(a, tile, row_begin, row_end, acc_tile, accumulate);
    case 2: return backward_nv<V, 2, I, kDX, kDV>(a, tile, row_begin, row_end, acc_tile, accumulate);
    case 3: return backward_nv<V, 3, I, kDX, kDV>(a, tile, row_begin, row_end, acc_tile, accumulate);
    case 4: return backward_nv<V, 4, I, kDX, kDV>(a, tile, row_begin, row_end, acc_tile, accumulate);
    default: return;
  }
}

template <typename V, typename I>
void backward(const BackwardArgs<typename V::T, I>& a, int64_t tile, int64_t row_begin, int64_t row_end,
              typename V::T* acc_tile, bool accumulate) {
  // With both gradients wanted, two passes over the rows beat one fused pass (measured on AVX2,
  // 4096x4096 at 0.9: 19 vs 21 ms at B=64, 80 vs 93 ms at B=256, one thread): fused, the
  // input tile and the accumulation tile compete for L2.
  if (a.grad_values != nullptr) backward_as<V, I, false, true>(a, tile, row_begin, row_end, nullptr, accumulate);
  if (acc_tile != nullptr) backward_as<V, I, true, false>(a, tile, row_begin, row_end, acc_tile, accumulate);
}

template <typename V>
KernelTable<typename V::T> make_table() {
  return KernelTable<typename V::T>{V::lanes, &spmm<V, int32_t>, &backward<V, int32_t>, &spmm<V, int16_t>,
                                   &backward<V, int16_t>, &conv_forward<V>, &conv_grad_input<V>,
                                   &conv_grad_values<V>, &V::pack_rows};
}

}  // namespace impl
}  // namespace actuallysparse
