// 2x2, stride-2 max pooling of (N, C, H, W) CPU tensors, the pooling of VGG's feature blocks.
//
// torch 2.14's CPU max_pool2d on a contiguous (NCHW) tensor runs 10-20x slower than one pass
// over the input (1.9 ms for 64x16x32x32 on 2 cores, where reading 4 MiB takes about 0.1 ms);
// written as elementwise maxima in torch with the indices built from comparisons, the same
// pooling took 2.2 ms forward and 1.9 ms backward, 20 % of a pruned quarter-width VGG11_bn's
// training step. Here the forward reads each window once and records which of its four
// positions won in one byte (row-major: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right),
// and the backward writes every input gradient once, the window's winner its output gradient and
// the rest zero. Ties and NaN follow max_pool2d: the first maximum in row-major order wins, and
// a NaN wins over any number (the last NaN of the window).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "image_checks.h"
#include "pooling.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace actuallysparse {
namespace {

void check_pool_input(const at::Tensor& x, const char* what) { check_image_batch(x, "max pooling", what); }

template <typename T>
void pool_planes(const T* __restrict in, T* __restrict out, uint8_t* __restrict codes, int64_t begin, int64_t end,
                 int64_t height, int64_t width) {
  alignas(64) T a[kPoolChunk], b[kPoolChunk], c[kPoolChunk], d[kPoolChunk];
  walk_windows(begin, end, height, width,
               [&](int64_t k, int64_t at) {
                 a[k] = in[at];
                 b[k] = in[at + 1];
                 c[k] = in[at + width];
                 d[k] = in[at + width + 1];
               },
               [&](int64_t first, int64_t n) { choose_winners(a, b, c, d, n, out + first, codes + first); });
}

// The maxima alone, for a forward that records no graph: a plain loop over each output row,
// which the compiler vectorises (stride-2 loads and selects), where the walk above copies each
// window into its chunk to choose and record the winner, about 1 ns an output. Measured on a
// 64x64x32x32 batch (AVX-512 EPYC, 2 threads, median of 15 interleaved rounds): 0.94 ms with
// winners, 0.42 ms without; 17.5 against 8.9 us for one image.
template <typename T>
void pool_planes_values(const T* __restrict in, T* __restrict out, int64_t begin, int64_t end, int64_t height,
                        int64_t width) {
  const int64_t out_h = height / 2, out_w = width / 2;
  for (int64_t plane = begin; plane < end; ++plane)
    for (int64_t y = 0; y < out_h; ++y) {
      const T* __restrict top = in + (plane * height + 2 * y) * width;
      const T* __restrict bottom = top + width;
      T* __restrict row = out + (plane * out_h + y) * out_w;
      for (int64_t x = 0; x < out_w; ++x)
        row[x] = window_max(top[2 * x], top[2 * x + 1], bottom[2 * x], bottom[2 * x + 1]);
    }
}

template <typename T>
void unpool_planes(const T* __restrict grad_out, const uint8_t* __restrict codes, T* __restrict grad_in,
                   int64_t begin, int64_t end, int64_t height, int64_t width) {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  alignas(64) I a[kPoolChunk], b[kPoolChunk], c[kPoolChunk], d[kPoolChunk];
  int64_t offsets[kPoolChunk];
  walk_windows(begin, end, height, width, [&](int64_t k, int64_t at) { offsets[k] = at; },
               [&](int64_t first, int64_t n) {
                 const T* __restrict g = grad_out + first;
                 const uint8_t* __restrict w = codes + first;
                 // the winner keeps its gradient's bits, the others get +0.0: integer masks, which
                 // vectorise (a select per position did not, and took 7 ns an output)
                 for (int64_t k = 0; k < n; ++k) {
                   I bits;
                   std::memcpy(&bits, g + k, sizeof(T));
                   const I code = w[k];
                   a[k] = bits & -static_cast<I>(code == 0);
                   b[k] = bits & -static_cast<I>(code == 1);
                   c[k] = bits & -static_cast<I>(code == 2);
                   d[k] = bits & -static_cast<I>(code == 3);
                 }
                 for (int64_t k = 0; k < n; ++k) {
                   T* at = grad_in + offsets[k];
                   std::memcpy(at, a + k, sizeof(T));
                   std::memcpy(at + 1, b + k, sizeof(T));
                   std::memcpy(at + width, c + k, sizeof(T));
                   std::memcpy(at + width + 1, d + k, sizeof(T));
                 }
               });
  if (height % 2 == 0 && width % 2 == 0) return;
  for (int64_t plane = begin; plane < end; ++plane) {  // the last row and column no window covers
    T* in = grad_in + plane * height * width;
    if (width % 2)
      for (int64_t y = 0; y < height; ++y) in[y * width + width - 1] = T(0);
    if (height % 2) std::fill(in + (height - 1) * width, in + height * width, T(0));
  }
}

// Planes per parallel item: about 32 K input elements, so small planes do not cost a task each.
int64_t plane_grain(int64_t height, int64_t width) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, height * width));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2x2(const at::Tensor& input, bool winners) {
  check_pool_input(input, "input");
  const at::Tensor x = input.contiguous();
  const int64_t planes = x.size(0) * x.size(1), height = x.size(2), width = x.size(3);
  at::Tensor out = at::empty({x.size(0), x.size(1), height / 2, width / 2}, x.options());
  at::Tensor where = at::empty(winners ? out.sizes() : at::IntArrayRef{0}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, where};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "actuallysparse_max_pool2x2", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    uint8_t* codes = winners ? where.data_ptr<uint8_t>() : nullptr;
    at::parallel_for(0, planes, plane_grain(height, width), [&](int64_t begin, int64_t end) {
      if (winners)
        pool_planes(src, dst, codes, begin, end, height, width);
      else
        pool_planes_values(src, dst, begin, end, height, width);
    });
  });
  return {out, where};
}

namespace {

at::Tensor max_pool2x2_backward(const at::Tensor& grad_out, const at::Tensor& where, int64_t height, int64_t width) {
  check_pool_input(grad_out, "grad_out");
  TORCH_CHECK(where.scalar_type() == at::kByte && where.sizes() == grad_out.sizes(),
              "the window positions must be uint8 of the output gradient's shape ", grad_out.sizes(), ", got ",
              where.scalar_type(), " ", where.sizes());
  TORCH_CHECK(height / 2 == grad_out.size(2) && width / 2 == grad_out.size(3), "an input of ", height, "x", width,
              " pools to ", height / 2, "x", width / 2, ", but the output gradient is ", grad_out.size(2), "x",
              grad_out.size(3));
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor codes = where.contiguous();
  const int64_t planes = g.size(0) * g.size(1);
  at::Tensor grad_x = at::empty({g.size(0), g.size(1), height, width}, g.options());
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "actuallysparse_max_pool2x2_backward", [&] {
    const scalar_t* src = g.data_ptr<scalar_t>();
    const uint8_t* winners = codes.data_ptr<uint8_t>();
    scalar_t* dst = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, planes, plane_grain(height, width), [&](int64_t begin, int64_t end) {
      unpool_planes(src, winners, dst, begin, end, height, width);
    });
  });
  return grad_x;
}

}  // namespace
}  // namespace actuallysparse

TORCH_LIBRARY_FRAGMENT(actuallysparse_kernels, m) {
  m.def("max_pool2x2(Tensor x, bool winners=True) -> (Tensor, Tensor)");
  m.def("max_pool2x2_backward(Tensor grad_out, Tensor where, int height, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(actuallysparse_kernels, CPU, m) {
  m.impl("max_pool2x2", &actuallysparse::max_pool2x2);
  m.impl("max_pool2x2_backward", &actuallysparse::max_pool2x2_backward);
}
