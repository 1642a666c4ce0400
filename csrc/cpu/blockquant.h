// What the CPU kernels of the block formats (Q4_K, Q8_0) share: fp16 reads, AVX2 store and sum
// helpers, and the matmul driver that picks between on-the-fly decoding (small M), a bf16 GEMM
// on AMX and tiles of dequantized rows fed to the BLAS (large M).
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
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
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

// Dequantizes every block of `blocks` with Format::dequant_block<T>(block, out).
template <class Format>
at::Tensor block_dequantize(const char* op, const at::Tensor& blocks, at::ScalarType dtype) {
  const int64_t count = check_blocks(op, blocks, Format::kBlockBytes, c10::DeviceType::CPU);
  check_output_dtype(op, dtype);
  const at::Tensor src = blocks.contiguous();
  std::vector<int64_t> sizes = blocks.sizes().vec();
  sizes.back() = sizes.back() / Format::kBlockBytes * Format::kBlock;
  at::Tensor out = at::empty(sizes, blocks.options().dtype(dtype));
  const uint8_t* in = src.data_ptr<uint8_t>();
  const bool simd = has_avx2_fma();
  dispatch_float_out(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T* dst = static_cast<T*>(out.data_ptr());
    // ~64 KB of output per task.
    at::parallel_for(0, count, 16384 / Format::kBlock, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        Format::template dequant_block<T>(in + i * Format::kBlockBytes, dst + i * Format::kBlock, simd);
      }
    });
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
  const bool simd = has_avx2_fma();
  at::parallel_for(0, ceil_div(n, tile), 1, [&](int64_t t0, int64_t t1) {
    at::Tensor buf = at::empty({tile, kp}, x32.options());
    float* b = buf.data_ptr<float>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, rows = std::min(tile, n - n0);
      for (int64_t i = 0; i < rows * nb; ++i) {
        Format::template dequant_block<float>(w + (n0 * nb + i) * Format::kBlockBytes, b + i * Format::kBlock, simd);
      }
      at::Tensor o = out.narrow(1, n0, rows);
      at::cpu::mm_out(o, xk, buf.narrow(0, 0, rows).narrow(1, 0, k).t());
    }
  });
  return out;
}

// The q*_matmul op, by rows of x. Below Format::kTileMinRows: fp32 x zero-padded to whole
// blocks (the kernels never read x past K) into Format::gemv. Above, unless `exact`, where the
// CPU has AMX-BF16 (has_amx_bf16()): the weight dequantized to bf16 as a whole, then one oneDNN
// bf16 GEMM (fp32 accumulation, bias added and the result rounded in bf16, cast to x.dtype);
// otherwise tiles of fp32 dequantized rows on the BLAS with the bias added in fp32.
template <class Format>
at::Tensor block_matmul(const char* op, const at::Tensor& x, const at::Tensor& w,
                        const c10::optional<at::Tensor>& bias, bool exact) {
  const MatmulShape s = check_matmul(op, Format::kBlock, Format::kBlockBytes, x, w, bias, c10::DeviceType::CPU);
  const at::Tensor wc = w.contiguous();
  const bool wide = s.m >= Format::kTileMinRows && s.nb > 0;
  if (wide && !exact && has_amx_bf16()) {
    const at::Tensor wt = block_dequantize<Format>(op, wc, at::kBFloat16).narrow(1, 0, s.k).t();
    const at::Tensor xb = x.to(at::kBFloat16);
    const at::Tensor out = bias.has_value() ? at::addmm(bias->to(at::kBFloat16), xb, wt) : at::mm(xb, wt);
    return out.to(x.scalar_type());
  }
  at::Tensor x32 = at::zeros({s.m, s.nb * Format::kBlock}, x.options().dtype(at::kFloat));
  x32.narrow(1, 0, s.k).copy_(x);
  at::Tensor out;
  if (!wide) {
    out = at::empty({s.m, s.n}, x32.options());
    Format::gemv(x32.data_ptr<float>(), s.m, wc.data_ptr<uint8_t>(), s.n, s.nb, out.data_ptr<float>());
  } else {
    out = tiled_matmul<Format>(x32, s.k, wc.data_ptr<uint8_t>(), s.n, s.nb);
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(x.scalar_type());
}

}  // namespace tinykern::cpu
