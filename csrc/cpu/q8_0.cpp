// Q8_0 on CPU: blocks of an fp16 scale d and 32 int8 codes, w = float(d) * q (the product is
// exact, so any evaluation order is bit-identical to the formats module). Same structure as
// q4k.cpp: decode on the fly for small M, BLAS on dequantized tiles for large M.
#include "cpu/blockquant.h"  // first: it includes the intrinsics headers
#include "cpu/int8_dot.h"

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

// The int8 path (exact=False): x quantized per 32 values (int8_dot.h), int8 x int8 block dots
// in int32, then fp32 d * dx * isum per block. Relative Frobenius error against float64 on
// N(0, 1) x and Q8_0 weights: 5.4e-3 at 4096x4096, on every SIMD path; ggml's Q8_0 activations
// round x the same way but keep d in fp16, which adds a little (tests/test_cpu_int8.py).
using Int8Dot = void (*)(const uint8_t* row, int64_t nb, const int8_t* xq, const float* xd, const int32_t* corr,
                         int64_t ldq, int64_t ldd, float* out, int64_t ldo);

template <int R>
void q8_int8_dot_scalar(const uint8_t* row, int64_t nb, const int8_t* xq, const float* xd, const int32_t*, int64_t ldq,
                        int64_t ldd, float* out, int64_t ldo) {
  float acc[R] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 34;
    const float d = half_at(blk);
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    for (int r = 0; r < R; ++r) {
      const int8_t* x = xq + r * ldq + b * 32;
      int32_t s = 0;
      for (int l = 0; l < 32; ++l) s += q[l] * x[l];
      acc[r] += static_cast<float>(s) * (d * xd[r * ldd + b]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = acc[r];
}

#if defined(__x86_64__)
// maddubs takes an unsigned operand: |w| times x with w's sign (|-128| = 128 still fits as an
// unsigned byte, and the pair sums stay within int16 since |x| <= 127).
template <int R>
TK_AVX2 void q8_int8_dot_avx2(const uint8_t* row, int64_t nb, const int8_t* xq, const float* xd, const int32_t*,
                              int64_t ldq, int64_t ldd, float* out, int64_t ldo) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 34;
    // The weights stream from memory: 6 KB ahead keeps more misses in flight (as in q4k.cpp).
    _mm_prefetch(reinterpret_cast<const char*>(blk) + 6144, _MM_HINT_T0);
    const float d = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(blk));
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    const __m256i aw = _mm256_sign_epi8(wv, wv);
    for (int r = 0; r < R; ++r) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * ldq + b * 32));
      const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, wv)), ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * xd[r * ldd + b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(acc[r]);
}

// vpdpbusd takes an unsigned operand: w + 128 (the sign bit flipped) times x, the surplus
// 128 * (x's four bytes of each lane) taken off by starting the lane at corr.
template <int R>
TK_VNNI void q8_int8_dot_vnni(const uint8_t* row, int64_t nb, const int8_t* xq, const float* xd, const int32_t* corr,
                              int64_t ldq, int64_t ldd, float* out, int64_t ldo) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 34;
    // The weights stream from memory: 6 KB ahead keeps more misses in flight (as in q4k.cpp).
    _mm_prefetch(reinterpret_cast<const char*>(blk) + 6144, _MM_HINT_T0);
    const float d = _cvtsh_ss(*reinterpret_cast<const uint16_t*>(blk));
    const __m256i wu = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2)), flip);
    for (int r = 0; r < R; ++r) {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + (r * ldq + b * 32) / 4));
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * ldq + b * 32));
      const __m256i s = _mm256_dpbusd_epi32(c, wu, x);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * xd[r * ldd + b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(acc[r]);
}

const Int8Dot kInt8DotAvx2[4] = {q8_int8_dot_avx2<1>, q8_int8_dot_avx2<2>, q8_int8_dot_avx2<3>, q8_int8_dot_avx2<4>};
const Int8Dot kInt8DotVnni[4] = {q8_int8_dot_vnni<1>, q8_int8_dot_vnni<2>, q8_int8_dot_vnni<3>, q8_int8_dot_vnni<4>};
#endif

const Int8Dot kInt8DotScalar[4] = {q8_int8_dot_scalar<1>, q8_int8_dot_scalar<2>, q8_int8_dot_scalar<3>,
                                   q8_int8_dot_scalar<4>};

// Rows of x four at a time, so each loaded weight block serves up to four rows.
void q8_gemv_int8(const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n, int64_t nb, float* out) {
  const Int8Dot* kernels = kInt8DotScalar;
  bool vnni = false;
#if defined(__x86_64__)
  vnni = has_avx512_vnni();
  if (vnni) {
    kernels = kInt8DotVnni;
  } else if (has_avx2_fma()) {
    kernels = kInt8DotAvx2;
  }
#endif
  const Int8Rows xr = quantize_rows_int8(x, m, k, 32, nb, nullptr, false);
  std::vector<int32_t> corr;
  if (vnni) {
    corr.resize(xr.q.size() / 4);
    for (size_t l = 0; l < corr.size(); ++l) {
      const int8_t* q = xr.q.data() + 4 * l;
      corr[l] = -128 * (q[0] + q[1] + q[2] + q[3]);
    }
  }
  const int64_t tile = int8_tile_rows(n, nb * 34);
  at::parallel_for(0, ceil_div(n, tile), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t j0 = t0 * tile; j0 < std::min(n, t1 * tile); j0 += tile) {
      for (int64_t r = 0; r < m; r += 4) {
        for (int64_t j = j0; j < std::min(n, j0 + tile); ++j) {
          kernels[std::min<int64_t>(4, m - r) - 1](w + j * nb * 34, nb, xr.q.data() + r * xr.kp, xr.d.data() + r * nb,
                                                   corr.data() + (vnni ? r * xr.kp / 4 : 0), xr.kp, nb, out + r * n + j, n);
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
  // The int8 path (exact=False, see q8_gemv_int8) below this many rows: with SIMD it beats the
  // BLAS tiles up to 127 rows at 4096x4096 (2.5x with VNNI, 1.6x with AVX2 at 127 for Q4_K,
  // 1.3x / 1.2x for Q8_0); the scalar code only below kTileMinRows.
  static int64_t int8_max_rows() { return has_avx2_fma() ? 128 : kTileMinRows; }

  static void gemv_int8(const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n, int64_t nb, float* out) {
    q8_gemv_int8(x, m, k, w, n, nb, out);
  }

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
