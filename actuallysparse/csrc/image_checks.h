// Argument checks shared by the kernels for the dense layers around the sparse ones (pooling,
// batch norm): a CPU (batch, channels, height, width) tensor of float32 or float64.
#pragma once
#include <ATen/ATen.h>

namespace actuallysparse {

// `op` names the kernel in the message ("max pooling"), `what` the argument ("input").
inline void check_image_batch(const at::Tensor& x, const char* op, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "the native ", op, " runs on the CPU, ", what, " is on ", x.device());
  TORCH_CHECK(x.dim() == 4, "the native ", op, " takes (batch, channels, height, width), ", what, " is ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "the native ", op,
              " takes float32 or float64, ", what, " is ", x.scalar_type());
}

}  // namespace actuallysparse
