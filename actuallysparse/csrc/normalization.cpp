// Training-mode batch normalisation of (N, C, H, W) CPU tensors: batch statistics, running
// statistics, normalised output (optionally through a relu in the same pass), and its gradients.
//
// torch 2.14's CPU batch norm on a contiguous NCHW float tensor took 0.66 ms forward and 0.42 ms
// backward for 64x16x32x32 on 2 threads, where one pass over those 4 MiB takes 0.04 ms: once a
// VGG11_bn's convolutions are sparse, its eight batch norms were a fifth of the training step.
// Here each channel is a parallel item (its N planes of H*W contiguous values); the forward reads
// it twice (the sums, then the output written as x * scale + shift) and the backward twice (the
// two sums of the output gradient, then the input gradient as a linear function of dy and x).
// Sums run in the input's type within a plane and in double across planes: a single pass of sum
// and sum of squares, shifted by the channel's first value so a large mean cannot cancel the
// variance away. A variant pools the output (2x2, stride 2) as it normalises, for the norm a
// max-pool follows (batch_norm_pool_train below).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "image_checks.h"
#include "pooling.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

namespace actuallysparse {
namespace {

void check_norm_input(const at::Tensor& x, const char* what) { check_image_batch(x, "batch norm", what); }

// A per-channel tensor (weight, bias, running statistics) of C entries in x's dtype, contiguous;
// undefined for none.
at::Tensor channel_vector(const c10::optional<at::Tensor>& t, int64_t channels, at::ScalarType dtype,
                          const char* what) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->numel() == channels && t->scalar_type() == dtype && t->is_contiguous(), what,
              " must be a contiguous (", channels, ",) tensor of ", dtype, ", got ", t->scalar_type(), " ",
              t->sizes());
  return *t;
}

// The loops are functions of their own: a pragma cannot sit inside AT_DISPATCH's macro argument.
// Sums of (p[i] - shift) and of its square over one plane of n values, added to sum and squares:
// within the plane in the input's type (vector lanes; a double accumulator made the loop twice
// as slow), across planes in double.
template <typename T>
inline void add_shifted_sums(const T* p, int64_t n, T shift, double& sum, double& squares) {
  T s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
  for (int64_t i = 0; i < n; ++i) {
    const T v = p[i] - shift;
    s += v;
    q += v * v;
  }
  sum += s;
  squares += q;
}

// Sums of g[i] and of g[i] * (p[i] - shift) over one plane, added to sum and dot (as above).
template <typename T>
inline void add_gradient_sums(const T* g, const T* p, int64_t n, T shift, double& sum, double& dot) {
  T s = 0, d = 0;
#pragma omp simd reduction(+ : s, d)
  for (int64_t i = 0; i < n; ++i) {
    s += g[i];
    d += g[i] * (p[i] - shift);
  }
  sum += s;
  dot += d;
}

// q[i] = p[i] * a + b
template <typename T>
inline void affine(const T* __restrict p, T* __restrict q, int64_t n, T a, T b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) q[i] = p[i] * a + b;
}

// q[i] = relu(p[i] * a + b), a NaN kept as torch's relu keeps it
template <typename T>
inline void affine_relu(const T* __restrict p, T* __restrict q, int64_t n, T a, T b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T v = p[i] * a + b;
    q[i] = v <= T(0) ? T(0) : v;
  }
}

// q[i] = g[i] * a + p[i] * b + c
template <typename T>
inline void affine2(const T* __restrict g, const T* __restrict p, T* __restrict q, int64_t n, T a, T b, T c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) q[i] = g[i] * a + p[i] * b + c;
}

// The output gradient through a fused relu: dy where the output y passed (y > 0 or NaN, as
// torch's threshold backward lets it through), else 0.
template <typename T>
inline T passed(T dy, T y) {
  return y <= T(0) ? T(0) : dy;
}

// sum and dot of add_gradient_sums over dy passed through the relu of output y
template <typename T>
inline void add_gradient_sums_relu(const T* g, const T* y, const T* p, int64_t n, T shift, double& sum,
                                   double& dot) {
  T s = 0, d = 0;
#pragma omp simd reduction(+ : s, d)
  for (int64_t i = 0; i < n; ++i) {
    const T gi = passed(g[i], y[i]);
    s += gi;
    d += gi * (p[i] - shift);
  }
  sum += s;
  dot += d;
}

// affine2 over dy passed through the relu of output y
template <typename T>
inline void affine2_relu(const T* __restrict g, const T* __restrict y, const T* __restrict p, T* __restrict q,
                         int64_t n, T a, T b, T c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) q[i] = passed(g[i], y[i]) * a + p[i] * b + c;
}

// What both forwards take and give besides their output: the checked per-channel weight, bias and
// running statistics (undefined for none), and the batch's mean and invstd.
struct NormStatistics {
  at::Tensor weight, bias, running_mean, running_var, mean, invstd;
  NormStatistics(const at::Tensor& x, const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& b,
                 const c10::optional<at::Tensor>& rm, const c10::optional<at::Tensor>& rv) {
    const int64_t channels = x.size(1);
    const auto dtype = x.scalar_type();
    weight = channel_vector(w, channels, dtype, "weight");
    bias = channel_vector(b, channels, dtype, "bias");
    running_mean = channel_vector(rm, channels, dtype, "running_mean");
    running_var = channel_vector(rv, channels, dtype, "running_var");
    mean = at::empty({channels}, x.options());
    invstd = at::empty({channels}, x.options());
  }

  // Channel c's batch statistics over the (batch, channels, plane) input src: writes its mean and
  // invstd, updates the running statistics (when given) with `momentum`, the variance unbiased, as
  // torch does, and returns the scale and shift of its normalised output, x * scale + shift.
  template <typename T>
  std::pair<T, T> normalise_channel(const T* src, int64_t batch, int64_t plane, int64_t c, double momentum,
                                    double eps) const {
    const int64_t channels = mean.numel(), count = batch * plane;
    const T shift = src[c * plane];
    double sum = 0, squares = 0;
    for (int64_t n = 0; n < batch; ++n) add_shifted_sums(src + (n * channels + c) * plane, plane, shift, sum, squares);
    const double centred = sum / count;
    const double var = std::max(0.0, squares / count - centred * centred);
    const double mu = double(shift) + centred;
    const double inv = 1.0 / std::sqrt(var + eps);
    mean.data_ptr<T>()[c] = T(mu);
    invstd.data_ptr<T>()[c] = T(inv);
    if (running_mean.defined()) {
      T& rm = running_mean.data_ptr<T>()[c];
      rm = T((1 - momentum) * double(rm) + momentum * mu);
    }
    if (running_var.defined()) {
      T& rv = running_var.data_ptr<T>()[c];
      rv = T((1 - momentum) * double(rv) + momentum * var * count / (count - 1));
    }
    const double scale = inv * (weight.defined() ? double(weight.data_ptr<T>()[c]) : 1.0);
    return {T(scale), T((bias.defined() ? double(bias.data_ptr<T>()[c]) : 0.0) - mu * scale)};
  }
};

// Channel-parallel work: channels are few (16 to 512) and each holds N * H * W values.
template <typename F>
void for_each_channel(int64_t channels, F&& body) {
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) body(c);
  });
}

template <typename T>
struct NormPointers {
  const T *weight, *mean, *invstd;
  T *input_grad, *weight_grad, *bias_grad;  // null where not needed
};

// What both backwards take and give: the checked per-channel weight (undefined for none), mean and
// invstd, and the three gradients, empty where not needed.
struct NormGradients {
  at::Tensor weight, mean, invstd, input_grad, weight_grad, bias_grad;
  bool need_input, need_weight, need_bias;
  NormGradients(const at::Tensor& x, const c10::optional<at::Tensor>& w, const at::Tensor& m, const at::Tensor& s,
                bool need_input, bool need_weight, bool need_bias)
      : need_input(need_input), need_weight(need_weight), need_bias(need_bias) {
    const int64_t channels = x.size(1);
    weight = channel_vector(w, channels, x.scalar_type(), "weight");
    mean = channel_vector(m, channels, x.scalar_type(), "mean");
    invstd = channel_vector(s, channels, x.scalar_type(), "invstd");
    TORCH_CHECK(mean.defined() && invstd.defined(), "the saved mean and invstd are needed");
    input_grad = at::empty(need_input ? x.sizes() : at::IntArrayRef{0}, x.options());
    weight_grad = at::empty({need_weight ? channels : 0}, x.options());
    bias_grad = at::empty({need_bias ? channels : 0}, x.options());
  }
  template <typename T>
  NormPointers<T> pointers() const {
    return {weight.defined() ? weight.data_ptr<T>() : nullptr, mean.data_ptr<T>(), invstd.data_ptr<T>(),
            need_input ? input_grad.data_ptr<T>() : nullptr, need_weight ? weight_grad.data_ptr<T>() : nullptr,
            need_bias ? bias_grad.data_ptr<T>() : nullptr};
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result() const { return {input_grad, weight_grad, bias_grad}; }
};

// Returns (y, mean, invstd) and updates running_mean and running_var in place (when given) with
// `momentum`, the variance unbiased, as torch does. With `relu`, y is the normalised output's
// relu, written in the same pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    double eps, bool relu) {
  check_norm_input(input, "input");
  const at::Tensor x = input.contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), plane = x.size(2) * x.size(3);
  const int64_t count = batch * plane;
  TORCH_CHECK(count > 1, "batch norm in training needs more than 1 value per channel, got input ", x.sizes());
  const auto dtype = x.scalar_type();
  const NormStatistics stats(x, weight, bias, running_mean, running_var);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(dtype, "actuallysparse_batch_norm_train", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    for_each_channel(channels, [&](int64_t c) {
      const auto [s, t] = stats.normalise_channel(src, batch, plane, c, momentum, eps);
      for (int64_t n = 0; n < batch; ++n) {
        const int64_t at = (n * channels + c) * plane;
        if (relu) {
          affine_relu(src + at, dst + at, plane, s, t);
        } else {
          affine(src + at, dst + at, plane, s, t);
        }
      }
    });
  });
  return {y, stats.mean, stats.invstd};
}

// Gradients of batch_norm_train's output with respect to the input, weight and bias, given the
// saved mean and invstd: with xhat = (x - mean) * invstd and M values per channel,
//   dbias = sum dy,  dweight = sum dy * xhat,
//   dx = weight * invstd * (dy - dbias / M - xhat * dweight / M).
// Empty tensors for gradients not asked for. With `relu_output` (the output of a fused relu),
// dy is first passed through that relu: zero where the output is not above 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool need_input, bool need_weight, bool need_bias,
    const c10::optional<at::Tensor>& relu_output) {
  check_norm_input(input, "input");
  check_norm_input(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == input.sizes() && grad_out.scalar_type() == input.scalar_type(),
              "grad_out must match the input's shape and dtype, got ", grad_out.sizes(), " and ", input.sizes());
  const bool relu = relu_output.has_value() && relu_output->defined();
  TORCH_CHECK(!relu || (relu_output->sizes() == input.sizes() && relu_output->scalar_type() == input.scalar_type()),
              "relu_output must match the input's shape and dtype, got ", relu_output->sizes(), " and ",
              input.sizes());
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor out = relu ? relu_output->contiguous() : at::Tensor();
  const int64_t batch = x.size(0), channels = x.size(1), plane = x.size(2) * x.size(3);
  const int64_t count = batch * plane;
  const auto dtype = x.scalar_type();
  const NormGradients grads(x, weight, mean, invstd, need_input, need_weight, need_bias);
  AT_DISPATCH_FLOATING_TYPES(dtype, "actuallysparse_batch_norm_train_backward", [&] {
    const scalar_t* x_data = x.data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.data_ptr<scalar_t>();
    const NormPointers<scalar_t> data = grads.pointers<scalar_t>();
    const scalar_t *w_data = data.weight, *mean_data = data.mean, *invstd_data = data.invstd;
    scalar_t *dx_data = data.input_grad, *dw_data = data.weight_grad, *db_data = data.bias_grad;
    const scalar_t* y_data = relu ? out.data_ptr<scalar_t>() : nullptr;
    for_each_channel(channels, [&](int64_t c) {
      const double mu = mean_data[c], inv = invstd_data[c];
      double sum = 0, dot = 0;  // sum dy and sum dy * (x - mean)
      for (int64_t n = 0; n < batch; ++n) {
        const int64_t at = (n * channels + c) * plane;
        if (relu) {
          add_gradient_sums_relu(dy_data + at, y_data + at, x_data + at, plane, mean_data[c], sum, dot);
        } else {
          add_gradient_sums(dy_data + at, x_data + at, plane, mean_data[c], sum, dot);
        }
      }
      if (db_data) db_data[c] = scalar_t(sum);
      if (dw_data) dw_data[c] = scalar_t(dot * inv);
      if (!dx_data) return;
      // dx = dy * k_dy + x * k_x + k_1
      const double k_dy = inv * (w_data ? double(w_data[c]) : 1.0);
      const double k_x = -k_dy * inv * inv * dot / count;
      const double k_1 = -k_dy * sum / count - mu * k_x;
      const scalar_t a = scalar_t(k_dy), bx = scalar_t(k_x), one = scalar_t(k_1);
      for (int64_t n = 0; n < batch; ++n) {
        const int64_t at = (n * channels + c) * plane;
        if (relu) {
          affine2_relu(dy_data + at, y_data + at, x_data + at, dx_data + at, plane, a, bx, one);
        } else {
          affine2(dy_data + at, x_data + at, dx_data + at, plane, a, bx, one);
        }
      }
    });
  });
  return grads.result();
}

// Planes [begin, end) of the pooled relu?(x * scale[c] + shift[c]), c each plane's channel: the
// pooling's walk over windows in chunks (pooling.h), each window's four inputs normalised in the
// chunk's arrays and its winner chosen as max_pool2x2 chooses. Chunks run across planes, so the
// 1 to 16 windows of a VGG's later planes fill them too; a window by window loop over each plane
// (branches on the maxima) took 6x as long.
template <typename T>
void normalise_and_pool_planes(const T* __restrict x, T* __restrict out, uint8_t* __restrict codes, int64_t begin,
                               int64_t end, int64_t channels, int64_t height, int64_t width, const T* scale,
                               const T* shift, bool relu) {
  alignas(64) T v[4][kPoolChunk], a[kPoolChunk], b[kPoolChunk];
  const int64_t plane = height * width;
  int64_t next = begin * plane;  // where the next plane starts
  int64_t c = -1;
  walk_windows(begin, end, height, width,
               [&](int64_t k, int64_t at) {
                 while (at >= next) {  // a window of the next plane: its channel's scale and shift
                   c = (next / plane) % channels;
                   next += plane;
                 }
                 a[k] = scale[c];
                 b[k] = shift[c];
                 v[0][k] = x[at];
                 v[1][k] = x[at + 1];
                 v[2][k] = x[at + width];
                 v[3][k] = x[at + width + 1];
               },
               [&](int64_t first, int64_t n) {
                 for (auto& row : v) {
#pragma omp simd
                   for (int64_t k = 0; k < n; ++k) {
                     const T u = row[k] * a[k] + b[k];
                     row[k] = relu && u <= T(0) ? T(0) : u;
                   }
                 }
                 choose_winners(v[0], v[1], v[2], v[3], n, out + first, codes + first);
               });
}

// Asks for the cache lines of the next plane of a channel (a plane apart by all the channels'
// planes): each window reads its winner alone, one element of four, too sparse a stream for the
// hardware's prefetcher. The passes that read whole planes (the statistics, the input gradient)
// gained nothing from it (AMD EPYC Zen 4, B=64, VGG11's five pooled blocks, interleaved in one
// process: forward 4.50 against 4.39 ms, backward 6.77 against 6.72).
template <typename T>
inline void prefetch_plane(const T* plane_start, int64_t plane) {
  const char* bytes = reinterpret_cast<const char*>(plane_start);
  for (int64_t at = 0; at < plane * int64_t(sizeof(T)); at += 64) __builtin_prefetch(bytes + at);
}

// Where window k's winner sits in the input: its top-left input `at` moved to the winning position.
inline int64_t winner_at(int64_t at, uint8_t code, int64_t width) { return at + (code >> 1) * width + (code & 1); }

// batch_norm_train whose output (through its relu with `relu`) is max-pooled in 2x2 windows of
// stride 2 as it is computed: returns the pooled output, each window's winner (as max_pool2x2
// gives them), mean and invstd, and never stores the normalised output itself. In a VGG block
// the pooling follows the norm's relu; apart, the norm wrote its full output, the pooling read
// it, the pooling's backward wrote a full gradient of which three quarters are zeros, and the
// norm's backward read that and the output again. Measured on an AVX-512 EPYC (2 threads, B=64,
// VGG11's five pooled blocks, each call alone and warm): norm, pooling and their two backwards
// took 11.2 ms apart and 9.7 fused (forward 4.0 -> 3.8, backward 7.2 -> 5.9); the pruned
// VGG11_bn's SGD step 91.2 -> 89.8 ms (fastest of 25 interleaved rounds; medians 101.4 -> 99.1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_pool_train(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    double eps, bool relu) {
  check_norm_input(input, "input");
  const at::Tensor x = input.contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t plane = height * width;
  TORCH_CHECK(batch * plane > 1, "batch norm in training needs more than 1 value per channel, got input ", x.sizes());
  TORCH_CHECK(height >= 2 && width >= 2, "pooling 2x2 windows needs planes of at least 2x2, got input ", x.sizes());
  const auto dtype = x.scalar_type();
  const NormStatistics stats(x, weight, bias, running_mean, running_var);
  at::Tensor out = at::empty({batch, channels, height / 2, width / 2}, x.options());
  at::Tensor where = at::empty(out.sizes(), x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(dtype, "actuallysparse_batch_norm_pool_train", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    uint8_t* codes = where.data_ptr<uint8_t>();
    // the statistics channel by channel, then the pooled output in memory order
    std::vector<scalar_t> scale(channels), shift(channels);
    for_each_channel(channels, [&](int64_t c) {
      std::tie(scale[c], shift[c]) = stats.normalise_channel(src, batch, plane, c, momentum, eps);
    });
    at::parallel_for(0, batch * channels, std::max<int64_t>(1, 32768 / plane), [&](int64_t begin, int64_t end) {
      normalise_and_pool_planes(src, dst, codes, begin, end, channels, height, width, scale.data(), shift.data(),
                                relu);
    });
  });
  return {out, where, stats.mean, stats.invstd};
}

// Gradients of batch_norm_pool_train, given the pooled output's gradient, the winners, the pooled
// output (which, with `relu`, says whether the winner passed its relu) and the saved statistics:
// batch_norm_train_backward's, with the output gradient zero but at the winners, computed from
// the pooled gradient without building the full one.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_pool_train_backward(
    const at::Tensor& grad_out, const at::Tensor& where, const at::Tensor& pooled, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& invstd, bool need_input,
    bool need_weight, bool need_bias, bool relu) {
  check_norm_input(input, "input");
  check_norm_input(grad_out, "grad_out");
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  const std::vector<int64_t> pooled_size{batch, channels, height / 2, width / 2};
  TORCH_CHECK(grad_out.sizes() == pooled_size && grad_out.scalar_type() == input.scalar_type() &&
              pooled.sizes() == pooled_size && pooled.scalar_type() == input.scalar_type() &&
              where.sizes() == pooled_size && where.scalar_type() == at::kByte,
              "grad_out, the pooled output and the winners must have the pooled shape ", at::IntArrayRef(pooled_size),
              " (the first two of the input's dtype, the winners uint8), got ", grad_out.sizes(), ", ",
              pooled.sizes(), " and ", where.sizes(), " ", where.scalar_type());
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor y = pooled.contiguous();
  const at::Tensor winners = where.contiguous();
  const int64_t plane = height * width, count = batch * plane;
  const auto dtype = x.scalar_type();
  const NormGradients grads(x, weight, mean, invstd, need_input, need_weight, need_bias);
  AT_DISPATCH_FLOATING_TYPES(dtype, "actuallysparse_batch_norm_pool_train_backward", [&] {
    const scalar_t* x_data = x.data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.data_ptr<scalar_t>();
    const scalar_t* y_data = y.data_ptr<scalar_t>();
    const uint8_t* codes = winners.data_ptr<uint8_t>();
    const NormPointers<scalar_t> data = grads.pointers<scalar_t>();
    const scalar_t *w_data = data.weight, *mean_data = data.mean, *invstd_data = data.invstd;
    scalar_t *dx_data = data.input_grad, *dw_data = data.weight_grad, *db_data = data.bias_grad;
    // the gradient reaching the winner of pooled output i
    auto reaching = [&](int64_t i) { return relu ? passed(dy_data[i], y_data[i]) : dy_data[i]; };
    const int64_t out_h = height / 2, out_w = width / 2, out_plane = out_h * out_w;
    for_each_channel(channels, [&](int64_t c) {
      const scalar_t shift = mean_data[c];
      // sum dy and sum dy * (x - mean) over the winners alone: each winner's gradient and input
      // gathered into chunks (across planes where they are small), summed a chunk at a time in
      // vector lanes (a sum per window was a chain of dependent additions)
      double sum = 0, dot = 0;
      alignas(64) scalar_t g[kPoolChunk], xw[kPoolChunk];
      int64_t k = 0;
      auto flush = [&] {
        add_gradient_sums(g, xw, k, shift, sum, dot);
        k = 0;
      };
      for (int64_t n = 0; n < batch; ++n) {
        const int64_t p = n * channels + c;
        const scalar_t* xp = x_data + p * plane;
        if (n + 1 < batch) prefetch_plane(xp + channels * plane, plane);
        for (int64_t y = 0; y < out_h; ++y)
          for (int64_t i = 0; i < out_w; ++i) {
            const int64_t o = p * out_plane + y * out_w + i;
            g[k] = reaching(o);
            xw[k] = xp[winner_at(2 * y * width + 2 * i, codes[o], width)];
            if (++k == kPoolChunk) flush();
          }
      }
      flush();
      const double inv = invstd_data[c];
      if (db_data) db_data[c] = scalar_t(sum);
      if (dw_data) dw_data[c] = scalar_t(dot * inv);
      if (!dx_data) return;
      // dx = dy * k_dy + x * k_x + k_1, as in batch_norm_train_backward: every input takes the
      // last two terms, the winners the first too
      const double k_dy = inv * (w_data ? double(w_data[c]) : 1.0);
      const double k_x = -k_dy * inv * inv * dot / count;
      const double k_1 = -k_dy * sum / count - double(shift) * k_x;
      const scalar_t a = scalar_t(k_dy), bx = scalar_t(k_x), one = scalar_t(k_1);
      for (int64_t n = 0; n < batch; ++n) {
        const int64_t p = n * channels + c;
        scalar_t* dxp = dx_data + p * plane;
        affine(x_data + p * plane, dxp, plane, bx, one);
        for (int64_t y = 0; y < out_h; ++y)
          for (int64_t i = 0; i < out_w; ++i) {
            const int64_t o = p * out_plane + y * out_w + i;
            dxp[winner_at(2 * y * width + 2 * i, codes[o], width)] += a * reaching(o);
          }
      }
    });
  });
  return grads.result();
}

}  // namespace
}  // namespace actuallysparse

TORCH_LIBRARY_FRAGMENT(actuallysparse_kernels, m) {
  m.def("batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float momentum, float eps, bool relu=False) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_train_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, "
        "bool need_input, bool need_weight, bool need_bias, Tensor? relu_output=None) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_pool_train(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float momentum, float eps, bool relu=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("batch_norm_pool_train_backward(Tensor grad_out, Tensor where, Tensor pooled, Tensor x, Tensor? weight, "
        "Tensor mean, Tensor invstd, bool need_input, bool need_weight, bool need_bias, bool relu=False) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(actuallysparse_kernels, CPU, m) {
  m.impl("batch_norm_train", &actuallysparse::batch_norm_train);
  m.impl("batch_norm_train_backward", &actuallysparse::batch_norm_train_backward);
  m.impl("batch_norm_pool_train", &actuallysparse::batch_norm_pool_train);
  m.impl("batch_norm_pool_train_backward", &actuallysparse::batch_norm_pool_train_backward);
}
