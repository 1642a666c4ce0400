// The activations side of the int8 matmul path (exact=False, few rows of x): each row of x is
// quantized per block of B values to int8 codes q = round(x / d), d = max|x| / 127, so that the
// weight codes multiply with integer instructions (AVX512-VNNI, AVX2 maddubs) as ggml's CPU
// backend does with Q8_K / Q8_0 activations.
#pragma once

#include "cpu/blockquant.h"  // first: it includes the intrinsics headers

#include <cmath>
#include <limits>

#if defined(__x86_64__)
#define TK_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#endif

namespace tinykern::cpu {

// Rows of x quantized for a block format with `block` values per block (a multiple of 32).
struct Int8Rows {
  int64_t kp;                // nb * block: the row stride of q, in bytes
  int64_t nb;                // blocks per row
  std::vector<int8_t> q;     // [m, kp] codes, |q| <= 127 (the byte products must not overflow int16 pairs)
  std::vector<float> d;      // [m, nb] block scales; NaN or inf where the block holds a NaN or inf
  std::vector<float> sum32;  // [m, kp / 32] d * (sum of the codes) per 32 values (only if asked for)
};

// Places the 32-byte groups of a quantized block: dst group order[g] gets source group g. The
// kernels read the groups in the order their weight registers hold the sub-blocks.
inline void place_groups(const int8_t* src, int groups, const int* order, int8_t* dst) {
  for (int g = 0; g < groups; ++g) std::memcpy(dst + 32 * order[g], src + 32 * g, 32);
}

// Codes of `count` values with the inverse scale id. x * id is rounded to nearest even, as
// nearbyint does under the default rounding mode, so the scalar and AVX2 code agree.
inline void round_codes_scalar(const float* x, int count, float id, int8_t* q) {
  for (int l = 0; l < count; ++l) q[l] = static_cast<int8_t>(std::nearbyint(x[l] * id));
}

inline float amax_scalar(const float* x, int count) {
  float a = 0.f;
  for (int l = 0; l < count; ++l) a = std::max(a, std::fabs(x[l]));
  // A NaN anywhere makes the block's scale NaN, so the whole output row is non-finite.
  for (int l = 0; l < count; ++l) {
    if (std::isnan(x[l])) return std::numeric_limits<float>::quiet_NaN();
  }
  return a;
}

#if defined(__x86_64__)
// max |x| over count (a multiple of 8) values; NaN if any is NaN.
TK_AVX2 inline float amax_avx2(const float* x, int count) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 a = _mm256_setzero_ps();
  __m256 nan = _mm256_setzero_ps();
  for (int l = 0; l < count; l += 8) {
    const __m256 v = _mm256_loadu_ps(x + l);
    a = _mm256_max_ps(a, _mm256_and_ps(v, abs_mask));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan) != 0) return std::numeric_limits<float>::quiet_NaN();
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Codes of count (a multiple of 32) values; cvtps rounds to nearest even like nearbyint.
TK_AVX2 inline void round_codes_avx2(const float* x, int count, float id, int8_t* q) {
  const __m256 s = _mm256_set1_ps(id);
  for (int l = 0; l < count; l += 32) {
    __m256i i[4];
    for (int t = 0; t < 4; ++t) i[t] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + l + 8 * t), s));
    // packs interleaves the 128-bit halves; the permute puts the 32 codes back in order.
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + l),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
}
#endif

// Quantizes the m rows of x [m, k] (row stride k, fp32) in blocks of `block` values, zero-padded
// past k; `order` (block / 32 entries, or null for the natural order) places each block's
// 32-value groups; with_sums also keeps the sums of the quantized x per 32 (natural order).
inline Int8Rows quantize_rows_int8(const float* x, int64_t m, int64_t k, int64_t block, int64_t nb,
                                   const int* order, bool with_sums) {
  Int8Rows r;
  r.nb = nb;
  r.kp = nb * block;
  r.q.resize(m * r.kp);
  r.d.resize(m * nb);
  if (with_sums) r.sum32.resize(m * (r.kp / 32));
  const int groups = static_cast<int>(block / 32);
#if defined(__x86_64__)
  const bool simd = has_avx2_fma();
#endif
  alignas(64) float pad[256];
  alignas(64) int8_t codes[256];
  for (int64_t row = 0; row < m; ++row) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * block;
      const float* src = x + row * k + k0;
      if (k0 + block > k) {
        std::fill(pad, pad + block, 0.f);
        std::copy(src, src + (k - k0), pad);
        src = pad;
      }
      float a;
#if defined(__x86_64__)
      a = simd ? amax_avx2(src, static_cast<int>(block)) : amax_scalar(src, static_cast<int>(block));
#else
      a = amax_scalar(src, static_cast<int>(block));
#endif
      // An infinity gives d = inf and codes 0, whose product inf * 0 is NaN: the row stays
      // non-finite, as the fp32 path leaves it.
      const float d = a / 127.f;
      // 127 / a rather than 1 / d: the inverse scale ggml's Q8_K and Q8_0 quantizers use.
      const float id = d > 0.f && std::isfinite(d) ? 127.f / a : 0.f;
      r.d[row * nb + b] = d;
      int8_t* dst = order != nullptr ? codes : r.q.data() + row * r.kp + k0;
#if defined(__x86_64__)
      if (simd) {
        round_codes_avx2(src, static_cast<int>(block), id, dst);
      } else {
        round_codes_scalar(src, static_cast<int>(block), id, dst);
      }
#else
      round_codes_scalar(src, static_cast<int>(block), id, dst);
#endif
      if (order != nullptr) place_groups(codes, groups, order, r.q.data() + row * r.kp + k0);
      if (with_sums) {
        // Sums of the codes, not of x: then the offset term meets the same rounded x as the
        // code term, and x's rounding error multiplies the weight itself rather than its
        // unsigned part (which for Q4_K is offset by the sub-block min).
        for (int g = 0; g < groups; ++g) {
          int32_t s = 0;
          for (int l = 0; l < 32; ++l) s += dst[32 * g + l];
          r.sum32[row * (r.kp / 32) + b * groups + g] = d * static_cast<float>(s);
        }
      }
    }
  }
  return r;
}

// Weight rows per task of the int8 matmuls: ~128 KB of weights (L2), swept once per group of
// four x rows so that the group's codes stay in L1 while the tile streams from L2; smaller
// where that leaves fewer than four tasks per thread.
inline int64_t int8_tile_rows(int64_t n, int64_t row_bytes) {
  const int64_t by_cache = std::max<int64_t>(1, (128 << 10) / row_bytes);
  const int64_t by_threads = std::max<int64_t>(8, n / (4 * at::get_num_threads()));
  return std::min(by_cache, by_threads);
}

}  // namespace tinykern::cpu
