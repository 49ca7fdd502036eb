// Packing by 8x8 (float) and 4x4 (double) register transposes: the rows of eight (four) images
// are loaded side by side and written as the tile's rows, where the plain loop writes one
// element at a time at the tile's stride. Included by the AVX2 and AVX-512 files, under their
// target pragmas (both have AVX2's 256-bit shuffles). Eight images at once, not sixteen: the
// images of a batch are often a power of two apart (64 KiB in VGG11's 16x16 layer), so their
// rows share an L1 set, and sixteen of them outnumber its ways. Floats take 4x4 squares for a
// row's last four elements (VGG11's 4x4 layers have rows of four). Measured on one thread with
// layers at 0.999, where packing is nearly the whole call (AVX-512 EPYC, B=64): 64->128 @16x16
// 0.49 -> 0.24-0.28 ms, 128->256 @8x8 0.26 -> 0.17 ms against the plain loop.
// Internal linkage throughout: each file compiles its own copy for its own instruction set, and
// the linker must not fold the AVX-512 file's into the AVX2 path.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include "kernels_impl.h"

namespace actuallysparse {
namespace impl {
namespace {

inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

inline void transpose4d(__m256d r[4]) {
  const __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
  const __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
  r[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
  r[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
  r[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
  r[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
}

inline void transpose4f(__m128 r[4]) { _MM_TRANSPOSE4_PS(r[0], r[1], r[2], r[3]); }

// S x S squares: S images' rows from element i, written as S tile rows of S images from image j.
template <typename T, int S, typename R, typename Load, typename Transpose, typename Store>
inline void pack_square(const T* rows, int64_t image_stride, int64_t i, T* dst, int64_t j, int64_t tw, Load load,
                        Transpose transpose, Store store) {
  R r[S];
  for (int k = 0; k < S; ++k) r[k] = load(rows + k * image_stride + i);
  transpose(r);
  for (int k = 0; k < S; ++k) store(dst + (i + k) * tw + j, r[k]);
}

// Groups of S images: squares of S elements along their rows, then the last elements of a row
// (fewer than S) by `half` (squares of half the size, or nothing) and the plain loop; images past
// the last whole group take the plain loop.
template <typename T, int S, typename R, typename Load, typename Transpose, typename Store, typename Half>
inline void pack_rows_transposed(const T* src, int64_t image_stride, int64_t n, int64_t images, T* dst, int64_t tw,
                                 Load load, Transpose transpose, Store store, Half half) {
  int64_t j = 0;
  for (; j + S <= images; j += S) {
    const T* rows = src + j * image_stride;
    int64_t i = 0;
    for (; i + S <= n; i += S) pack_square<T, S, R>(rows, image_stride, i, dst, j, tw, load, transpose, store);
    i = half(rows, image_stride, i, n, dst, j, tw);
    if (i < n) pack_rows_scalar(rows + i, image_stride, int64_t{1}, n - i, S, dst + i * tw + j, tw);
  }
  if (j < images) pack_rows_scalar(src + j * image_stride, image_stride, int64_t{1}, n, images - j, dst + j, tw);
}

// Rows whose elements are not contiguous (step > 1) take the plain loop.
inline void pack_rows_avx2(const float* src, int64_t image_stride, int64_t step, int64_t n, int64_t images,
                           float* dst, int64_t tw) {
  if (step != 1) return pack_rows_scalar(src, image_stride, step, n, images, dst, tw);
  const auto half = [](const float* rows, int64_t image_stride, int64_t i, int64_t n, float* dst, int64_t j,
                       int64_t tw) {
    if (i + 4 > n) return i;
    for (int64_t first = 0; first < 8; first += 4)
      pack_square<float, 4, __m128>(
          rows + first * image_stride, image_stride, i, dst, j + first, tw,
          [](const float* p) { return _mm_loadu_ps(p); }, transpose4f, [](float* p, __m128 v) { _mm_storeu_ps(p, v); });
    return i + 4;
  };
  pack_rows_transposed<float, 8, __m256>(
      src, image_stride, n, images, dst, tw, [](const float* p) { return _mm256_loadu_ps(p); }, transpose8,
      [](float* p, __m256 v) { _mm256_storeu_ps(p, v); }, half);
}

inline void pack_rows_avx2(const double* src, int64_t image_stride, int64_t step, int64_t n, int64_t images,
                           double* dst, int64_t tw) {
  if (step != 1) return pack_rows_scalar(src, image_stride, step, n, images, dst, tw);
  pack_rows_transposed<double, 4, __m256d>(
      src, image_stride, n, images, dst, tw, [](const double* p) { return _mm256_loadu_pd(p); }, transpose4d,
      [](double* p, __m256d v) { _mm256_storeu_pd(p, v); },
      [](const double*, int64_t, int64_t i, int64_t, double*, int64_t, int64_t) { return i; });
}

}  // namespace
}  // namespace impl
}  // namespace actuallysparse
