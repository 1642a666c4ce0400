// Block quantization on CPU: ports of GGML's reference quantizers (quantize_row_q4_0_ref ...
// q8_0, and the K-quants q2_K, q3_K, q4_K, q5_K, q6_K) that give the same bytes. The K-quants'
// sub-block searches (make_qkx2_quants, make_qx_quants, make_q3_quants) run one sub-block per
// SIMD lane through the reference's sequence of fp32 operations in the reference's order, so
// vectorizing across sub-blocks changes no rounding; the rest of each super-block is scalar. The
// build compiles with -ffp-contract=off so that no multiply-add is fused. Layout:
// docs/formats.md.
//
// Rules of tinykern's own, where the reference stores no finite or exact value (the torch ports
// of tinykern/formats keep the same ones):
// - the K-quants' fp16 d and dmin saturate at the largest fp16 instead of becoming Inf (weights
//   at the range ends);
// - a Q4_K block of 256 copies of one non-zero fp16-representable value c stores it exactly
//   (c = d*1*1 or c = -dmin*1), as the torch quantizer of tinykern/formats/q4k.py does.
#include "cpu/blockquant.h"  // first: it includes the intrinsics headers

#include <torch/library.h>

#include <cfloat>
#include <cmath>

// The lane vectors are locals of always-inline functions: no vector crosses a call boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace tinykern::cpu {
namespace {

#define TK_INLINE inline __attribute__((always_inline))

template <int L>
struct Lanes {
  typedef float F __attribute__((vector_size(4 * L)));
  typedef int32_t I __attribute__((vector_size(4 * L)));
};

// GGML's nearest_int: round half to even through the 1.5*2^23 trick, bit for bit (including its
// wrap-around past 2^22, which the callers clamp).
template <class F, class I>
TK_INLINE I nearest_int(F v) {
  const I bits = (I)(v + 12582912.f);
  return (bits & 0x007fffff) - 0x00400000;
}

inline int nearest_int_scalar(float v) {
  int32_t bits;
  const float t = v + 12582912.f;
  std::memcpy(&bits, &t, 4);
  return (bits & 0x007fffff) - 0x00400000;
}

template <class I>
TK_INLINE I clamp_code(I q, int hi) {
  q = q < 0 ? 0 : q;
  return q > hi ? hi : q;
}

// make_qkx2_quants(N, kNmax, x, weights, L, &the_min, Laux, rmin, 0.1, kNstep, kMad) for L
// sub-blocks of N weights at once: x holds them one after another (N*L floats). The weights are
// rms(x) + |x_l| (kRmsWeights: Q4_K, Q5_K) or |x_l| (Q2_K). Writes each one's scale, -min and N
// codes (sub-block major).
template <int L, int N, int kNmax, int kNstep, bool kMad, bool kRmsWeights>
TK_INLINE void qkx2_search(const float* x, float rmin, float* scale_out, float* neg_min_out, uint8_t* codes) {
  using F = typename Lanes<L>::F;
  using I = typename Lanes<L>::I;
  alignas(64) float t[N][L];
  for (int i = 0; i < L; ++i) {
    for (int l = 0; l < N; ++l) t[l][i] = x[N * i + l];
  }
  F xv[N], w[N], lbest[N], laux[N];
  for (int l = 0; l < N; ++l) std::memcpy(&xv[l], t[l], sizeof(F));

  if constexpr (kRmsWeights) {
    F sum_x2 = F{} + 0.f;
    for (int l = 0; l < N; ++l) sum_x2 += xv[l] * xv[l];
    F av = sum_x2 / static_cast<float>(N);
    for (int i = 0; i < L; ++i) av[i] = std::sqrt(av[i]);
    for (int l = 0; l < N; ++l) w[l] = av + (F)((I)xv[l] & 0x7fffffff);
  } else {
    for (int l = 0; l < N; ++l) w[l] = (F)((I)xv[l] & 0x7fffffff);
  }

  F mn = xv[0], mx = xv[0], sum_w = w[0], sum_x = w[0] * xv[0];
  for (int l = 1; l < N; ++l) {
    mn = xv[l] < mn ? xv[l] : mn;
    mx = xv[l] > mx ? xv[l] : mx;
    sum_w += w[l];
    sum_x += w[l] * xv[l];
  }
  mn = mn > 0.f ? F{} + 0.f : mn;
  // max == min: every code 0 and scale 0 (the reference returns before searching; the lanes
  // search on and are overwritten below).
  const I flat = mx == mn;
  const F flat_min = mn;

  F iscale = static_cast<float>(kNmax) / (mx - mn);
  F scale = 1.f / iscale;
  F best_error = F{} + 0.f;
  for (int l = 0; l < N; ++l) {
    lbest[l] = __builtin_convertvector(clamp_code(nearest_int<F, I>(iscale * (xv[l] - mn)), kNmax), F);
    F diff = scale * lbest[l] + mn - xv[l];
    diff = kMad ? (F)((I)diff & 0x7fffffff) : diff * diff;
    best_error += w[l] * diff;
  }
  for (int is = 0; is <= kNstep; ++is) {
    const float rdelta = 0.1f, nmax = kNmax;
    iscale = (rmin + rdelta * static_cast<float>(is) + nmax) / (mx - mn);
    F sum_l = F{} + 0.f, sum_l2 = F{} + 0.f, sum_xl = F{} + 0.f;
    for (int l = 0; l < N; ++l) {
      laux[l] = __builtin_convertvector(clamp_code(nearest_int<F, I>(iscale * (xv[l] - mn)), kNmax), F);
      sum_l += w[l] * laux[l];
      sum_l2 += w[l] * laux[l] * laux[l];
      sum_xl += w[l] * laux[l] * xv[l];
    }
    const F det = sum_w * sum_l2 - sum_l * sum_l;
    F this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
    F this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
    const I positive = this_min > 0.f;
    this_scale = positive ? sum_xl / sum_l2 : this_scale;
    this_min = positive ? F{} + 0.f : this_min;
    F cur_error = F{} + 0.f;
    for (int l = 0; l < N; ++l) {
      F diff = this_scale * laux[l] + this_min - xv[l];
      diff = kMad ? (F)((I)diff & 0x7fffffff) : diff * diff;
      cur_error += w[l] * diff;
    }
    const I better = (det > 0.f) & (cur_error < best_error);
    for (int l = 0; l < N; ++l) lbest[l] = better ? laux[l] : lbest[l];
    best_error = better ? cur_error : best_error;
    scale = better ? this_scale : scale;
    mn = better ? this_min : mn;
  }
  scale = flat ? F{} + 0.f : scale;
  mn = flat ? flat_min : mn;
  std::memcpy(scale_out, &scale, sizeof(F));
  const F neg_min = -mn;
  std::memcpy(neg_min_out, &neg_min, sizeof(F));
  for (int l = 0; l < N; ++l) {
    const I q = flat ? I{} : __builtin_convertvector(lbest[l], I);
    for (int i = 0; i < L; ++i) codes[N * i + l] = static_cast<uint8_t>(q[i]);
  }
}

// The sign-carrying value of largest magnitude of each lane's 16 weights (the first of equals, 0
// when all are 0), as the reference's running maximum from 0 finds it; also its magnitude.
template <class F, class I>
TK_INLINE F first_absmax(const F* xv, F& amax) {
  amax = F{} + 0.f;
  F peak = F{} + 0.f;
  for (int l = 0; l < 16; ++l) {
    const F a = (F)((I)xv[l] & 0x7fffffff);
    const I larger = a > amax;
    amax = larger ? a : amax;
    peak = larger ? xv[l] : peak;
  }
  return peak;
}

// make_qx_quants(16, 32, x, L, 1, NULL) (Q6_K's search) for L sub-blocks of 16 at once: codes
// from 19 grids iscale = -(32 + 0.1*is)/max, weights x^2, least-squares scale of each, the best
// by sumlx^2/suml2. Writes each one's scale and 16 codes in 0..63.
template <int L>
TK_INLINE void qx_search(const float* x, float* scale_out, uint8_t* codes) {
  using F = typename Lanes<L>::F;
  using I = typename Lanes<L>::I;
  constexpr int kNmax = 32;
  alignas(64) float t[16][L];
  for (int i = 0; i < L; ++i) {
    for (int l = 0; l < 16; ++l) t[l][i] = x[16 * i + l];
  }
  F xv[16], w[16], wx[16], lbest[16];
  for (int l = 0; l < 16; ++l) {
    std::memcpy(&xv[l], t[l], sizeof(F));
    w[l] = xv[l] * xv[l];
    wx[l] = w[l] * xv[l];
  }
  F amax;
  F peak = first_absmax<F, I>(xv, amax);
  const I zero = amax < 1e-15f;  // GROUP_MAX_EPS: an all-zero group to the reference
  peak = zero ? F{} + 1.f : peak;  // keeps the discarded lanes free of 0/0

  F sumlx = F{} + 0.f, suml2 = F{} + 0.f;
  F iscale = -static_cast<float>(kNmax) / peak;
  for (int l = 0; l < 16; ++l) {
    const I q = nearest_int<F, I>(iscale * xv[l]);
    lbest[l] = __builtin_convertvector(q < -kNmax ? -kNmax : (q > kNmax - 1 ? kNmax - 1 : q), F);
    sumlx += wx[l] * lbest[l];
    suml2 += w[l] * lbest[l] * lbest[l];
  }
  F scale = suml2 != 0.f ? sumlx / suml2 : F{} + 0.f;
  F best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(static_cast<float>(kNmax) + 0.1f * static_cast<float>(is)) / peak;
    F lq[16];
    F slx = F{} + 0.f, sl2 = F{} + 0.f;
    for (int l = 0; l < 16; ++l) {
      const I q = nearest_int<F, I>(iscale * xv[l]);
      lq[l] = __builtin_convertvector(q < -kNmax ? -kNmax : (q > kNmax - 1 ? kNmax - 1 : q), F);
      slx += wx[l] * lq[l];
      sl2 += w[l] * lq[l] * lq[l];
    }
    const I better = (sl2 > 0.f) & (slx * slx > best * sl2);
    for (int l = 0; l < 16; ++l) lbest[l] = better ? lq[l] : lbest[l];
    scale = better ? slx / sl2 : scale;
    best = better ? scale * slx : best;
  }
  scale = zero ? F{} + 0.f : scale;
  std::memcpy(scale_out, &scale, sizeof(F));
  for (int l = 0; l < 16; ++l) {
    const I q = zero ? I{} : __builtin_convertvector(lbest[l], I) + kNmax;
    for (int i = 0; i < L; ++i) codes[16 * i + l] = static_cast<uint8_t>(q[i]);
  }
}

// make_q3_quants(16, 4, x, L, true) (Q3_K's search) for L sub-blocks of 16 at once: codes from
// iscale = -4/max, then up to 5 passes that move one code at a time where that raises
// sumlx^2/suml2 (weights x^2), each code seeing the sums its predecessors left. A lane's pass that
// changes nothing would change nothing again, so the lanes run on until none changes. Writes each
// one's scale and 16 codes in 0..7.
template <int L>
TK_INLINE void q3_search(const float* x, float* scale_out, uint8_t* codes) {
  using F = typename Lanes<L>::F;
  using I = typename Lanes<L>::I;
  constexpr int kNmax = 4;
  alignas(64) float t[16][L];
  for (int i = 0; i < L; ++i) {
    for (int l = 0; l < 16; ++l) t[l][i] = x[16 * i + l];
  }
  F xv[16], w[16], wx[16], lq[16];
  for (int l = 0; l < 16; ++l) {
    std::memcpy(&xv[l], t[l], sizeof(F));
    w[l] = xv[l] * xv[l];
    wx[l] = w[l] * xv[l];
  }
  F amax;
  F peak = first_absmax<F, I>(xv, amax);
  const I zero = amax < 1e-15f;
  peak = zero ? F{} + 1.f : peak;

  const F iscale = -static_cast<float>(kNmax) / peak;
  F sumlx = F{} + 0.f, suml2 = F{} + 0.f;
  for (int l = 0; l < 16; ++l) {
    const I q = nearest_int<F, I>(iscale * xv[l]);
    lq[l] = __builtin_convertvector(q < -kNmax ? -kNmax : (q > kNmax - 1 ? kNmax - 1 : q), F);
    sumlx += wx[l] * lq[l];
    suml2 += w[l] * lq[l] * lq[l];
  }
  for (int itry = 0; itry < 5; ++itry) {
    I changed = I{};
    for (int i = 0; i < 16; ++i) {
      F slx = sumlx - wx[i] * lq[i];
      const I positive = slx > 0.f;
      F sl2 = suml2 - w[i] * lq[i] * lq[i];
      const I q = nearest_int<F, I>(xv[i] * sl2 / slx);
      const F new_l = __builtin_convertvector(q < -kNmax ? -kNmax : (q > kNmax - 1 ? kNmax - 1 : q), F);
      slx += wx[i] * new_l;
      sl2 += w[i] * new_l * new_l;
      const I take = positive & (new_l != lq[i]) & (sl2 > 0.f) & (slx * slx * suml2 > sumlx * sumlx * sl2);
      lq[i] = take ? new_l : lq[i];
      sumlx = take ? slx : sumlx;
      suml2 = take ? sl2 : suml2;
      changed |= take;
    }
    bool any = false;
    for (int i = 0; i < L; ++i) any |= changed[i] != 0;
    if (!any) break;
  }
  F scale = suml2 > 0.f ? sumlx / suml2 : F{} + 0.f;
  scale = zero ? F{} + 0.f : scale;
  std::memcpy(scale_out, &scale, sizeof(F));
  for (int l = 0; l < 16; ++l) {
    const I q = zero ? I{} : __builtin_convertvector(lq[l], I) + kNmax;
    for (int i = 0; i < L; ++i) codes[16 * i + l] = static_cast<uint8_t>(q[i]);
  }
}

bool fp16_exact(float v) {
  return c10::detail::fp16_ieee_to_fp32_value(c10::detail::fp16_ieee_from_fp32_value(v)) == v;
}

// tinykern's rule for fp16 block scales: saturate at the largest fp16 rather than store Inf (the
// fit may ask for a little more near the range's ends; the codes are recomputed against it).
uint16_t fp16_saturated(float v) {
  return c10::detail::fp16_ieee_from_fp32_value(std::clamp(v, -65504.f, 65504.f));
}

float fp16_value(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

// Q4_K's and Q5_K's 6-bit scales and mins of 8 sub-blocks, against their maxima in 63 steps, and
// the fp16 d and dmin.
void six_bit_scales(const float* scales, const float* mins, uint8_t* sc, uint8_t* m, uint16_t& d16,
                    uint16_t& dmin16) {
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  for (int j = 0; j < 8; ++j) {
    // Truncated to a byte before the clamp, as the reference does.
    sc[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int_scalar(inv_scale * scales[j])));
    m[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int_scalar(inv_min * mins[j])));
  }
  d16 = fp16_saturated(max_scale / 63.f);
  dmin16 = fp16_saturated(max_min / 63.f);
}

// Codes of an affine sub-block against stored parameters: clamp(round((x + dmin*m)/(d*sc))).
// Sub-blocks whose step is 0 keep the search's codes.
template <int kSub, int kNmax>
void requantize_affine(const float* x, float step, float offset, uint8_t* codes) {
  if (step == 0.f) return;
  for (int l = 0; l < kSub; ++l) {
    codes[l] = static_cast<uint8_t>(std::clamp(nearest_int_scalar((x[l] + offset) / step), 0, kNmax));
  }
}

void pack_six_bit(const uint8_t* sc, const uint8_t* m, uint8_t* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
    s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
    s[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
  }
}

// The rest of quantize_row_q4_K_ref for one super-block, given its sub-blocks' search results:
// 6-bit scales and mins, fp16 d and dmin, codes recomputed against the stored values.
void q4k_finish(const float* x, const float* scales, const float* mins, uint8_t* codes, uint8_t* out) {
  uint8_t sc[8], m[8];
  uint16_t d16, dmin16;
  six_bit_scales(scales, mins, sc, m, d16, dmin16);

  const float c = x[0];
  bool constant = c != 0.f && fp16_exact(c);
  for (int l = 1; l < 256 && constant; ++l) constant = x[l] == c;
  if (constant) {
    const uint16_t h = c10::detail::fp16_ieee_from_fp32_value(std::fabs(c));
    d16 = c > 0 ? h : 0;
    dmin16 = c > 0 ? 0 : h;
    for (int j = 0; j < 8; ++j) sc[j] = c > 0, m[j] = c < 0;
    std::memset(codes, c > 0 ? 1 : 0, 256);
  } else {
    const float d = fp16_value(d16), dmin = fp16_value(dmin16);
    for (int j = 0; j < 8; ++j) {
      requantize_affine<32, 15>(x + 32 * j, d * static_cast<float>(sc[j]), dmin * static_cast<float>(m[j]),
                                codes + 32 * j);
    }
  }
  std::memcpy(out, &d16, 2);
  std::memcpy(out + 2, &dmin16, 2);
  pack_six_bit(sc, m, out + 4);
  for (int c4 = 0; c4 < 4; ++c4) {
    for (int l = 0; l < 32; ++l) out[16 + 32 * c4 + l] = codes[64 * c4 + l] | (codes[64 * c4 + 32 + l] << 4);
  }
}

// quantize_row_q5_K_ref after the searches: as Q4_K (without its constant-block rule), codes
// 0..31 with their fifth bits in qh.
void q5k_finish(const float* x, const float* scales, const float* mins, uint8_t* codes, uint8_t* out) {
  uint8_t sc[8], m[8];
  uint16_t d16, dmin16;
  six_bit_scales(scales, mins, sc, m, d16, dmin16);
  const float d = fp16_value(d16), dmin = fp16_value(dmin16);
  for (int j = 0; j < 8; ++j) {
    requantize_affine<32, 31>(x + 32 * j, d * static_cast<float>(sc[j]), dmin * static_cast<float>(m[j]),
                              codes + 32 * j);
  }
  std::memcpy(out, &d16, 2);
  std::memcpy(out + 2, &dmin16, 2);
  pack_six_bit(sc, m, out + 4);
  uint8_t* qh = out + 16;
  uint8_t* ql = out + 48;
  std::memset(qh, 0, 32);
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t q1 = codes[64 * c + l], q2 = codes[64 * c + 32 + l];
      qh[l] |= ((q1 >> 4) << (2 * c)) | ((q2 >> 4) << (2 * c + 1));
      ql[32 * c + l] = (q1 & 15) | ((q2 & 15) << 4);
    }
  }
}

// quantize_row_q2_K_ref after the searches: 4-bit scales and mins of 16 sub-blocks against their
// maxima in 15 steps (the rounded ints OR-ed into one byte, as the reference does), fp16 d and
// dmin, codes 0..3 recomputed against them.
void q2k_finish(const float* x, const float* scales, const float* mins, uint8_t* codes, uint8_t* out) {
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 16; ++j) {
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  uint8_t* s = out;
  uint16_t d16 = 0, dmin16 = 0;
  std::memset(s, 0, 16);
  if (max_scale > 0) {
    const float iscale = 15.f / max_scale;
    for (int j = 0; j < 16; ++j) s[j] = static_cast<uint8_t>(nearest_int_scalar(iscale * scales[j]));
    d16 = fp16_saturated(max_scale / 15.f);
  }
  if (max_min > 0) {
    const float iscale = 15.f / max_min;
    for (int j = 0; j < 16; ++j) {
      s[j] |= static_cast<uint8_t>(static_cast<uint32_t>(nearest_int_scalar(iscale * mins[j])) << 4);
    }
    dmin16 = fp16_saturated(max_min / 15.f);
  }
  const float d = fp16_value(d16), dmin = fp16_value(dmin16);
  for (int j = 0; j < 16; ++j) {
    requantize_affine<16, 3>(x + 16 * j, d * static_cast<float>(s[j] & 15), dmin * static_cast<float>(s[j] >> 4),
                             codes + 16 * j);
  }
  for (int h = 0; h < 2; ++h) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t* q = codes + 128 * h + l;
      out[16 + 32 * h + l] = q[0] | (q[32] << 2) | (q[64] << 4) | (q[96] << 6);
    }
  }
  std::memcpy(out + 80, &d16, 2);
  std::memcpy(out + 82, &dmin16, 2);
}

// The scale of largest magnitude among 16 (the first of equals, 0 when all are 0).
float first_absmax16(const float* scales, float& amax) {
  float peak = 0;
  amax = 0;
  for (int j = 0; j < 16; ++j) {
    if (std::fabs(scales[j]) > amax) {
      amax = std::fabs(scales[j]);
      peak = scales[j];
    }
  }
  return peak;
}

// quantize_row_q3_K_ref after the searches: signed 6-bit scales (stored + 32) against the scale
// of largest magnitude, fp16 d, codes 0..7 recomputed against them; the third code bits in hmask.
void q3k_finish(const float* x, const float* scales, const float*, uint8_t* codes, uint8_t* out) {
  float amax;
  const float max_scale = first_absmax16(scales, amax);
  uint8_t* hmask = out;
  uint8_t* qs = out + 32;
  uint8_t* s = out + 96;
  std::memset(s, 0, 12);
  uint16_t d16 = 0;
  if (max_scale != 0.f) {
    const float iscale = -32.f / max_scale;
    for (int j = 0; j < 16; ++j) {
      // Truncated to int8 before the clamp, as the reference does.
      int l = static_cast<int8_t>(nearest_int_scalar(iscale * scales[j]));
      l = std::clamp(l, -32, 31) + 32;
      if (j < 8) {
        s[j] = l & 15;
      } else {
        s[j - 8] |= (l & 15) << 4;
      }
      s[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
    }
    d16 = fp16_saturated(1 / iscale);
  }
  const float d = fp16_value(d16);
  for (int j = 0; j < 16; ++j) {
    const int sc = ((j < 8 ? s[j] & 15 : s[j - 8] >> 4) | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
    const float step = d * static_cast<float>(sc);
    if (step == 0.f) continue;
    for (int l = 0; l < 16; ++l) {
      codes[16 * j + l] = static_cast<uint8_t>(std::clamp(nearest_int_scalar(x[16 * j + l] / step), -4, 3) + 4);
    }
  }
  std::memset(hmask, 0, 32);
  for (int j = 0; j < 256; ++j) hmask[j % 32] |= (codes[j] >> 2) << (j / 32);
  for (int h = 0; h < 2; ++h) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t* q = codes + 128 * h + l;
      qs[32 * h + l] = (q[0] & 3) | ((q[32] & 3) << 2) | ((q[64] & 3) << 4) | ((q[96] & 3) << 6);
    }
  }
  std::memcpy(out + 108, &d16, 2);
}

// quantize_row_q6_K_ref after the searches: int8 scales against the scale of largest magnitude
// (-128 steps), fp16 d, codes 0..63 recomputed against them; a block whose scales are all below
// GROUP_MAX_EPS is stored as zero bytes.
void q6k_finish(const float* x, const float* scales, const float*, uint8_t* codes, uint8_t* out) {
  float amax;
  const float max_scale = first_absmax16(scales, amax);
  if (amax < 1e-15f) {
    std::memset(out, 0, 210);
    return;
  }
  const float iscale = -128.f / max_scale;
  const uint16_t d16 = fp16_saturated(1 / iscale);
  int8_t* sc = reinterpret_cast<int8_t*>(out + 192);
  for (int j = 0; j < 16; ++j) sc[j] = static_cast<int8_t>(std::min(127, nearest_int_scalar(iscale * scales[j])));
  const float d = fp16_value(d16);
  for (int j = 0; j < 16; ++j) {
    const float step = d * static_cast<float>(sc[j]);
    if (step == 0.f) continue;
    for (int l = 0; l < 16; ++l) {
      codes[16 * j + l] = static_cast<uint8_t>(std::clamp(nearest_int_scalar(x[16 * j + l] / step), -32, 31) + 32);
    }
  }
  uint8_t* ql = out;
  uint8_t* qh = out + 128;
  for (int h = 0; h < 2; ++h) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t* q = codes + 128 * h + l;
      ql[64 * h + l] = (q[0] & 15) | ((q[64] & 15) << 4);
      ql[64 * h + 32 + l] = (q[32] & 15) | ((q[96] & 15) << 4);
      qh[32 * h + l] = (q[0] >> 4) | ((q[32] >> 4) << 2) | ((q[64] >> 4) << 4) | ((q[96] >> 4) << 6);
    }
  }
  std::memcpy(out + 208, &d16, 2);
}

// Super-blocks [b0, b1) of x, 16 at a time: the searches of their sub-blocks L at a time (the
// last group padded with zeros when L does not divide it), then each super-block's finish.
template <class Format, int L>
TK_INLINE void kquant_lanes(const float* x, int64_t b0, int64_t b1, uint8_t* out) {
  constexpr int kChunk = 16, kSub = Format::kSub, kPerBlock = 256 / kSub;
  static_assert((kPerBlock * kChunk) % L == 0, "a chunk's sub-blocks fill whole groups of lanes");
  alignas(64) float scales[kPerBlock * kChunk], mins[kPerBlock * kChunk], pad[kSub * L];
  alignas(64) uint8_t codes[256 * kChunk];
  for (int64_t c0 = b0; c0 < b1; c0 += kChunk) {
    const int nsub = kPerBlock * static_cast<int>(std::min<int64_t>(kChunk, b1 - c0));
    const float* xc = x + c0 * 256;
    for (int s = 0; s < nsub; s += L) {
      const float* src = xc + kSub * s;
      if (s + L > nsub) {
        std::fill(pad, pad + kSub * L, 0.f);
        std::copy(src, src + kSub * (nsub - s), pad);
        src = pad;
      }
      Format::template search<L>(src, scales + s, mins + s, codes + kSub * s);
    }
    for (int b = 0; b < nsub / kPerBlock; ++b) {
      Format::finish(xc + 256 * b, scales + kPerBlock * b, mins + kPerBlock * b, codes + 256 * b,
                     out + (c0 + b) * Format::kBlockBytes);
    }
  }
}

// quantize_row_q8_0_ref on blocks [b0, b1), L weights at a time: d = amax/127, id = 1/d (0 when d
// is 0), q = roundf(x * id) (half away from zero), then d stored as fp16.
template <int L>
TK_INLINE void q8_0_quantize_lanes(const float* x, int64_t b0, int64_t b1, uint8_t* out) {
  using F = typename Lanes<L>::F;
  using I = typename Lanes<L>::I;
  static_assert(32 % L == 0, "a block fills whole vectors");
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = x + 32 * b;
    uint8_t* ob = out + 34 * b;
    F v[32 / L];
    F amax_v = F{} + 0.f;
    for (int c = 0; c < 32 / L; ++c) {
      std::memcpy(&v[c], xb + L * c, sizeof(F));
      const F a = (F)((I)v[c] & 0x7fffffff);
      amax_v = a > amax_v ? a : amax_v;
    }
    float amax = 0.f;  // max is exact: any order gives the reference's value
    for (int i = 0; i < L; ++i) amax = std::max(amax, amax_v[i]);
    const float d = amax / 127;
    const float id = d != 0.f ? 1.0f / d : 0.0f;
    const uint16_t d16 = c10::detail::fp16_ieee_from_fp32_value(d);
    std::memcpy(ob, &d16, 2);
    for (int c = 0; c < 32 / L; ++c) {
      const F y = v[c] * id;
      // roundf: |y| <= 127 (and then some), so truncation through int32 is exact and y - t too.
      const F t = __builtin_convertvector(__builtin_convertvector(y, I), F);
      const F frac = (F)((I)(y - t) & 0x7fffffff);
      const F one = (F)(((I)y & (int32_t)0x80000000) | 0x3f800000);  // copysign(1, y)
      const I q = __builtin_convertvector(frac >= 0.5f ? t + one : t, I);
      for (int i = 0; i < L; ++i) ob[2 + L * c + i] = static_cast<uint8_t>(static_cast<int8_t>(q[i]));
    }
  }
}

// quantize_row_q4_0_ref and quantize_row_q5_0_ref (kBits 4, 5) on blocks [b0, b1): d = the
// weight of largest magnitude (the first of equals) over -2^(kBits-1), codes
// min(2^kBits - 1, trunc(x/d + 2^(kBits-1) + 0.5)); Q5_0 keeps bit 4 of code j in bit j of qh.
template <int kBits>
TK_INLINE void symmetric_quantize(const float* x, int64_t b0, int64_t b1, uint8_t* out) {
  constexpr int kBytes = kBits == 4 ? 18 : 22, kMax = (1 << kBits) - 1;
  constexpr float kHalf = static_cast<float>(1 << (kBits - 1));
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = x + 32 * b;
    uint8_t* ob = out + kBytes * b;
    float amax = 0.f, max = 0.f;
    for (int j = 0; j < 32; ++j) {
      if (amax < std::fabs(xb[j])) {
        amax = std::fabs(xb[j]);
        max = xb[j];
      }
    }
    const float d = max / -kHalf;
    const float id = d != 0.f ? 1.0f / d : 0.0f;
    const uint16_t d16 = c10::detail::fp16_ieee_from_fp32_value(d);
    std::memcpy(ob, &d16, 2);
    uint8_t* qs = ob + (kBits == 4 ? 2 : 6);
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      // Truncation toward zero, as the reference's (int8_t) cast; the sums lie in [0, 2^kBits + 1).
      const int q0 = std::min(kMax, static_cast<int>(xb[j] * id + (kHalf + 0.5f)));
      const int q1 = std::min(kMax, static_cast<int>(xb[j + 16] * id + (kHalf + 0.5f)));
      qs[j] = static_cast<uint8_t>((q0 & 15) | ((q1 & 15) << 4));
      qh |= static_cast<uint32_t>(q0 >> 4 & 1) << j | static_cast<uint32_t>(q1 >> 4 & 1) << (j + 16);
    }
    if (kBits == 5) std::memcpy(ob + 2, &qh, 4);
  }
}

// quantize_row_q4_1_ref and quantize_row_q5_1_ref: d = (max - min) / (2^kBits - 1), m = min,
// codes trunc((x - min)/d + 0.5) (never past 2^kBits - 1: the clamp is a guard).
template <int kBits>
TK_INLINE void affine_quantize(const float* x, int64_t b0, int64_t b1, uint8_t* out) {
  constexpr int kBytes = kBits == 4 ? 20 : 24, kMax = (1 << kBits) - 1;
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = x + 32 * b;
    uint8_t* ob = out + kBytes * b;
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < 32; ++j) {
      if (xb[j] < min) min = xb[j];
      if (xb[j] > max) max = xb[j];
    }
    const float d = (max - min) / static_cast<float>(kMax);
    const float id = d != 0.f ? 1.0f / d : 0.0f;
    const uint16_t d16 = c10::detail::fp16_ieee_from_fp32_value(d), m16 = c10::detail::fp16_ieee_from_fp32_value(min);
    std::memcpy(ob, &d16, 2);
    std::memcpy(ob + 2, &m16, 2);
    uint8_t* qs = ob + (kBits == 4 ? 4 : 8);
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      const int q0 = std::min(kMax, static_cast<int>((xb[j] - min) * id + 0.5f));
      const int q1 = std::min(kMax, static_cast<int>((xb[j + 16] - min) * id + 0.5f));
      qs[j] = static_cast<uint8_t>((q0 & 15) | ((q1 & 15) << 4));
      qh |= static_cast<uint32_t>(q0 >> 4 & 1) << j | static_cast<uint32_t>(q1 >> 4 & 1) << (j + 16);
    }
    if (kBits == 5) std::memcpy(ob + 4, &qh, 4);
  }
}

// The 32-weight formats quantize one block per step in scalar code (L unused): each block is a
// few dozen operations, well below the cost of reading x. Unlike Q4_K they follow the reference
// at the range ends too (a d past the largest fp16 is stored as Inf): the Python front checks x.
template <int kBits, bool kAffine>
struct LegacyQuant {
  static constexpr int64_t kBlock = 32, kGrain = 2048;
  static constexpr int64_t kBlockBytes = 2 + (kAffine ? 2 : 0) + (kBits == 5 ? 4 : 0) + 16;
  template <int L>
  static TK_INLINE void run(const float* x, int64_t b0, int64_t b1, uint8_t* out) {
    if constexpr (kAffine) {
      affine_quantize<kBits>(x, b0, b1, out);
    } else {
      symmetric_quantize<kBits>(x, b0, b1, out);
    }
  }
};

// One record per format: block geometry, how many blocks a task takes, its quantizer for L lanes.
// The K-quants: sub-block size, the search over L sub-blocks and the per-super-block finish.
template <class Format>
struct KQuant {
  static constexpr int64_t kBlock = 256, kBlockBytes = Format::kBlockBytes, kGrain = 64;
  template <int L>
  static TK_INLINE void run(const float* x, int64_t b0, int64_t b1, uint8_t* out) {
    kquant_lanes<Format, L>(x, b0, b1, out);
  }
};

struct Q2KSteps {
  static constexpr int kSub = 16, kBlockBytes = 84;
  template <int L>
  static TK_INLINE void search(const float* x, float* scales, float* mins, uint8_t* codes) {
    qkx2_search<L, 16, 3, 15, true, false>(x, -0.5f, scales, mins, codes);
  }
  static void finish(const float* x, const float* s, const float* m, uint8_t* c, uint8_t* o) {
    q2k_finish(x, s, m, c, o);
  }
};

struct Q3KSteps {
  static constexpr int kSub = 16, kBlockBytes = 110;
  template <int L>
  static TK_INLINE void search(const float* x, float* scales, float*, uint8_t* codes) {
    q3_search<L>(x, scales, codes);
  }
  static void finish(const float* x, const float* s, const float* m, uint8_t* c, uint8_t* o) {
    q3k_finish(x, s, m, c, o);
  }
};

struct Q4KSteps {
  static constexpr int kSub = 32, kBlockBytes = 144;
  template <int L>
  static TK_INLINE void search(const float* x, float* scales, float* mins, uint8_t* codes) {
    qkx2_search<L, 32, 15, 20, false, true>(x, -1.f, scales, mins, codes);
  }
  static void finish(const float* x, const float* s, const float* m, uint8_t* c, uint8_t* o) {
    q4k_finish(x, s, m, c, o);
  }
};

struct Q5KSteps {
  static constexpr int kSub = 32, kBlockBytes = 176;
  template <int L>
  static TK_INLINE void search(const float* x, float* scales, float* mins, uint8_t* codes) {
    qkx2_search<L, 32, 31, 15, false, true>(x, -0.5f, scales, mins, codes);
  }
  static void finish(const float* x, const float* s, const float* m, uint8_t* c, uint8_t* o) {
    q5k_finish(x, s, m, c, o);
  }
};

struct Q6KSteps {
  static constexpr int kSub = 16, kBlockBytes = 210;
  template <int L>
  static TK_INLINE void search(const float* x, float* scales, float*, uint8_t* codes) {
    qx_search<L>(x, scales, codes);
  }
  static void finish(const float* x, const float* s, const float* m, uint8_t* c, uint8_t* o) {
    q6k_finish(x, s, m, c, o);
  }
};

using Q4KQuant = KQuant<Q4KSteps>;

struct Q8_0Quant {
  static constexpr int64_t kBlock = 32, kBlockBytes = 34, kGrain = 2048;
  template <int L>
  static TK_INLINE void run(const float* x, int64_t b0, int64_t b1, uint8_t* out) {
    q8_0_quantize_lanes<L>(x, b0, b1, out);
  }
};

// A format's quantizer at each SIMD width: 8 lanes with AVX2, 4 in the baseline ISA. Vectors
// wider than the registers (16 lanes in ymm or zmm) spill the search's 4x32 vectors and run
// slower.
using QuantizeRange = void (*)(const float*, int64_t, int64_t, uint8_t*);

#if defined(__x86_64__)
template <class Format>
TK_AVX2 void quantize_avx2(const float* x, int64_t b0, int64_t b1, uint8_t* out) {
  Format::template run<8>(x, b0, b1, out);
}
#endif

template <class Format>
void quantize_baseline(const float* x, int64_t b0, int64_t b1, uint8_t* out) {
  Format::template run<4>(x, b0, b1, out);
}

// x float32 [..., K] (K a multiple of the block; finite and within the format's range, which the
// Python front checks) -> blocks uint8 [..., K/block*bytes], blocks split across the threads.
template <class Format>
at::Tensor block_quantize(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type(), " with shape ",
              x.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % Format::kBlock == 0, op, ": x of shape ", x.sizes(),
              " must end in a dim that is a multiple of ", Format::kBlock);
  check_devices(op, c10::DeviceType::CPU, {{"x", &x}});
  const at::Tensor xc = x.contiguous();
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = sizes.back() / Format::kBlock * Format::kBlockBytes;
  at::Tensor out = at::empty(sizes, x.options().dtype(at::kByte));
  QuantizeRange fn = quantize_baseline<Format>;
#if defined(__x86_64__)
  if (has_avx2_fma()) fn = quantize_avx2<Format>;
#endif
  const float* src = xc.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, x.numel() / Format::kBlock, Format::kGrain,
                   [&](int64_t b0, int64_t b1) { fn(src, b0, b1, dst); });
  return out;
}

at::Tensor q4k_quantize(const at::Tensor& x) { return block_quantize<Q4KQuant>("q4k_quantize", x); }

at::Tensor q8_0_quantize(const at::Tensor& x) { return block_quantize<Q8_0Quant>("q8_0_quantize", x); }

}  // namespace

at::Tensor quantize_native(const char* op, const at::Tensor& x, int64_t ggml_type) {
  switch (ggml_type) {
    case 2: return block_quantize<LegacyQuant<4, false>>(op, x);
    case 3: return block_quantize<LegacyQuant<4, true>>(op, x);
    case 6: return block_quantize<LegacyQuant<5, false>>(op, x);
    case 7: return block_quantize<LegacyQuant<5, true>>(op, x);
    case 8: return block_quantize<Q8_0Quant>(op, x);
    case 10: return block_quantize<KQuant<Q2KSteps>>(op, x);
    case 11: return block_quantize<KQuant<Q3KSteps>>(op, x);
    case 12: return block_quantize<Q4KQuant>(op, x);
    case 13: return block_quantize<KQuant<Q5KSteps>>(op, x);
    case 14: return block_quantize<KQuant<Q6KSteps>>(op, x);
    default: return at::Tensor();
  }
}

TORCH_LIBRARY_IMPL(tinykern, CPU, m) {
  m.impl("q4k_quantize", &q4k_quantize);
  m.impl("q8_0_quantize", &q8_0_quantize);
}

}  // namespace tinykern::cpu
