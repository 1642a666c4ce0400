// Q8_0 on CPU: blocks of an fp16 scale d and 32 int8 codes, w = float(d) * q (the product is
// exact, so any evaluation order is bit-identical to the formats module). Same structure as
// q4k.cpp: decode on the fly for small M, BLAS on dequantized tiles for large M.
#include "cpu/blockquant.h"  // first: it includes the intrinsics headers

#include <torch/library.h>

namespace tinykern::cpu {
namespace {

template <typename T>
void dequant_block_scalar(const uint8_t* blk, T* out) {
  const float d = half_at(blk);
  const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
  for (int l = 0; l < 32; ++l) out[l] = static_cast<T>(d * static_cast<float>(q[l]));
}

#if defined(__x86_64__)
// Eight int8 codes -> eight floats.
TK_AVX2 inline __m256 s8x8_to_ps(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <typename T>
TK_AVX2 void dequant_block_avx2(const uint8_t* blk, T* out) {
  const __m256 d = _mm256_set1_ps(half_at(blk));
  for (int i = 0; i < 4; ++i) store8(out + 8 * i, _mm256_mul_ps(d, s8x8_to_ps(blk + 2 + 8 * i)));
}

// out[r * ldo] = x_r . dequant(row) for R rows of x (fp32, row stride ldx).
template <int R>
TK_AVX2 void row_dot_avx2(const uint8_t* row, int64_t nb, const float* x, int64_t ldx, float* out, int64_t ldo) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 34;
    __m256 s[R];
    for (int r = 0; r < R; ++r) s[r] = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      const __m256 q = s8x8_to_ps(blk + 2 + 8 * i);
      for (int r = 0; r < R; ++r) s[r] = _mm256_fmadd_ps(q, _mm256_loadu_ps(x + r * ldx + b * 32 + 8 * i), s[r]);
    }
    const __m256 d = _mm256_set1_ps(half_at(blk));
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(s[r], d, acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(acc[r]);
}

using RowDot = void (*)(const uint8_t*, int64_t, const float*, int64_t, float*, int64_t);
const RowDot kRowDot[4] = {row_dot_avx2<1>, row_dot_avx2<2>, row_dot_avx2<3>, row_dot_avx2<4>};
#endif

#if defined(__x86_64__)
// Rows of x four at a time, so each decoded code serves up to four FMAs.
void gemv_avx2(const float* x32, int64_t m, const uint8_t* w, int64_t n, int64_t nb, float* out) {
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t j = n0; j < n1; ++j) {
      for (int64_t r = 0; r < m; r += 4) {
        kRowDot[std::min<int64_t>(4, m - r) - 1](w + j * nb * 34, nb, x32 + r * nb * 32, nb * 32, out + r * n + j, n);
      }
    }
  });
}
#endif

void gemv_scalar(const float* x32, int64_t m, const uint8_t* w, int64_t n, int64_t nb, float* out) {
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    float dense[32];
    for (int64_t j = n0; j < n1; ++j) {
      for (int64_t r = 0; r < m; ++r) out[r * n + j] = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        dequant_block_scalar(w + (j * nb + b) * 34, dense);
        for (int64_t r = 0; r < m; ++r) {
          float s = 0.f;
          for (int l = 0; l < 32; ++l) s += x32[r * nb * 32 + b * 32 + l] * dense[l];
          out[r * n + j] += s;
        }
      }
    }
  });
}

struct Q8_0 {
  static constexpr int64_t kBlock = 32;
  static constexpr int64_t kBlockBytes = 34;
  // Measured as for Q4_K: ~0.85 ms per row of x at 4096x4096 against ~11.5 ms for the tiles.
  static constexpr int64_t kTileMinRows = 14;

  template <typename T>
  static void dequant_block(const uint8_t* blk, T* out, bool simd) {
#if defined(__x86_64__)
    if (simd) return dequant_block_avx2(blk, out);
#endif
    dequant_block_scalar(blk, out);
  }

  static void gemv(const float* x32, int64_t m, const uint8_t* w, int64_t n, int64_t nb, float* out) {
#if defined(__x86_64__)
    if (has_avx2_fma()) return gemv_avx2(x32, m, w, n, nb, out);
#endif
    gemv_scalar(x32, m, w, n, nb, out);
  }
};

at::Tensor q8_0_dequantize(const at::Tensor& blocks, at::ScalarType dtype) {
  return block_dequantize<Q8_0>("q8_0_dequantize", blocks, dtype);
}

at::Tensor q8_0_matmul(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool exact) {
  return block_matmul<Q8_0>("q8_0_matmul", x, w, bias, exact);
}

}  // namespace

at::Tensor q8_0_dequantize_as(const char* op, const at::Tensor& blocks, at::ScalarType dtype) {
  return block_dequantize<Q8_0>(op, blocks, dtype);
}

at::Tensor q8_0_matmul_as(const char* op, const at::Tensor& x, const at::Tensor& w,
                          const c10::optional<at::Tensor>& bias, bool exact) {
  return block_matmul<Q8_0>(op, x, w, bias, exact);
}

TORCH_LIBRARY_IMPL(tinykern, CPU, m) {
  m.impl("q8_0_dequantize", &q8_0_dequantize);
  m.impl("q8_0_matmul", &q8_0_matmul);
}

}  // namespace tinykern::cpu
