#pragma GCC target("avx2,fma")
// AVX2 + FMA path (the pragma above compiles this file alone for AVX2/FMA; called only when the CPU reports both).
#include <immintrin.h>
#include "kernels_impl.h"
#include "pack_simd.h"

namespace actuallysparse {
namespace {

struct Avx2F32 {
  using T = float;
  static constexpr int lanes = 8;
  using reg = __m256;
    // max(a, 0) keeping NaN: MAX returns its second operand when either is NaN
  static reg relu(reg a) { return _mm256_max_ps(_mm256_setzero_ps(), a); }
  // the larger, NaN where either is (MAX alone returns b when either is NaN)
  static reg max(reg a, reg b) {
    return _mm256_blendv_ps(_mm256_max_ps(a, b), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(T x) { return _mm256_set1_ps(x); }
  static reg load(const T* p) { return _mm256_load_ps(p); }
  static void store(T* p, reg a) { _mm256_store_ps(p, a); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static T hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static reg loadu(const T* p) { return _mm256_loadu_ps(p); }
  static reg gather(const T* base, const int32_t* idx) {
    return _mm256_i32gather_ps(base, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), 4);
  }
  static reg gather16(const T* base, const int16_t* idx) {
    return _mm256_i32gather_ps(base, _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx))),
                               4);
  }
  static void storeu(T* p, reg a) { _mm256_storeu_ps(p, a); }
  // lane i of the result = sum of acc[i]'s lanes
  static reg reduce_lanes(const reg* acc) {
    const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  }
  static void pack_rows(const T* src, int64_t image_stride, int64_t step, int64_t n, int64_t images, T* dst, int64_t tw) {
    impl::pack_rows_avx2(src, image_stride, step, n, images, dst, tw);
  }
};

struct Avx2F64 {
  using T = double;
  static constexpr int lanes = 4;
  using reg = __m256d;
    // max(a, 0) keeping NaN: MAX returns its second operand when either is NaN
  static reg relu(reg a) { return _mm256_max_pd(_mm256_setzero_pd(), a); }
  // the larger, NaN where either is (MAX alone returns b when either is NaN)
  static reg max(reg a, reg b) {
    return _mm256_blendv_pd(_mm256_max_pd(a, b), a, _mm256_cmp_pd(a, a, _CMP_UNORD_Q));
  }
  static reg zero() { return _mm256_setzero_pd(); }
  static reg set1(T x) { return _mm256_set1_pd(x); }
  static reg load(const T* p) { return _mm256_load_pd(p); }
  static void store(T* p, reg a) { _mm256_store_pd(p, a); }
  static reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_pd(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
  static T hsum(reg a) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
  }
  static reg loadu(const T* p) { return _mm256_loadu_pd(p); }
  static reg gather(const T* base, const int32_t* idx) {
    return _mm256_i32gather_pd(base, _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx)), 8);
  }
  static reg gather16(const T* base, const int16_t* idx) {
    return _mm256_i32gather_pd(base, _mm_cvtepi16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(idx))), 8);
  }
  static void storeu(T* p, reg a) { _mm256_storeu_pd(p, a); }
  static reg reduce_lanes(const reg* acc) {
    const __m256d t0 = _mm256_hadd_pd(acc[0], acc[1]), t1 = _mm256_hadd_pd(acc[2], acc[3]);
    return _mm256_add_pd(_mm256_permute2f128_pd(t0, t1, 0x20), _mm256_permute2f128_pd(t0, t1, 0x31));
  }
  static void pack_rows(const T* src, int64_t image_stride, int64_t step, int64_t n, int64_t images, T* dst, int64_t tw) {
    impl::pack_rows_avx2(src, image_stride, step, n, images, dst, tw);
  }
};

}  // namespace

KernelTable<float> avx2_table_f32() { return impl::make_table<Avx2F32>(); }
KernelTable<double> avx2_table_f64() { return impl::make_table<Avx2F64>(); }

}  // namespace actuallysparse
