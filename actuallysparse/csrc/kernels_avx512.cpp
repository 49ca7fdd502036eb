#pragma GCC target("avx512f,fma")
// AVX-512F path (the pragma above compiles this file alone for AVX-512F; called only when the CPU reports AVX-512F).
#include <immintrin.h>
#include "kernels_impl.h"
#include "pack_simd.h"

namespace actuallysparse {
namespace {

struct Avx512F32 {
  using T = float;
  static constexpr int lanes = 16;
  using reg = __m512;
    // max(a, 0) keeping NaN: MAX returns its second operand when either is NaN
  static reg relu(reg a) { return _mm512_max_ps(_mm512_setzero_ps(), a); }
  // the larger, NaN where either is (MAX alone returns b when either is NaN)
  static reg max(reg a, reg b) {
    return _mm512_mask_mov_ps(_mm512_max_ps(a, b), _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), a);
  }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(T x) { return _mm512_set1_ps(x); }
  static reg load(const T* p) { return _mm512_load_ps(p); }
  static void store(T* p, reg a) { _mm512_store_ps(p, a); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static T hsum(reg a) { return _mm512_reduce_add_ps(a); }
  static reg loadu(const T* p) { return _mm512_loadu_ps(p); }
  static reg gather(const T* base, const int32_t* idx) {
    return _mm512_i32gather_ps(_mm512_loadu_si512(idx), base, 4);
  }
  static reg gather16(const T* base, const int16_t* idx) {
    return _mm512_i32gather_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx))),
                               base, 4);
  }
  static void storeu(T* p, reg a) { _mm512_storeu_ps(p, a); }
  // lane i of the result = sum of acc[i]'s lanes: fold each to 256 bits, then two 8-way
  // transposing reductions.
  static __m256 reduce8(const __m256* h) {
    const __m256 t0 = _mm256_hadd_ps(h[0], h[1]), t1 = _mm256_hadd_ps(h[2], h[3]);
    const __m256 t2 = _mm256_hadd_ps(h[4], h[5]), t3 = _mm256_hadd_ps(h[6], h[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  }
  static reg reduce_lanes(const reg* acc) {
    __m256 h[16];
    for (int i = 0; i < 16; ++i)
      h[i] = _mm256_add_ps(_mm512_castps512_ps256(acc[i]),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i]), 1)));
    const __m256 lo = reduce8(h), hi = reduce8(h + 8);
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                                               _mm256_castps_pd(hi), 1));
  }
  static void pack_rows(const T* src, int64_t image_stride, int64_t step, int64_t n, int64_t images, T* dst, int64_t tw) {
    impl::pack_rows_avx2(src, image_stride, step, n, images, dst, tw);
  }
};

struct Avx512F64 {
  using T = double;
  static constexpr int lanes = 8;
  using reg = __m512d;
    // max(a, 0) keeping NaN: MAX returns its second operand when either is NaN
  static reg relu(reg a) { return _mm512_max_pd(_mm512_setzero_pd(), a); }
  // the larger, NaN where either is (MAX alone returns b when either is NaN)
  static reg max(reg a, reg b) {
    return _mm512_mask_mov_pd(_mm512_max_pd(a, b), _mm512_cmp_pd_mask(a, a, _CMP_UNORD_Q), a);
  }
  static reg zero() { return _mm512_setzero_pd(); }
  static reg set1(T x) { return _mm512_set1_pd(x); }
  static reg load(const T* p) { return _mm512_load_pd(p); }
  static void store(T* p, reg a) { _mm512_store_pd(p, a); }
  static reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static T hsum(reg a) { return _mm512_reduce_add_pd(a); }
  static reg loadu(const T* p) { return _mm512_loadu_pd(p); }
  static reg gather(const T* base, const int32_t* idx) {
    return _mm512_i32gather_pd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), base, 8);
  }
  static reg gather16(const T* base, const int16_t* idx) {
    return _mm512_i32gather_pd(_mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx))), base,
                               8);
  }
  static void storeu(T* p, reg a) { _mm512_storeu_pd(p, a); }
  static reg reduce_lanes(const reg* acc) {
    __m256d h[8];
    for (int i = 0; i < 8; ++i) h[i] = _mm256_add_pd(_mm512_castpd512_pd256(acc[i]), _mm512_extractf64x4_pd(acc[i], 1));
    __m256d q[2];
    for (int i = 0; i < 2; ++i) {
      const __m256d t0 = _mm256_hadd_pd(h[4 * i], h[4 * i + 1]), t1 = _mm256_hadd_pd(h[4 * i + 2], h[4 * i + 3]);
      q[i] = _mm256_add_pd(_mm256_permute2f128_pd(t0, t1, 0x20), _mm256_permute2f128_pd(t0, t1, 0x31));
    }
    return _mm512_insertf64x4(_mm512_castpd256_pd512(q[0]), q[1], 1);
  }
  static void pack_rows(const T* src, int64_t image_stride, int64_t step, int64_t n, int64_t images, T* dst, int64_t tw) {
    impl::pack_rows_avx2(src, image_stride, step, n, images, dst, tw);
  }
};

}  // namespace

KernelTable<float> avx512_table_f32() { return impl::make_table<Avx512F32>(); }
KernelTable<double> avx512_table_f64() { return impl::make_table<Avx512F64>(); }

}  // namespace actuallysparse
