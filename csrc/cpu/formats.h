// The CPU traits of the GGML block formats beyond Q4_K and Q8_0 (those two keep their tuned
// kernels in q4k.cpp and q8_0.cpp): Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, Q6_K, each a
// struct for the drivers of blockquant.h (kBlock, kBlockBytes, kTileMinRows, dequant_block, gemv).
//
// Every format decodes in two steps: its bits become integer codes q plus, per group of G
// weights, a scale s and an offset o, and then w = s*q - o in fp32. That is gguf-py's order of
// operations for each format, so the values are bit-identical with it:
// - s*q is exact in all formats but Q6_K (its s = d*sc is exact, and gguf also rounds (d*sc)*q);
// - o = 0 where gguf computes a bare product: x - (+0) == x for every x, -0 included;
// - o = -m where gguf adds m: a - (-m) == a + m.
// Layouts: gguf-py's quants.py, which these loops follow field for field.
#pragma once

#include "cpu/blockquant.h"  // first: it includes the intrinsics headers

namespace tinykern::cpu {

namespace fmt_detail {

// A decoded block: codes, and the scale and offset of each group of kGroup weights.
template <int64_t kBlock, int64_t kGroup>
struct Decoded {
  static constexpr int64_t kGroups = kBlock / kGroup;
  alignas(32) int8_t q[kBlock];
  float s[kGroups], o[kGroups];
};

template <typename T, int64_t B, int64_t G>
void expand_scalar(const Decoded<B, G>& d, T* out) {
  for (int64_t i = 0; i < B; ++i) out[i] = static_cast<T>(d.s[i / G] * static_cast<float>(d.q[i]) - d.o[i / G]);
}

#if defined(__x86_64__)
template <typename T, int64_t B, int64_t G>
TK_AVX2 void expand_avx2(const Decoded<B, G>& d, T* out) {
  static_assert(G % 8 == 0, "a vector of 8 stays in one group");
  for (int64_t i = 0; i < B; i += 8) {
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(d.q + i))));
    const __m256 w = _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(d.s[i / G]), q), _mm256_set1_ps(d.o[i / G]));
    store8(out + i, w);
  }
}
#endif

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The 6-bit scales and mins of Q4_K/Q5_K from their 12 packed bytes (gguf's get_scale_min).
inline void k_scale_min(const uint8_t* s, uint8_t sc[8], uint8_t m[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    m[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 2) & 0x30);
    m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
  }
}

// Dots each of R rows of x (row stride ldx) with the kp decoded weights of one row.
template <int R>
void dot_rows_scalar(const float* wrow, int64_t kp, const float* x, int64_t ldx, float* out, int64_t ldo) {
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
    for (int64_t l = 0; l < kp; ++l) s += x[r * ldx + l] * wrow[l];
    out[r * ldo] = s;
  }
}

#if defined(__x86_64__)
// kp is a multiple of 32 (every block is): two accumulators per row hide the FMA latency.
template <int R>
TK_AVX2 void dot_rows_avx2(const float* wrow, int64_t kp, const float* x, int64_t ldx, float* out, int64_t ldo) {
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int64_t l = 0; l < kp; l += 16) {
    const __m256 w0 = _mm256_loadu_ps(wrow + l), w1 = _mm256_loadu_ps(wrow + l + 8);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * ldx + l), a0[r]);
      a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * ldx + l + 8), a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(_mm256_add_ps(a0[r], a1[r]));
}
#endif

using DotRows = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t);

// out [m, n] = x32 [m, nb*block] @ dequant(w).T for small m: each weight row is decoded once
// into an fp32 buffer (L1-sized for the usual K) and dotted with the rows of x four at a time.
template <class Format>
void decoded_gemv(const float* x32, int64_t m, const uint8_t* w, int64_t n, int64_t nb, float* out) {
  const int64_t kp = nb * Format::kBlock;
  const bool simd = has_avx2_fma();
  DotRows dots[4] = {dot_rows_scalar<1>, dot_rows_scalar<2>, dot_rows_scalar<3>, dot_rows_scalar<4>};
#if defined(__x86_64__)
  if (simd) {
    dots[0] = dot_rows_avx2<1>, dots[1] = dot_rows_avx2<2>, dots[2] = dot_rows_avx2<3>, dots[3] = dot_rows_avx2<4>;
  }
#endif
  at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(kp);
    for (int64_t j = n0; j < n1; ++j) {
      const uint8_t* wr = w + j * nb * Format::kBlockBytes;
      for (int64_t b = 0; b < nb; ++b) {
        Format::template dequant_block<float>(wr + b * Format::kBlockBytes, row.data() + b * Format::kBlock, simd);
      }
      for (int64_t r = 0; r < m; r += 4) {
        dots[std::min<int64_t>(4, m - r) - 1](row.data(), kp, x32 + r * kp, kp, out + r * n + j, n);
      }
    }
  });
}

// The shared members of a format: decode() fills a Decoded; dequant_block expands it.
template <class Derived, int64_t B, int64_t BB, int64_t G>
struct DecodedFormat {
  static constexpr int64_t kBlock = B;
  static constexpr int64_t kBlockBytes = BB;
  // As for Q4_K and Q8_0: from here on the BLAS on dequantized tiles beats the row dots.
  static constexpr int64_t kTileMinRows = 14;
  using Block = Decoded<B, G>;

#if defined(__x86_64__)
  // decode() inlined here is vectorized for AVX2 as well.
  template <typename T>
  TK_AVX2 static void dequant_block_avx2(const uint8_t* blk, T* out) {
    Block d;
    Derived::decode(blk, d);
    expand_avx2(d, out);
  }
#endif

  template <typename T>
  static void dequant_block(const uint8_t* blk, T* out, bool simd) {
#if defined(__x86_64__)
    if (simd) return dequant_block_avx2(blk, out);
#endif
    Block d;
    Derived::decode(blk, d);
    expand_scalar(d, out);
  }

  static void gemv(const float* x32, int64_t m, const uint8_t* w, int64_t n, int64_t nb, float* out) {
    decoded_gemv<Derived>(x32, m, w, n, nb, out);
  }
};

}  // namespace fmt_detail

// d (fp16), 16 bytes of nibbles: weight j < 16 in the low nibble of byte j, j + 16 in its high
// nibble; w = d * (q - 8).
struct Q4_0 : fmt_detail::DecodedFormat<Q4_0, 32, 18, 32> {
  static void decode(const uint8_t* blk, Block& d) {
    d.s[0] = half_at(blk), d.o[0] = 0.f;
    for (int j = 0; j < 16; ++j) {
      d.q[j] = static_cast<int8_t>((blk[2 + j] & 15) - 8);
      d.q[j + 16] = static_cast<int8_t>((blk[2 + j] >> 4) - 8);
    }
  }
};

// d, m (fp16), nibbles as Q4_0; w = d * q + m.
struct Q4_1 : fmt_detail::DecodedFormat<Q4_1, 32, 20, 32> {
  static void decode(const uint8_t* blk, Block& d) {
    d.s[0] = half_at(blk), d.o[0] = -half_at(blk + 2);
    for (int j = 0; j < 16; ++j) {
      d.q[j] = static_cast<int8_t>(blk[4 + j] & 15);
      d.q[j + 16] = static_cast<int8_t>(blk[4 + j] >> 4);
    }
  }
};

// The 5-bit codes of Q5_0/Q5_1: nibbles as Q4_0, bit j of the 32-bit word qh on top of weight j.
template <int kBias>
inline void q5_codes(const uint8_t* qh_bytes, const uint8_t* qs, int8_t* q) {
  const uint32_t qh = fmt_detail::u32_at(qh_bytes);
  for (int j = 0; j < 16; ++j) {
    q[j] = static_cast<int8_t>(((qs[j] & 15) | ((qh >> j) & 1) << 4) - kBias);
    q[j + 16] = static_cast<int8_t>(((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - kBias);
  }
}

// d (fp16), qh (4 bytes), 16 bytes of nibbles; w = d * (q - 16).
struct Q5_0 : fmt_detail::DecodedFormat<Q5_0, 32, 22, 32> {
  static void decode(const uint8_t* blk, Block& d) {
    d.s[0] = half_at(blk), d.o[0] = 0.f;
    q5_codes<16>(blk + 2, blk + 6, d.q);
  }
};

// d, m (fp16), qh, nibbles; w = d * q + m.
struct Q5_1 : fmt_detail::DecodedFormat<Q5_1, 32, 24, 32> {
  static void decode(const uint8_t* blk, Block& d) {
    d.s[0] = half_at(blk), d.o[0] = -half_at(blk + 2);
    q5_codes<0>(blk + 4, blk + 8, d.q);
  }
};

// scales (16 bytes: 4-bit scale low, 4-bit min high, per 16 weights), qs (64 bytes of 2-bit
// codes), d, dmin (fp16). Weight 128h + 32s + l is bits 2s..2s+1 of qs[32h + l];
// w = (d * sc) * q - dmin * m.
struct Q2_K : fmt_detail::DecodedFormat<Q2_K, 256, 84, 16> {
  static void decode(const uint8_t* blk, Block& d) {
    const float dd = half_at(blk + 80), dmin = half_at(blk + 82);
    for (int g = 0; g < 16; ++g) {
      d.s[g] = dd * static_cast<float>(blk[g] & 15);
      d.o[g] = dmin * static_cast<float>(blk[g] >> 4);
    }
    const uint8_t* qs = blk + 16;
    for (int h = 0; h < 2; ++h) {
      for (int s = 0; s < 4; ++s) {
        for (int l = 0; l < 32; ++l) d.q[128 * h + 32 * s + l] = static_cast<int8_t>((qs[32 * h + l] >> (2 * s)) & 3);
      }
    }
  }
};

// hmask (32 bytes), qs (64 bytes of 2-bit codes, laid out as Q2_K's), 12 bytes of 6-bit scales
// (low nibbles in bytes 0-7, the top two bits in bytes 8-11), d (fp16). Weight e takes 4 off
// its code where bit e/32 of hmask[e % 32] is clear; w = (d * (sc - 32)) * q.
struct Q3_K : fmt_detail::DecodedFormat<Q3_K, 256, 110, 16> {
  static void decode(const uint8_t* blk, Block& d) {
    const uint8_t *hmask = blk, *qs = blk + 32, *sc = blk + 96;
    const float dd = half_at(blk + 108);
    for (int g = 0; g < 16; ++g) {
      const int low = g < 8 ? sc[g] & 15 : sc[g - 8] >> 4;
      const int high = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
      d.s[g] = dd * static_cast<float>((low | high << 4) - 32);
      d.o[g] = 0.f;
    }
    for (int h = 0; h < 2; ++h) {
      for (int s = 0; s < 4; ++s) {
        const int t = 4 * h + s;
        for (int l = 0; l < 32; ++l) {
          const int q = (qs[32 * h + l] >> (2 * s)) & 3;
          d.q[32 * t + l] = static_cast<int8_t>(q - (((hmask[l] >> t) & 1) ? 0 : 4));
        }
      }
    }
  }
};

// d, dmin (fp16), 12 bytes of scales and mins as Q4_K, qh (32 bytes: bit j of qh[l] tops weight
// 32j + l), qs (128 bytes of nibbles as Q4_K); w = (d * sc) * q - dmin * m.
struct Q5_K : fmt_detail::DecodedFormat<Q5_K, 256, 176, 32> {
  static void decode(const uint8_t* blk, Block& d) {
    const float dd = half_at(blk), dmin = half_at(blk + 2);
    uint8_t sc[8], m[8];
    fmt_detail::k_scale_min(blk + 4, sc, m);
    const uint8_t *qh = blk + 16, *qs = blk + 48;
    for (int j = 0; j < 8; ++j) {
      d.s[j] = dd * static_cast<float>(sc[j]);
      d.o[j] = dmin * static_cast<float>(m[j]);
      const int shift = 4 * (j % 2);
      for (int l = 0; l < 32; ++l) {
        d.q[32 * j + l] = static_cast<int8_t>(((qs[32 * (j / 2) + l] >> shift) & 15) | ((qh[l] >> j) & 1) << 4);
      }
    }
  }
};

// ql (128 bytes: weight 128a + 64b + c in nibble b of ql[64a + c]), qh (64 bytes: its top two
// bits for weight 128a + 32s + l in bits 2s..2s+1 of qh[32a + l]), 16 int8 scales, d (fp16);
// w = (d * sc) * (q - 32), the one format whose product rounds.
struct Q6_K : fmt_detail::DecodedFormat<Q6_K, 256, 210, 16> {
  static void decode(const uint8_t* blk, Block& d) {
    const uint8_t *ql = blk, *qh = blk + 128;
    const float dd = half_at(blk + 208);
    for (int g = 0; g < 16; ++g) {
      d.s[g] = dd * static_cast<float>(static_cast<int8_t>(blk[192 + g]));
      d.o[g] = 0.f;
    }
    // Byte ql[64a + 32h + l] holds weights 128a + 32h + l (low nibble) and 128a + 64 + 32h + l
    // (high); byte qh[32a + l] holds their top bits at 2h and 4 + 2h.
    for (int a = 0; a < 2; ++a) {
      for (int h = 0; h < 2; ++h) {
        for (int l = 0; l < 32; ++l) {
          const int low = ql[64 * a + 32 * h + l], high = qh[32 * a + l];
          d.q[128 * a + 32 * h + l] = static_cast<int8_t>(((low & 15) | ((high >> (2 * h)) & 3) << 4) - 32);
          d.q[128 * a + 64 + 32 * h + l] = static_cast<int8_t>(((low >> 4) | ((high >> (4 + 2 * h)) & 3) << 4) - 32);
        }
      }
    }
  }
};

}  // namespace tinykern::cpu
