// Q4_K on CPU: dequantize, and a matmul that decodes the 4-bit codes on the fly for small M and
// feeds L2-sized tiles of dequantized rows to the BLAS for large M. Layout:
// docs/formats.md.
#include "cpu/blockquant.h"  // first: it includes the intrinsics headers
#include "cpu/int8_dot.h"

#include <torch/library.h>

#include <cmath>
#include <vector>

namespace tinykern::cpu {
namespace {

// The eight 6-bit scales and mins of a block from its 12 packed bytes, four per 32-bit word:
// bytes 0-3 hold sc0..3 in their low 6 bits and the top bits of sc4..7 in bits 6-7, bytes 4-7
// the same for the mins, bytes 8-11 the low nibbles of sc4..7 (low half) and m4..7 (high half).
inline void unpack_scales(const uint8_t* s, uint8_t sc[8], uint8_t m[8]) {
  uint32_t a[3];
  std::memcpy(a, s, 12);
  const uint32_t scw[2] = {a[0] & 0x3F3F3F3Fu, (a[2] & 0x0F0F0F0Fu) | ((a[0] >> 2) & 0x30303030u)};
  const uint32_t mw[2] = {a[1] & 0x3F3F3F3Fu, ((a[2] >> 4) & 0x0F0F0F0Fu) | ((a[1] >> 2) & 0x30303030u)};
  std::memcpy(sc, scw, 8);
  std::memcpy(m, mw, 8);
}

#if defined(__x86_64__)
// d * sc_j and dmin * m_j of the eight sub-blocks, from the block's first 16 bytes: the same
// word arithmetic as unpack_scales on 32-bit lanes [d|dmin, a0, a1, a2].
TK_AVX2 inline void block_scales_avx2(const uint8_t* blk, __m256* scale, __m256* offset) {
  const __m128i hdr = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
  const __m128i words = _mm_srlv_epi32(_mm_shuffle_epi32(hdr, _MM_SHUFFLE(3, 3, 2, 1)), _mm_setr_epi32(0, 0, 0, 4));
  const __m128i low = _mm_and_si128(words, _mm_setr_epi32(0x3F3F3F3F, 0x3F3F3F3F, 0x0F0F0F0F, 0x0F0F0F0F));
  const __m128i top = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(hdr, _MM_SHUFFLE(2, 1, 2, 1)), 2),
                                    _mm_setr_epi32(0, 0, 0x30303030, 0x30303030));
  // [sc0..3, m0..3, sc4..7, m4..7] -> [sc0..7, m0..7]
  const __m128i sm =
      _mm_shuffle_epi8(_mm_or_si128(low, top), _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15));
  const __m128 dd = _mm_cvtph_ps(hdr);  // lanes 0, 1: d, dmin
  *scale = _mm256_mul_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)));
  *offset = _mm256_mul_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dd)),
                          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))));
}
#endif

// w = (float(d) * sc) * q - float(dmin) * m in fp32, in this order, to be bit-identical with the
// formats module and gguf. The products are exact (11 + 6 + 4 significant bits), so only the
// subtraction rounds; contraction is kept off all the same, as the format doc prescribes.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

template <typename T>
void dequant_block_scalar(const uint8_t* blk, T* out) {
  const float d = half_at(blk), dmin = half_at(blk + 2);
  uint8_t sc[8], m[8];
  unpack_scales(blk + 4, sc, m);
  for (int j = 0; j < 8; ++j) {
    const float scale = d * static_cast<float>(sc[j]);
    const float offset = dmin * static_cast<float>(m[j]);
    // Sub-block j lives in the low (j even) or high (j odd) nibbles of bytes 32*(j/2)...
    const uint8_t* q = blk + 16 + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) {
      const float v = scale * static_cast<float>((q[l] >> shift) & 15);
      out[32 * j + l] = static_cast<T>(v - offset);
    }
  }
}

#if defined(__x86_64__)
template <typename T>
TK_AVX2 void dequant_block_avx2(const uint8_t* blk, T* out) {
  __m256 scale_v, offset_v;
  block_scales_avx2(blk, &scale_v, &offset_v);
  alignas(32) float scale[8], offset[8];
  _mm256_store_ps(scale, scale_v);
  _mm256_store_ps(offset, offset_v);
  const __m256i low4 = _mm256_set1_epi32(15);
  for (int c = 0; c < 4; ++c) {
    const __m256 s_lo = _mm256_set1_ps(scale[2 * c]), s_hi = _mm256_set1_ps(scale[2 * c + 1]);
    const __m256 o_lo = _mm256_set1_ps(offset[2 * c]), o_hi = _mm256_set1_ps(offset[2 * c + 1]);
    for (int i = 0; i < 4; ++i) {
      const uint8_t* q = blk + 16 + 32 * c + 8 * i;
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
      const __m256 q_lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, low4));
      const __m256 q_hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
      store8(out + 64 * c + 8 * i, _mm256_sub_ps(_mm256_mul_ps(s_lo, q_lo), o_lo));
      store8(out + 64 * c + 32 + 8 * i, _mm256_sub_ps(_mm256_mul_ps(s_hi, q_hi), o_hi));
    }
  }
}
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

#if defined(__x86_64__)
// The GEMV kernels take x pre-permuted and pre-scaled (permute_x) and the per-32 sums of x.
// A code register holds G chunks of 32 bytes (G = 1 for AVX2, 2 for AVX-512); its 32-bit lane j
// of chunk g holds bytes 4j..4j+3. Masking nibble p = 2i+h of a lane in place gives q * 2^(4p)
// exactly, the code of weight 4j+i of sub-block 2c+h, so the inner loop is mask, convert, FMA,
// without shifts or shuffles; x[4j+i] is stored pre-scaled by 2^-(4p) so each product is exactly
// q*x. The top nibble is shifted down instead (masked in place it reads as a negative int32).
// The mins enter once per block through the sums of x: sum x*(s*q - o) = s*sum(x*q) - o*sum(x).
using RowDot = void (*)(const uint8_t* row, int64_t nb, const float* xp, const float* xsum, int64_t ldx,
                        int64_t ldsum, float* out, int64_t ldo);

// Within each 64*G values: xp[64G*t + 8G*(4h + i) + 8g + j] = x[64G*t + 64g + 32h + 4j + i]
// times 2^-(8i + 4h), or 2^0 for the top nibble (i = 3, h = 1).
template <int G>
void permute_x(const float* x, int64_t count, float* xp) {
  for (int64_t t = 0; t < count; t += 64 * G) {
    for (int g = 0; g < G; ++g) {
      for (int h = 0; h < 2; ++h) {
        for (int i = 0; i < 4; ++i) {
          const float scale = (i == 3 && h == 1) ? 1.f : std::ldexp(1.f, -(8 * i + 4 * h));
          for (int j = 0; j < 8; ++j) {
            xp[t + 8 * G * (4 * h + i) + 8 * g + j] = x[t + 64 * g + 32 * h + 4 * j + i] * scale;
          }
        }
      }
    }
  }
}

// out[r * ldo] = x_r . dequant(row) for R rows of x, 8 lanes.
template <int R>
TK_AVX2 void q4k_row_dot_avx2(const uint8_t* row, int64_t nb, const float* xp, const float* xsum, int64_t ldx,
                              int64_t ldsum, float* out, int64_t ldo) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 144;
    const float* xb = xp + b * 256;
    __m256 scale_v, offset;
    block_scales_avx2(blk, &scale_v, &offset);
    alignas(32) float scale[8];
    _mm256_store_ps(scale, scale_v);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fnmadd_ps(offset, _mm256_loadu_ps(xsum + r * ldsum + b * 8), acc[r]);
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * c));
      __m256 s_lo[R], s_hi[R];
      for (int r = 0; r < R; ++r) s_lo[r] = s_hi[r] = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        const __m256 q_lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15 << (8 * i))));
        const __m256 q_hi = _mm256_cvtepi32_ps(
            i == 3 ? _mm256_srli_epi32(v, 28) : _mm256_and_si256(v, _mm256_set1_epi32(15 << (8 * i + 4))));
        for (int r = 0; r < R; ++r) {
          const float* x = xb + r * ldx + 64 * c + 8 * i;
          s_lo[r] = _mm256_fmadd_ps(q_lo, _mm256_loadu_ps(x), s_lo[r]);
          s_hi[r] = _mm256_fmadd_ps(q_hi, _mm256_loadu_ps(x + 32), s_hi[r]);
        }
      }
      const __m256 sc_lo = _mm256_broadcast_ss(scale + 2 * c), sc_hi = _mm256_broadcast_ss(scale + 2 * c + 1);
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm256_fmadd_ps(s_lo[r], sc_lo, acc[r]);
        acc[r] = _mm256_fmadd_ps(s_hi[r], sc_hi, acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(acc[r]);
}

// The same with 16 lanes: one register holds chunks 2cc and 2cc+1, so the scales of its two
// halves are sub-blocks 4cc+h and 4cc+2+h.
template <int R>
TK_AVX512 void q4k_row_dot_avx512(const uint8_t* row, int64_t nb, const float* xp, const float* xsum,
                                  int64_t ldx, int64_t ldsum, float* out, int64_t ldo) {
  __m512 acc[R];
  __m256 acc_min[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    acc_min[r] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 144;
    const float* xb = xp + b * 256;
    // The scale bytes are unpacked in general-purpose registers, off the vector ports that
    // the inner loop saturates: lanes [sc0..3, m0..3, sc4..7, m4..7] times [d, dmin, d, dmin].
    alignas(16) uint32_t sm[4];
    {
      uint32_t a[3];
      std::memcpy(a, blk + 4, 12);
      sm[0] = a[0] & 0x3F3F3F3Fu;
      sm[1] = a[1] & 0x3F3F3F3Fu;
      sm[2] = (a[2] & 0x0F0F0F0Fu) | ((a[0] >> 2) & 0x30303030u);
      sm[3] = ((a[2] >> 4) & 0x0F0F0F0Fu) | ((a[1] >> 2) & 0x30303030u);
    }
    const __m512 dd = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadu_si32(blk)));
    const __m512 factor = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1), dd);
    const __m512 scale16 = _mm512_mul_ps(
        factor, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(sm)))));
    const __m256 offset = _mm512_castps512_ps256(
        _mm512_permutexvar_ps(_mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 0, 0, 0, 0, 0, 0, 0, 0), scale16));
    for (int r = 0; r < R; ++r) {
      acc_min[r] = _mm256_fnmadd_ps(offset, _mm256_loadu_ps(xsum + r * ldsum + b * 8), acc_min[r]);
    }
    for (int cc = 0; cc < 2; ++cc) {
      const __m512i v = _mm512_loadu_si512(blk + 16 + 64 * cc);
      __m512 s_lo[R], s_hi[R];
      for (int r = 0; r < R; ++r) s_lo[r] = s_hi[r] = _mm512_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        const __m512 q_lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15 << (8 * i))));
        const __m512 q_hi = _mm512_cvtepi32_ps(
            i == 3 ? _mm512_srli_epi32(v, 28) : _mm512_and_si512(v, _mm512_set1_epi32(15 << (8 * i + 4))));
        for (int r = 0; r < R; ++r) {
          const float* x = xb + r * ldx + 128 * cc + 16 * i;
          s_lo[r] = _mm512_fmadd_ps(q_lo, _mm512_loadu_ps(x), s_lo[r]);
          s_hi[r] = _mm512_fmadd_ps(q_hi, _mm512_loadu_ps(x + 64), s_hi[r]);
        }
      }
      // Sub-blocks 4cc+h (low half) and 4cc+2+h (high half); sub-block j sits in lane j + 4*(j >= 4).
      const __m512i half = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
      const __m512 sc_lo = _mm512_permutexvar_ps(_mm512_add_epi32(half, _mm512_set1_epi32(8 * cc)), scale16);
      const __m512 sc_hi = _mm512_permutexvar_ps(_mm512_add_epi32(half, _mm512_set1_epi32(8 * cc + 1)), scale16);
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_fmadd_ps(s_lo[r], sc_lo, acc[r]);
        acc[r] = _mm512_fmadd_ps(s_hi[r], sc_hi, acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = _mm512_reduce_add_ps(acc[r]) + hsum(acc_min[r]);
}

// Rows of x go through the kernels four at a time, so each decoded code serves up to four FMAs.
template <int G>
void gemv_simd(const float* x32, int64_t m, const uint8_t* w, int64_t n, int64_t nb, float* out,
               const RowDot kernels[4]) {
  const int64_t kp = nb * 256, groups = nb * 8;
  std::vector<float> xp(m * kp), xsum(m * groups);
  for (int64_t r = 0; r < m; ++r) {
    permute_x<G>(x32 + r * kp, kp, xp.data() + r * kp);
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int l = 0; l < 32; ++l) s += x32[r * kp + 32 * g + l];
      xsum[r * groups + g] = s;
    }
  }
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t j = n0; j < n1; ++j) {
      for (int64_t r = 0; r < m; r += 4) {
        kernels[std::min<int64_t>(4, m - r) - 1](w + j * nb * 144, nb, xp.data() + r * kp, xsum.data() + r * groups,
                                                 kp, groups, out + r * n + j, n);
      }
    }
  });
}

const RowDot kRowDotAvx2[4] = {q4k_row_dot_avx2<1>, q4k_row_dot_avx2<2>, q4k_row_dot_avx2<3>, q4k_row_dot_avx2<4>};
const RowDot kRowDotAvx512[4] = {q4k_row_dot_avx512<1>, q4k_row_dot_avx512<2>, q4k_row_dot_avx512<3>,
                                 q4k_row_dot_avx512<4>};
#endif

// The int8 path (exact=False): x quantized per 256 values (int8_dot.h), the 4-bit codes
// multiplied as unsigned bytes with the signed x codes and the 6-bit sub-block scales applied
// to the int16 pair sums in int32 (at most 63 * 2 * 2 * 15 * 127 per lane and instruction,
// 16 instructions per block: no overflow); then per block fp32: d * dx * isum, and the mins
// through the sums of the rounded x, dmin * m_j * sum(x_j) (int8_dot.h says why those).
// x is rounded exactly as ggml's Q8_K rounds it, so the error is ggml's: relative Frobenius
// error against float64 6.9e-3 at 4096x4096 (N(0, 1) x; ggml repacked 6.9e-3 on the same data),
// 6.2e-3 / 6.5e-3 on the CLIP shapes (ggml the same), on every SIMD path (tests/test_cpu_int8.py).
#if defined(__x86_64__)
// The weights stream from memory: asking for the bytes 6 KB ahead (past the row's end too: the
// next row follows) into L1 keeps more misses in flight than the hardware prefetcher alone (M = 1
// at 4096x4096 on an EPYC Zen 5 core: ~0.36 -> ~0.28 ms from L3; 1.5 KB and 16 KB ahead, or into
// L2 only, measured slower).
inline void prefetch_ahead(const uint8_t* blk) {
  for (int l = 0; l < 144; l += 64) _mm_prefetch(reinterpret_cast<const char*>(blk) + 6144 + l, _MM_HINT_T0);
}
#endif
// out[r * ldo] = x_r . dequant(row) for R rows of x (Int8Dot1), or out[r * ldo + j] for `rows`
// consecutive weight rows j (Int8Dot).
using Int8Dot1 = void (*)(const uint8_t* row, int64_t nb, const int8_t* xq, const float* xd, const float* xsum,
                          int64_t ldq, int64_t ldd, int64_t lds, float* out, int64_t ldo);
using Int8Dot = void (*)(const uint8_t* w, int64_t nb, const int8_t* xq, const float* xd, const float* xsum,
                         int64_t ldq, int64_t ldd, int64_t lds, float* out, int64_t ldo, int64_t rows);

// The sub-block scales and mins of a block as bytes sc0..7 and m0..7 of two 64-bit words.
inline void scale_words(const uint8_t* blk, uint64_t* sc, uint64_t* mn) {
  uint32_t a[3];
  std::memcpy(a, blk + 4, 12);
  *sc = (a[0] & 0x3F3F3F3Fu) | (uint64_t{(a[2] & 0x0F0F0F0Fu) | ((a[0] >> 2) & 0x30303030u)} << 32);
  *mn = (a[1] & 0x3F3F3F3Fu) | (uint64_t{((a[2] >> 4) & 0x0F0F0F0Fu) | ((a[1] >> 2) & 0x30303030u)} << 32);
}

// The AVX2 and scalar kernels over `rows` consecutive weight rows, one call each.
template <Int8Dot1 Kernel>
void over_rows(const uint8_t* w, int64_t nb, const int8_t* xq, const float* xd, const float* xsum, int64_t ldq,
               int64_t ldd, int64_t lds, float* out, int64_t ldo, int64_t rows) {
  for (int64_t j = 0; j < rows; ++j) Kernel(w + j * nb * 144, nb, xq, xd, xsum, ldq, ldd, lds, out + j, ldo);
}

template <int R>
void q4k_int8_dot_scalar(const uint8_t* row, int64_t nb, const int8_t* xq, const float* xd, const float* xsum,
                         int64_t ldq, int64_t ldd, int64_t lds, float* out, int64_t ldo) {
  float acc[R] = {}, acc_min[R] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 144;
    const float d = half_at(blk), dmin = half_at(blk + 2);
    uint8_t sc[8], mn[8];
    unpack_scales(blk + 4, sc, mn);
    for (int r = 0; r < R; ++r) {
      const int8_t* x = xq + r * ldq + b * 256;
      int32_t isum = 0;
      float msum = 0.f;
      for (int j = 0; j < 8; ++j) {
        const uint8_t* q = blk + 16 + 32 * (j / 2);
        const int shift = 4 * (j % 2);
        int32_t s = 0;
        for (int l = 0; l < 32; ++l) s += ((q[l] >> shift) & 15) * x[32 * j + l];
        isum += s * sc[j];
        msum += static_cast<float>(mn[j]) * xsum[r * lds + b * 8 + j];
      }
      acc[r] += static_cast<float>(isum) * (d * xd[r * ldd + b]);
      acc_min[r] += dmin * msum;
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = acc[r] - acc_min[r];
}

#if defined(__x86_64__)
// x in the natural order: chunk c of 32 code bytes holds sub-block 2c (low nibbles) and 2c+1.
template <int R>
TK_AVX2 void q4k_int8_dot_avx2(const uint8_t* row, int64_t nb, const int8_t* xq, const float* xd,
                               const float* xsum, int64_t ldq, int64_t ldd, int64_t lds, float* out, int64_t ldo) {
  __m256 acc[R], acc_min[R];
  for (int r = 0; r < R; ++r) acc[r] = acc_min[r] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 144;
    prefetch_ahead(blk);
    uint64_t scw, mnw;
    scale_words(blk, &scw, &mnw);
    const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(blk)));
    const float d = _mm_cvtss_f32(dd);
    const __m256 offset = _mm256_mul_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dd)),
                                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mnw))));
    __m256i iacc[R];
    for (int r = 0; r < R; ++r) iacc[r] = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * c));
      const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      const __m256i s_lo = _mm256_set1_epi16(static_cast<int16_t>((scw >> (16 * c)) & 0xFF));
      const __m256i s_hi = _mm256_set1_epi16(static_cast<int16_t>((scw >> (16 * c + 8)) & 0xFF));
      for (int r = 0; r < R; ++r) {
        const int8_t* x = xq + r * ldq + b * 256 + 64 * c;
        const __m256i p_lo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
        const __m256i p_hi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)));
        iacc[r] = _mm256_add_epi32(iacc[r], _mm256_add_epi32(_mm256_madd_epi16(p_lo, s_lo), _mm256_madd_epi16(p_hi, s_hi)));
      }
    }
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r]), _mm256_set1_ps(d * xd[r * ldd + b]), acc[r]);
      acc_min[r] = _mm256_fnmadd_ps(offset, _mm256_loadu_ps(xsum + r * lds + b * 8), acc_min[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(_mm256_add_ps(acc[r], acc_min[r]));
}

// x with each block's 32-value groups in the order 0 2 1 3 4 6 5 7 (kQ4kVnniOrder): a 64-byte
// code register cc holds sub-blocks 4cc (low nibbles of its low half), 4cc+2 (low nibbles of
// its high half), 4cc+1 and 4cc+3 (the high nibbles), so each register meets one contiguous
// 64 bytes of x.
template <int R>
TK_VNNI void q4k_int8_dot_vnni(const uint8_t* w, int64_t nb, const int8_t* xq, const float* xd,
                               const float* xsum, int64_t ldq, int64_t ldd, int64_t lds, float* out, int64_t ldo,
                               int64_t rows) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // vpermw indices: the int16 scale of sub-block a in the low 16 lanes and b in the high 16.
  const __m512i idx[4] = {
      _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1),
      _mm512_inserti64x4(_mm512_set1_epi16(1), _mm256_set1_epi16(3), 1),
      _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1),
      _mm512_inserti64x4(_mm512_set1_epi16(5), _mm256_set1_epi16(7), 1)};
  for (int64_t j = 0; j < rows; ++j) {
  const uint8_t* row = w + j * nb * 144;
  __m512 acc[R];
  __m256 acc_min[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    acc_min[r] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 144;
    prefetch_ahead(blk);
    uint64_t scw, mnw;
    scale_words(blk, &scw, &mnw);
    const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(blk)));
    const float d = _mm_cvtss_f32(dd);
    const __m256 offset = _mm256_mul_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dd)),
                                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mnw))));
    const __m512i sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(scw)));
    __m512i iacc[R];
    for (int r = 0; r < R; ++r) iacc[r] = _mm512_setzero_si512();
    for (int cc = 0; cc < 2; ++cc) {
      const __m512i v = _mm512_loadu_si512(blk + 16 + 64 * cc);
      const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      const __m512i s_lo = _mm512_permutexvar_epi16(idx[2 * cc], sc16);
      const __m512i s_hi = _mm512_permutexvar_epi16(idx[2 * cc + 1], sc16);
      for (int r = 0; r < R; ++r) {
        const int8_t* x = xq + r * ldq + b * 256 + 128 * cc;
        iacc[r] = _mm512_dpwssd_epi32(iacc[r], _mm512_maddubs_epi16(lo, _mm512_loadu_si512(x)), s_lo);
        iacc[r] = _mm512_dpwssd_epi32(iacc[r], _mm512_maddubs_epi16(hi, _mm512_loadu_si512(x + 64)), s_hi);
      }
    }
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), _mm512_set1_ps(d * xd[r * ldd + b]), acc[r]);
      acc_min[r] = _mm256_fnmadd_ps(offset, _mm256_loadu_ps(xsum + r * lds + b * 8), acc_min[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    out[r * ldo + j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], _mm512_zextps256_ps512(acc_min[r])));
  }
  }
}

const Int8Dot kInt8DotAvx2[4] = {over_rows<q4k_int8_dot_avx2<1>>, over_rows<q4k_int8_dot_avx2<2>>,
                                 over_rows<q4k_int8_dot_avx2<3>>, over_rows<q4k_int8_dot_avx2<4>>};
const Int8Dot kInt8DotVnni[4] = {q4k_int8_dot_vnni<1>, q4k_int8_dot_vnni<2>, q4k_int8_dot_vnni<3>,
                                 q4k_int8_dot_vnni<4>};
#endif

const Int8Dot kInt8DotScalar[4] = {over_rows<q4k_int8_dot_scalar<1>>, over_rows<q4k_int8_dot_scalar<2>>,
                                   over_rows<q4k_int8_dot_scalar<3>>, over_rows<q4k_int8_dot_scalar<4>>};
const int kQ4kVnniOrder[8] = {0, 2, 1, 3, 4, 6, 5, 7};

// Rows of x four at a time, so each decoded weight register serves up to four rows.
void q4k_gemv_int8(const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n, int64_t nb, float* out) {
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
  const Int8Rows xr = quantize_rows_int8(x, m, k, 256, nb, vnni ? kQ4kVnniOrder : nullptr, true);
  const int64_t lds = nb * 8;
  const int64_t tile = int8_tile_rows(n, nb * 144);
  at::parallel_for(0, ceil_div(n, tile), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t j0 = t0 * tile; j0 < std::min(n, t1 * tile); j0 += tile) {
      for (int64_t r = 0; r < m; r += 4) {
        kernels[std::min<int64_t>(4, m - r) - 1](w + j0 * nb * 144, nb, xr.q.data() + r * xr.kp, xr.d.data() + r * nb,
                                                 xr.sum32.data() + r * lds, xr.kp, nb, lds, out + r * n + j0, n,
                                                 std::min(n, j0 + tile) - j0);
      }
    }
  });
}

void gemv_scalar(const float* x32, int64_t m, const uint8_t* w, int64_t n, int64_t nb, float* out) {
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> acc(m);
    float dense[256];
    for (int64_t j = n0; j < n1; ++j) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0; b < nb; ++b) {
        dequant_block_scalar(w + (j * nb + b) * 144, dense);
        for (int64_t r = 0; r < m; ++r) {
          const float* x = x32 + r * nb * 256 + b * 256;
          float s = 0.f;
          for (int l = 0; l < 256; ++l) s += x[l] * dense[l];
          acc[r] += s;
        }
      }
      for (int64_t r = 0; r < m; ++r) out[r * n + j] = acc[r];
    }
  });
}

struct Q4K {
  static constexpr int64_t kBlock = 256;
  static constexpr int64_t kBlockBytes = 144;
  // Decoding costs ~0.65 ms per row of x at 4096x4096 and dequantizing for the BLAS ~9.5 ms in
  // all (one core of the AVX-512 Xeon this was tuned on): the tiles win from about M = 14.
  static constexpr int64_t kTileMinRows = 14;
  // The int8 path (exact=False, see q4k_gemv_int8) below this many rows: with SIMD it beats the
  // BLAS tiles up to 127 rows at 4096x4096 (2.5x with VNNI, 1.6x with AVX2 at 127 for Q4_K,
  // 1.3x / 1.2x for Q8_0); the scalar code only below kTileMinRows.
  static int64_t int8_max_rows() { return has_avx2_fma() ? 128 : kTileMinRows; }

  static void gemv_int8(const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n, int64_t nb, float* out) {
    q4k_gemv_int8(x, m, k, w, n, nb, out);
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
    if (has_avx512()) return gemv_simd<2>(x32, m, w, n, nb, out, kRowDotAvx512);
    if (has_avx2_fma()) return gemv_simd<1>(x32, m, w, n, nb, out, kRowDotAvx2);
#endif
    gemv_scalar(x32, m, w, n, nb, out);
  }
};

at::Tensor q4k_dequantize(const at::Tensor& blocks, at::ScalarType dtype) {
  return block_dequantize<Q4K>("q4k_dequantize", blocks, dtype);
}

at::Tensor q4k_matmul(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool exact) {
  return block_matmul<Q4K>("q4k_matmul", x, w, bias, exact);
}

}  // namespace

at::Tensor q4k_dequantize_as(const char* op, const at::Tensor& blocks, at::ScalarType dtype) {
  return block_dequantize<Q4K>(op, blocks, dtype);
}

at::Tensor q4k_matmul_as(const char* op, const at::Tensor& x, const at::Tensor& w,
                         const c10::optional<at::Tensor>& bias, bool exact) {
  return block_matmul<Q4K>(op, x, w, bias, exact);
}

TORCH_LIBRARY_IMPL(tinykern, CPU, m) {
  m.impl("q4k_dequantize", &q4k_dequantize);
  m.impl("q4k_matmul", &q4k_matmul);
}

}  // namespace tinykern::cpu
