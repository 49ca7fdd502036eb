// Plain C++ path: a "vector" is a small array the compiler may map onto baseline SSE2.
#include "kernels_impl.h"

namespace actuallysparse {

KernelTable<float> scalar_table_f32() { return impl::make_table<impl::Lanes<float, 4>>(); }
KernelTable<double> scalar_table_f64() { return impl::make_table<impl::Lanes<double, 2>>(); }

}  // namespace actuallysparse
