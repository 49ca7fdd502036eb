// 2x2, stride-2 max pooling (pooling.cpp), for the convolution that pools its output where it
// cannot pool as it writes (see conv2d in bindings.cpp), and its walk over windows and choice of
// each window's winner, which the batch norm that pools its output (normalization.cpp) shares.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace actuallysparse {

// Outputs handled together: the walk over windows copies their four inputs into four small
// arrays, and the choice runs over those arrays as plain vector selects. Rows of VGG's later
// blocks are 2 to 8 outputs long, too short for a loop over a row to vectorise: written per row
// with branches, the pooling took 11 ns an output (the branches mispredict on activations),
// against under 1 ns this way.
constexpr int64_t kPoolChunk = 64;

// Calls visit(k, top_left_offset) for the windows of planes [begin, end) of an (H, W) stack in
// output order, k counting within chunks of kPoolChunk, and flush(first_output, count) after each
// chunk; a plane's last row and column that no window covers are skipped.
template <typename Visit, typename Flush>
inline void walk_windows(int64_t begin, int64_t end, int64_t height, int64_t width, Visit&& visit, Flush&& flush) {
  const int64_t out_h = height / 2, out_w = width / 2;
  int64_t k = 0, first = begin * out_h * out_w;
  for (int64_t plane = begin; plane < end; ++plane)
    for (int64_t y = 0; y < out_h; ++y) {
      const int64_t row = (plane * height + 2 * y) * width;
      for (int64_t x = 0; x < out_w; ++x) {
        visit(k, row + 2 * x);
        if (++k == kPoolChunk) {
          flush(first, k);
          first += k;
          k = 0;
        }
      }
    }
  if (k) flush(first, k);
}

// max_pool2d's rule for a window's positions taken in row-major order: a later one wins when
// greater than the best so far, or when it is NaN (so the first of equal maxima, and the last NaN).
template <typename T>
inline bool beats(T candidate, T best) {
  return (candidate > best) | (candidate != candidate);
}

// The maximum of one window's four inputs (row-major), by that rule.
template <typename T>
inline T window_max(T a, T b, T c, T d) {
  T m = beats(b, a) ? b : a;
  m = beats(c, m) ? c : m;
  return beats(d, m) ? d : m;
}

// The maxima of n windows whose four inputs are a[k] .. d[k] (row-major), and which position won.
template <typename T>
inline void choose_winners(const T* a, const T* b, const T* c, const T* d, int64_t n, T* __restrict out,
                           uint8_t* __restrict codes) {
  for (int64_t k = 0; k < n; ++k) {
    T m = a[k];
    uint8_t at = 0;
    const bool wins_b = beats(b[k], m);
    m = wins_b ? b[k] : m;
    at = wins_b ? 1 : at;
    const bool wins_c = beats(c[k], m);
    m = wins_c ? c[k] : m;
    at = wins_c ? 2 : at;
    const bool wins_d = beats(d[k], m);
    out[k] = wins_d ? d[k] : m;
    codes[k] = wins_d ? 3 : at;
  }
}

// The pooled output of a CPU (batch, channels, height, width) tensor and each window's winner
// (uint8, row-major: 0 top-left .. 3 bottom-right), or without `winners` an empty tensor in its place.
std::tuple<at::Tensor, at::Tensor> max_pool2x2(const at::Tensor& input, bool winners = true);

}  // namespace actuallysparse
