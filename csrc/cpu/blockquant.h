// What the CPU kernels of the block formats (Q4_K, Q8_0) share: fp16 reads, AVX2 store and sum
// helpers, and the matmul driver that picks between int8 dots on x rounded to int8 (small M,
// not exact), on-the-fly decoding in fp32 (small M), a bf16 GEMM on bf16 hardware and tiles of
// dequantized rows fed to the BLAS (large M).
#pragma once

// First, so that this is the first inclusion of the intrinsics headers in the TU.
#if defined(__x86_64__)
// GCC 12 flags the deliberately undefined pass-through operands inside its own AVX-512
// intrinsics (-Wuninitialized); those warnings point at these header lines.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
// The SIMD functions carry their own target, so the rest of the build stays generic x86-64 and
// the path is chosen at run time with has_avx2_fma().
#define TK_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TK_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/checks.h"
#include "cpu/simd.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the block formats are read as little-endian words");

namespace tinykern::cpu {

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

#if defined(__x86_64__)
TK_AVX2 inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }

TK_AVX2 inline void store8(c10::Half* dst, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// Round to nearest even, as c10::BFloat16(float) does (NaN becomes the quiet NaN 0x7FC0).
TK_AVX2 inline void store8(c10::BFloat16* dst, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), packed);
}

TK_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#endif

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs fn(T*) (a null pointer, for its type) with T the C++ type of an fp32/fp16/bf16 dtype
// (checked by the caller).
template <class Fn>
void dispatch_float_out(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kFloat) {
    fn(static_cast<float*>(nullptr));
  } else if (dtype == at::kHalf) {
    fn(static_cast<c10::Half*>(nullptr));
  } else {
    fn(static_cast<c10::BFloat16*>(nullptr));
  }
}

// dst[i*kBlock ...] = the blocks in[i*kBlockBytes ...], i < count, over all threads.
template <class Format, typename T>
void dequant_blocks(const uint8_t* in, int64_t count, T* dst) {
  const bool simd = has_avx2_fma();
  // ~64 KB of output per task.
  at::parallel_for(0, count, 16384 / Format::kBlock, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      Format::template dequant_block<T>(in + i * Format::kBlockBytes, dst + i * Format::kBlock, simd);
    }
  });
}

// Dequantizes every block of `blocks` with Format::dequant_block<T>(block, out).
template <class Format>
at::Tensor block_dequantize(const char* op, const at::Tensor& blocks, at::ScalarType dtype) {
  const int64_t count = check_blocks(op, blocks, Format::kBlockBytes, c10::DeviceType::CPU);
  check_output_dtype(op, dtype);
  const at::Tensor src = blocks.contiguous();
  std::vector<int64_t> sizes = blocks.sizes().vec();
  sizes.back() = sizes.back() / Format::kBlockBytes * Format::kBlock;
  at::Tensor out = at::empty(sizes, blocks.options().dtype(dtype));
  dispatch_float_out(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dequant_blocks<Format>(src.data_ptr<uint8_t>(), count, static_cast<T*>(out.data_ptr()));
  });
  return out;
}

// out [M, N] fp32 = x32[:, :K] @ dequant(w).T, with each task dequantizing a tile of weight rows
// into an L2-sized fp32 buffer and multiplying it into its own column slab of out (the BLAS
// writes the slab in place, row stride N; single-threaded inside the task): the dense weight
// never exists as a whole, and neither does a transposed copy of the output.
template <class Format>
at::Tensor tiled_matmul(const at::Tensor& x32, int64_t k, const uint8_t* w, int64_t n, int64_t nb) {
  const int64_t kp = nb * Format::kBlock;
  // ~1 MB of fp32 rows per tile; independent of the thread count, so that the BLAS sees the
  // same shapes and the result the same bits however many threads run.
  const int64_t tile = std::clamp<int64_t>((256 << 10) / kp, 8, 256);
  at::Tensor out = at::empty({x32.size(0), n}, x32.options());
  const at::Tensor xk = x32.narrow(1, 0, k);
  at::parallel_for(0, ceil_div(n, tile), 1, [&](int64_t t0, int64_t t1) {
    at::Tensor buf = at::empty({tile, kp}, x32.options());
    float* b = buf.data_ptr<float>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, rows = std::min(tile, n - n0);
      // Inside this task's thread: parallel_for runs inline in a parallel region.
      dequant_blocks<Format>(w + n0 * nb * Format::kBlockBytes, rows * nb, b);
      at::Tensor o = out.narrow(1, n0, rows);
      at::cpu::mm_out(o, xk, buf.narrow(0, 0, rows).narrow(1, 0, k).t());
    }
  });
  return out;
}

// out [M, N] bf16 = xb [M, K] @ dequant(w)[:, :K].T (+ bias16) on oneDNN's bf16 GEMM (AMX or AVX512-BF16, fp32
// accumulation): tiles of up to 2^22 weights (8 MB of bf16), one after another, each dequantized
// by all threads and then multiplied by all threads into its column slab of out, the bias slice
// fused. oneDNN packs x again for every GEMM, so the tiles are as large as a transient buffer
// may be: whole weights up to 4M parameters (all of SD1.5's but the 3x3 convs at 1280
// channels, which take four GEMMs).
template <class Format>
at::Tensor bf16_matmul(const at::Tensor& xb, const uint8_t* w, int64_t n, int64_t nb,
                       const c10::optional<at::Tensor>& bias16) {
  const int64_t kp = nb * Format::kBlock, k = xb.size(1);
  const int64_t tile = std::min(n, std::max<int64_t>(1, (1 << 22) / kp));
  at::Tensor out = at::empty({xb.size(0), n}, xb.options());
  at::Tensor buf = at::empty({tile, kp}, xb.options());
  for (int64_t n0 = 0; n0 < n; n0 += tile) {
    const int64_t rows = std::min(tile, n - n0);
    dequant_blocks<Format>(w + n0 * nb * Format::kBlockBytes, rows * nb, buf.data_ptr<c10::BFloat16>());
    at::Tensor o = out.narrow(1, n0, rows);
    const at::Tensor wt = buf.narrow(0, 0, rows).narrow(1, 0, k).t();
    if (bias16.has_value()) {
      at::cpu::addmm_out(o, bias16->narrow(0, n0, rows), xb, wt);
    } else {
      at::cpu::mm_out(o, xb, wt);
    }
  }
  return out;
}

// From this many rows of x, bf16_matmul beats tiled_matmul: below, decoding the whole weight to
// bf16 and converting x and out cost more than the bf16 GEMM saves over fp32.
constexpr int64_t kBf16MinRows = 256;

// The q*_matmul op, by rows of x. Unless `exact`, below Format::int8_max_rows() (the formats
// with an int8 kernel: Q4_K, Q8_0): Format::gemv_int8, x rounded to int8 per block as ggml's CPU
// backend rounds its activations (the same error, see int8_dot.h). Else below
// Format::kTileMinRows: fp32 x zero-padded to whole blocks (the kernels never read x past K)
// into Format::gemv. From kBf16MinRows: bf16_matmul where the CPU multiplies bf16 in hardware (has_bf16_gemm()), unless `exact` or x is fp16 (whose 11-bit
// mantissa bf16 would cut to 8): x, the weight and the bias rounded to bf16, fp32 accumulation,
// the output rounded to bf16. Otherwise tiled_matmul in fp32 with the bias added after. Then
// the cast to x.dtype.
template <class Format>
at::Tensor block_matmul(const char* op, const at::Tensor& x, const at::Tensor& w,
                        const c10::optional<at::Tensor>& bias, bool exact) {
  const MatmulShape s = check_matmul(op, Format::kBlock, Format::kBlockBytes, x, w, bias, c10::DeviceType::CPU);
  const at::Tensor wc = w.contiguous();
  const bool wide = s.m >= Format::kTileMinRows && s.nb > 0;
  if (s.m >= kBf16MinRows && s.nb > 0 && !exact && x.scalar_type() != at::kHalf && has_bf16_gemm()) {
    const c10::optional<at::Tensor> bias16 =
        bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kBFloat16)) : c10::nullopt;
    return bf16_matmul<Format>(x.to(at::kBFloat16), wc.data_ptr<uint8_t>(), s.n, s.nb, bias16).to(x.scalar_type());
  }
  at::Tensor out;
  if constexpr (requires { Format::int8_max_rows(); }) {
    if (!exact && s.m > 0 && s.nb > 0 && s.m < Format::int8_max_rows()) {
      // x rounded to int8 per block (int8_dot.h): within ggml's own error, see Format::gemv_int8.
      const at::Tensor xf = x.to(at::kFloat).contiguous();
      out = at::empty({s.m, s.n}, xf.options());
      Format::gemv_int8(xf.data_ptr<float>(), s.m, s.k, wc.data_ptr<uint8_t>(), s.n, s.nb, out.data_ptr<float>());
      if (bias.has_value()) out.add_(bias->to(at::kFloat));
      return out.to(x.scalar_type());
    }
  }
  at::Tensor x32 = at::zeros({s.m, s.nb * Format::kBlock}, x.options().dtype(at::kFloat));
  x32.narrow(1, 0, s.k).copy_(x);
  if (!wide) {
    out = at::empty({s.m, s.n}, x32.options());
    Format::gemv(x32.data_ptr<float>(), s.m, wc.data_ptr<uint8_t>(), s.n, s.nb, out.data_ptr<float>());
  } else {
    out = tiled_matmul<Format>(x32, s.k, wc.data_ptr<uint8_t>(), s.n, s.nb);
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type());
}

// The block_* ops (block_ops.cpp) reach the formats whose kernels live in their own translation
// units through these, `op` naming the op in errors.
at::Tensor q4k_dequantize_as(const char* op, const at::Tensor& blocks, at::ScalarType dtype);
at::Tensor q4k_matmul_as(const char* op, const at::Tensor& x, const at::Tensor& w,
                         const c10::optional<at::Tensor>& bias, bool exact);
at::Tensor q8_0_dequantize_as(const char* op, const at::Tensor& blocks, at::ScalarType dtype);
at::Tensor q8_0_matmul_as(const char* op, const at::Tensor& x, const at::Tensor& w,
                          const c10::optional<at::Tensor>& bias, bool exact);
// GGML's reference quantizer of `ggml_type` (quantize.cpp), or an undefined tensor where this
// build has none for the type.
at::Tensor quantize_native(const char* op, const at::Tensor& x, int64_t ggml_type);

}  // namespace tinykern::cpu
