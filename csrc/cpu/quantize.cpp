// Q4_K and Q8_0 quantization on CPU: ports of GGML's reference quantizers (quantize_row_q4_K_ref,
// quantize_row_q8_0_ref) that give the same bytes. Each SIMD lane runs one 32-weight sub-block
// (or Q8_0 block) through the reference's sequence of fp32 operations in the reference's order,
// so vectorizing across sub-blocks changes no rounding; the build compiles with
// -ffp-contract=off so that no multiply-add is fused. Layout: shared/docs/q4k-format.md.
//
// Two rules of tinykern's own, where the reference stores no finite or exact value:
// - d and dmin saturate at the largest fp16 instead of becoming Inf (weights at the range ends);
// - a block of 256 copies of one non-zero fp16-representable value c stores it exactly
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

// make_qkx2_quants(32, 15, x, weights, L, &the_min, Laux, -1, 0.1, 20, false) with weights
// rms(x) + |x_l|, for L sub-blocks at once: x holds them one after another (32*L floats).
// Writes each one's scale, -min and 32 codes (sub-block major).
template <int L>
TK_INLINE void q4k_search(const float* x, float* scale_out, float* neg_min_out, uint8_t* codes) {
  using F = typename Lanes<L>::F;
  using I = typename Lanes<L>::I;
  alignas(64) float t[32][L];
  for (int i = 0; i < L; ++i) {
    for (int l = 0; l < 32; ++l) t[l][i] = x[32 * i + l];
  }
  F xv[32], w[32], lbest[32], laux[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&xv[l], t[l], sizeof(F));

  F sum_x2 = F{} + 0.f;
  for (int l = 0; l < 32; ++l) sum_x2 += xv[l] * xv[l];
  F av = sum_x2 / 32.f;
  for (int i = 0; i < L; ++i) av[i] = std::sqrt(av[i]);
  for (int l = 0; l < 32; ++l) w[l] = av + (F)((I)xv[l] & 0x7fffffff);

  F mn = xv[0], mx = xv[0], sum_w = w[0], sum_x = w[0] * xv[0];
  for (int l = 1; l < 32; ++l) {
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

  F iscale = 15.f / (mx - mn);
  F scale = 1.f / iscale;
  F best_error = F{} + 0.f;
  for (int l = 0; l < 32; ++l) {
    lbest[l] = __builtin_convertvector(clamp_code(nearest_int<F, I>(iscale * (xv[l] - mn)), 15), F);
    F diff = scale * lbest[l] + mn - xv[l];
    diff = diff * diff;
    best_error += w[l] * diff;
  }
  for (int is = 0; is <= 20; ++is) {
    const float rmin = -1.f, rdelta = 0.1f, nmax = 15;
    iscale = (rmin + rdelta * static_cast<float>(is) + nmax) / (mx - mn);
    F sum_l = F{} + 0.f, sum_l2 = F{} + 0.f, sum_xl = F{} + 0.f;
    for (int l = 0; l < 32; ++l) {
      laux[l] = __builtin_convertvector(clamp_code(nearest_int<F, I>(iscale * (xv[l] - mn)), 15), F);
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
    for (int l = 0; l < 32; ++l) {
      F diff = this_scale * laux[l] + this_min - xv[l];
      diff = diff * diff;
      cur_error += w[l] * diff;
    }
    const I better = (det > 0.f) & (cur_error < best_error);
    for (int l = 0; l < 32; ++l) lbest[l] = better ? laux[l] : lbest[l];
    best_error = better ? cur_error : best_error;
    scale = better ? this_scale : scale;
    mn = better ? this_min : mn;
  }
  scale = flat ? F{} + 0.f : scale;
  mn = flat ? flat_min : mn;
  std::memcpy(scale_out, &scale, sizeof(F));
  const F neg_min = -mn;
  std::memcpy(neg_min_out, &neg_min, sizeof(F));
  for (int l = 0; l < 32; ++l) {
    const I q = flat ? I{} : __builtin_convertvector(lbest[l], I);
    for (int i = 0; i < L; ++i) codes[32 * i + l] = static_cast<uint8_t>(q[i]);
  }
}

bool fp16_exact(float v) {
  return c10::detail::fp16_ieee_to_fp32_value(c10::detail::fp16_ieee_from_fp32_value(v)) == v;
}

uint16_t fp16_saturated(float v) {
  return c10::detail::fp16_ieee_from_fp32_value(std::min(v, 65504.f));
}

// The rest of quantize_row_q4_K_ref for one super-block, given its sub-blocks' search results:
// 6-bit scales and mins against their maxima, fp16 d and dmin, codes recomputed against the
// stored values (sub-blocks whose stored scale is 0 keep the search's codes).
void q4k_finish(const float* x, const float* scales, const float* mins, uint8_t* codes, uint8_t* out) {
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  uint8_t sc[8], m[8];
  for (int j = 0; j < 8; ++j) {
    // Truncated to a byte before the clamp, as the reference does.
    sc[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int_scalar(inv_scale * scales[j])));
    m[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int_scalar(inv_min * mins[j])));
  }
  uint16_t d16 = fp16_saturated(max_scale / 63.f), dmin16 = fp16_saturated(max_min / 63.f);

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
    const float d = c10::detail::fp16_ieee_to_fp32_value(d16), dmin = c10::detail::fp16_ieee_to_fp32_value(dmin16);
    for (int j = 0; j < 8; ++j) {
      const float step = d * static_cast<float>(sc[j]);
      if (step == 0.f) continue;
      const float offset = dmin * static_cast<float>(m[j]);
      for (int l = 0; l < 32; ++l) {
        codes[32 * j + l] = static_cast<uint8_t>(std::clamp(nearest_int_scalar((x[32 * j + l] + offset) / step), 0, 15));
      }
    }
  }
  std::memcpy(out, &d16, 2);
  std::memcpy(out + 2, &dmin16, 2);
  uint8_t* s = out + 4;
  for (int j = 0; j < 4; ++j) {
    s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
    s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
    s[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
  }
  for (int c4 = 0; c4 < 4; ++c4) {
    for (int l = 0; l < 32; ++l) out[16 + 32 * c4 + l] = codes[64 * c4 + l] | (codes[64 * c4 + 32 + l] << 4);
  }
}

// Super-blocks [b0, b1) of x, 16 at a time: the searches of their sub-blocks L at a time (the
// last group padded with zeros when L does not divide it), then each super-block's finish.
template <int L>
TK_INLINE void q4k_quantize_lanes(const float* x, int64_t b0, int64_t b1, uint8_t* out) {
  constexpr int kChunk = 16;
  static_assert((8 * kChunk) % L == 0, "a chunk's sub-blocks fill whole groups of lanes");
  alignas(64) float scales[8 * kChunk], mins[8 * kChunk], pad[32 * L];
  alignas(64) uint8_t codes[256 * kChunk];
  for (int64_t c0 = b0; c0 < b1; c0 += kChunk) {
    const int nsub = 8 * static_cast<int>(std::min<int64_t>(kChunk, b1 - c0));
    const float* xc = x + c0 * 256;
    for (int s = 0; s < nsub; s += L) {
      const float* src = xc + 32 * s;
      if (s + L > nsub) {
        std::fill(pad, pad + 32 * L, 0.f);
        std::copy(src, src + 32 * (nsub - s), pad);
        src = pad;
      }
      q4k_search<L>(src, scales + s, mins + s, codes + 32 * s);
    }
    for (int b = 0; b < nsub / 8; ++b) {
      q4k_finish(xc + 256 * b, scales + 8 * b, mins + 8 * b, codes + 256 * b, out + (c0 + b) * 144);
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
struct Q4KQuant {
  static constexpr int64_t kBlock = 256, kBlockBytes = 144, kGrain = 64;
  template <int L>
  static TK_INLINE void run(const float* x, int64_t b0, int64_t b1, uint8_t* out) {
    q4k_quantize_lanes<L>(x, b0, b1, out);
  }
};

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
    case 12: return block_quantize<Q4KQuant>(op, x);
    default: return at::Tensor();
  }
}

TORCH_LIBRARY_IMPL(tinykern, CPU, m) {
  m.impl("q4k_quantize", &q4k_quantize);
  m.impl("q8_0_quantize", &q8_0_quantize);
}

}  // namespace tinykern::cpu
