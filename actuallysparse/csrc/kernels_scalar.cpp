// Plain C++ path: a "vector" is a small array the compiler may map onto baseline SSE2.
#include "kernels_impl.h"

namespace actuallysparse {
namespace {

template <typename TT, int L>
struct ScalarVec {
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
};

}  // namespace

KernelTable<float> scalar_table_f32() { return impl::make_table<ScalarVec<float, 4>>(); }
KernelTable<double> scalar_table_f64() { return impl::make_table<ScalarVec<double, 2>>(); }

}  // namespace actuallysparse
