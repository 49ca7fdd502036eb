// The kernels, written once over a vector type V (see vec_*.h for each instruction set).
//
// spmm: for one batch tile and a range of pattern rows, row r accumulates
//   acc[0..nv) += value_k * packed[col_k][0..TW)   for k in row r,
// then writes acc transposed into out[b][r] through a small block buffer, so stores to the
// row-major output stay within a few cache lines. With a permutation (the transposed
// pattern of W), value_k is values[perm[k]]: the one values array serves every product and
// no step gathers it.
// sddmm: for W's row r, its tile row of the output gradient stays in registers while each
// non-zero k adds <that row, packed input row col_k> into grad_values[k].
#pragma once
#include <cstdint>
#include <cstring>
#include "kernels.h"

namespace actuallysparse {
namespace impl {

constexpr int kRowBlock = 16;  // rows per block buffer before the transposed store

template <typename V, int NV, bool kPerm>
void spmm_nv(const SpmmArgs<typename V::T>& a, int64_t tile, int64_t row_begin, int64_t row_end) {
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
      const int32_t* cols = a.col;
      int32_t k = begin;
      for (; k + S <= end; k += S) {
        for (int s = 0; s < S; ++s) {
          const T value = kPerm ? a.values[a.perm[k + s]] : a.values[k + s];
          const typename V::reg w = V::set1(value);
          const T* src = pack + static_cast<int64_t>(cols[k + s]) * TW;
          for (int v = 0; v < NV; ++v) acc[s][v] = V::fmadd(w, V::load(src + v * W), acc[s][v]);
        }
      }
      for (; k < end; ++k) {
        const T value = kPerm ? a.values[a.perm[k]] : a.values[k];
        const typename V::reg w = V::set1(value);
        const T* src = pack + static_cast<int64_t>(cols[k]) * TW;
        for (int v = 0; v < NV; ++v) acc[0][v] = V::fmadd(w, V::load(src + v * W), acc[0][v]);
      }
      for (int s = 1; s < S; ++s)
        for (int v = 0; v < NV; ++v) acc[0][v] = V::add(acc[0][v], acc[s][v]);
      for (int v = 0; v < NV; ++v) V::store(block[r - r0] + v * W, acc[0][v]);
    }
    for (int64_t b = 0; b < nb; ++b) {
      T* dst = a.out + (b0 + b) * a.n_rows;
      for (int64_t r = r0; r < r1; ++r) {
        const T bias = a.bias ? a.bias[r] : T(0);
        dst[r] = block[r - r0][b] + bias;
      }
    }
  }
}

template <typename V>
void spmm(const SpmmArgs<typename V::T>& a, int64_t tile, int64_t row_begin, int64_t row_end) {
  const int64_t nv = a.tw / V::lanes;
  const bool perm = a.perm != nullptr;
#define AS_SPMM_CASE(N)                                                   \
  case N:                                                                 \
    return perm ? spmm_nv<V, N, true>(a, tile, row_begin, row_end)        \
                : spmm_nv<V, N, false>(a, tile, row_begin, row_end);
  switch (nv) {
    AS_SPMM_CASE(1)
    AS_SPMM_CASE(2)
    AS_SPMM_CASE(3)
    AS_SPMM_CASE(4)
    default:
      return;
  }
#undef AS_SPMM_CASE
}

template <typename V, int NV>
void sddmm_nv(const SddmmArgs<typename V::T>& a, int64_t tile, int64_t row_begin, int64_t row_end,
              bool accumulate) {
  using T = typename V::T;
  constexpr int W = V::lanes;
  constexpr int TW = NV * W;
  const T* rows = a.packed_rows + tile * a.rows_k * TW;
  const T* cols = a.packed_cols + tile * a.cols_k * TW;
  for (int64_t r = row_begin; r < row_end; ++r) {
    typename V::reg g[NV];
    for (int v = 0; v < NV; ++v) g[v] = V::load(rows + r * TW + v * W);
    const int32_t begin = a.crow[r], end = a.crow[r + 1];
    for (int32_t k = begin; k < end; ++k) {
      const T* src = cols + static_cast<int64_t>(a.col[k]) * TW;
      typename V::reg acc = V::mul(g[0], V::load(src));
      for (int v = 1; v < NV; ++v) acc = V::fmadd(g[v], V::load(src + v * W), acc);
      const T dot = V::hsum(acc);
      a.grad_values[k] = accumulate ? a.grad_values[k] + dot : dot;
    }
  }
}

template <typename V>
void sddmm(const SddmmArgs<typename V::T>& a, int64_t tile, int64_t row_begin, int64_t row_end,
           bool accumulate) {
  switch (a.tw / V::lanes) {
    case 1: return sddmm_nv<V, 1>(a, tile, row_begin, row_end, accumulate);
    case 2: return sddmm_nv<V, 2>(a, tile, row_begin, row_end, accumulate);
    case 3: return sddmm_nv<V, 3>(a, tile, row_begin, row_end, accumulate);
    case 4: return sddmm_nv<V, 4>(a, tile, row_begin, row_end, accumulate);
    default: return;
  }
}

template <typename V>
KernelTable<typename V::T> make_table() {
  return KernelTable<typename V::T>{V::lanes, &spmm<V>, &sddmm<V>};
}

}  // namespace impl
}  // namespace actuallysparse
