// Dropout of CPU tensors: the mask drawn by a counter-based generator, and the scaled product.
//
// torch 2.14 draws a mask from its Mersenne Twister one element at a time, on one thread
// (uniform_ took 0.63 ms for a 64x4096 batch): with the multiplications around it, the
// classifier's two dropouts took 1.7 ms of a pruned VGG11_bn's training step at B=64, more than
// its last linear layer. Here element 2j and 2j + 1 of a call take the low and the high 32 bits of
// splitmix64(seed + (j + 1) * golden) as their draws u; an element is kept when
// u >= ceil(p * 2^32), so with probability 1 - p to within 2^-32. Each draw depends on the seed
// and the element's position alone, so any number of threads gives the same mask, and the
// caller's seed (drawn from torch's generator) makes a run repeatable.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace actuallysparse {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr int64_t kGrain = 1 << 14;  // elements a thread takes at least

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

void check_dropout_input(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "dropout: ", what, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "dropout: ", what, " must be float32 or float64, got ", t.scalar_type());
}

// out[i] = x[i] * keep[i] * scale for a mask of zeros and ones: a product, not a branch (the
// branch on a random mask mispredicted half the time, 4 ns an element), and a dropped NaN or
// infinity gives NaN, as x * mask does.
template <typename T>
void scale_kept(const T* __restrict x, const uint8_t* __restrict keep, T* __restrict out, int64_t n, T scale) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * (static_cast<T>(keep[i]) * scale);
}

// The mask (uint8, 1 where kept) of elements [begin, end), begin even.
inline void draw_mask(uint8_t* __restrict keep, int64_t begin, int64_t end, uint64_t seed, uint64_t threshold) {
  for (int64_t i = begin; i < end; i += 2) {
    const uint64_t bits = splitmix64(seed + static_cast<uint64_t>(i / 2 + 1) * kGolden);
    keep[i] = (bits & 0xFFFFFFFFULL) >= threshold;
    if (i + 1 < end) keep[i + 1] = (bits >> 32) >= threshold;
  }
}

std::tuple<at::Tensor, at::Tensor> dropout(const at::Tensor& input, double p, int64_t seed) {
  check_dropout_input(input, "input");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout: p must be in [0, 1) here, got ", p);
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x);
  at::Tensor keep = at::empty(x.sizes(), x.options().dtype(at::kByte));
  // kept when the 32-bit draw is at least p * 2^32, rounded up: 0 keeps all when p is 0
  const uint64_t threshold = static_cast<uint64_t>(std::ceil(p * 4294967296.0));
  const uint64_t base = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "actuallysparse_dropout", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    uint8_t* mask = keep.data_ptr<uint8_t>();
    const scalar_t scale = static_cast<scalar_t>(1.0 / (1.0 - p));
    // ranges start at even elements, so every pair of draws stays within one range
    const int64_t pairs = (x.numel() + 1) / 2;
    at::parallel_for(0, pairs, kGrain / 2, [&](int64_t begin, int64_t end) {
      const int64_t first = 2 * begin, last = std::min<int64_t>(2 * end, x.numel());
      draw_mask(mask, first, last, base, threshold);
      scale_kept(src + first, mask + first, dst + first, last - first, scale);
    });
  });
  return {out, keep};
}

// grad * (kept ? scale : 0): dropout's input gradient, and that of this product itself.
at::Tensor dropout_backward(const at::Tensor& grad, const at::Tensor& keep, double scale) {
  check_dropout_input(grad, "grad");
  TORCH_CHECK(keep.scalar_type() == at::kByte && keep.sizes() == grad.sizes() && keep.device().is_cpu(),
              "dropout_backward: the mask must be uint8 of the gradient's shape ", grad.sizes(), ", got ",
              keep.scalar_type(), " of ", keep.sizes());
  const at::Tensor g = grad.contiguous(), k = keep.contiguous();
  at::Tensor out = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "actuallysparse_dropout_backward", [&] {
    const scalar_t* src = g.data_ptr<scalar_t>();
    const uint8_t* mask = k.data_ptr<uint8_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(scale);
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
      scale_kept(src + begin, mask + begin, dst + begin, end - begin, s);
    });
  });
  return out;
}

}  // namespace
}  // namespace actuallysparse

TORCH_LIBRARY_FRAGMENT(actuallysparse_kernels, m) {
  m.def("dropout(Tensor x, float p, int seed) -> (Tensor, Tensor)");
  m.def("dropout_backward(Tensor grad, Tensor keep, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(actuallysparse_kernels, CPU, m) {
  m.impl("dropout", &actuallysparse::dropout);
  m.impl("dropout_backward", &actuallysparse::dropout_backward);
}
