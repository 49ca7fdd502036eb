#pragma GCC target("avx512f,fma")
// AVX-512F path (the pragma above compiles this file alone for AVX-512F; called only when the CPU reports AVX-512F).
#include <immintrin.h>
#include "kernels_impl.h"

namespace actuallysparse {
namespace {

struct Avx512F32 {
  using T = float;
  static constexpr int lanes = 16;
  using reg = __m512;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(T x) { return _mm512_set1_ps(x); }
  static reg load(const T* p) { return _mm512_load_ps(p); }
  static void store(T* p, reg a) { _mm512_store_ps(p, a); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static T hsum(reg a) { return _mm512_reduce_add_ps(a); }
};

struct Avx512F64 {
  using T = double;
  static constexpr int lanes = 8;
  using reg = __m512d;
  static reg zero() { return _mm512_setzero_pd(); }
  static reg set1(T x) { return _mm512_set1_pd(x); }
  static reg load(const T* p) { return _mm512_load_pd(p); }
  static void store(T* p, reg a) { _mm512_store_pd(p, a); }
  static reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static T hsum(reg a) { return _mm512_reduce_add_pd(a); }
};

}  // namespace

KernelTable<float> avx512_table_f32() { return impl::make_table<Avx512F32>(); }
KernelTable<double> avx512_table_f64() { return impl::make_table<Avx512F64>(); }

}  // namespace actuallysparse
