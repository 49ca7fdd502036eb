// 2x2, stride-2 max pooling (pooling.cpp), for the convolution that pools its output where it
// cannot pool as it writes (see conv2d in bindings.cpp).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace actuallysparse {

// The pooled output of a CPU (batch, channels, height, width) tensor and each window's winner
// (uint8, row-major: 0 top-left .. 3 bottom-right).
std::tuple<at::Tensor, at::Tensor> max_pool2x2(const at::Tensor& input);

}  // namespace actuallysparse
