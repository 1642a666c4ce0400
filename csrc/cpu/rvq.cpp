// Residual vector quantization on CPU. Encoding streams each level's codebook past a block of
// rows that keeps its residuals in cache, with a running min/argmin per row: no N x K distance
// matrix is ever built.
#include "cpu/blockquant.h"  // first: it includes the intrinsics headers

#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

namespace tinykern::cpu {
namespace {

// Rows of x encoded together: each codeword read from memory serves this many dot products.
constexpr int64_t kRows = 4;

void dots_scalar(const float* r, int64_t d, const float* c, float out[kRows]) {
  for (int64_t i = 0; i < kRows; ++i) {
    float s = 0.f;
    for (int64_t j = 0; j < d; ++j) s += r[i * d + j] * c[j];
    out[i] = s;
  }
}

#if defined(__x86_64__)
TK_AVX2 void dots_avx2(const float* r, int64_t d, const float* c, float out[kRows]) {
  __m256 acc[kRows];
  for (int64_t i = 0; i < kRows; ++i) acc[i] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    const __m256 cv = _mm256_loadu_ps(c + j);
    for (int64_t i = 0; i < kRows; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(r + i * d + j), cv, acc[i]);
  }
  for (int64_t i = 0; i < kRows; ++i) {
    float s = hsum(acc[i]);
    for (int64_t t = j; t < d; ++t) s += r[i * d + t] * c[t];
    out[i] = s;
  }
}
#endif

using Dots = void (*)(const float*, int64_t, const float*, float[kRows]);

std::tuple<at::Tensor, at::Tensor> rvq_encode(const at::Tensor& x, const at::Tensor& codebooks) {
  const RvqShape s = check_rvq_encode(x, codebooks, c10::DeviceType::CPU);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor cb = codebooks.contiguous();
  at::Tensor codes = at::empty({s.n, s.levels}, x.options().dtype(at::kLong));
  at::Tensor quantized = at::empty({s.n, s.d}, x.options().dtype(at::kFloat));
#if defined(__x86_64__)
  const Dots dots = has_avx2_fma() ? dots_avx2 : dots_scalar;
#else
  const Dots dots = dots_scalar;
#endif
  const float* c = cb.data_ptr<float>();
  const int64_t d = s.d, k = s.k, levels = s.levels;
  // ||c||^2 once per codeword; ||r||^2 is the same for every codeword of a row, so the argmin
  // over ||c||^2 - 2 r.c needs only these and the dot products.
  std::vector<float> norms(levels * k);
  for (int64_t i = 0; i < levels * k; ++i) {
    float sq = 0.f;
    for (int64_t j = 0; j < d; ++j) sq += c[i * d + j] * c[i * d + j];
    norms[i] = sq;
  }
  const float* xs = x32.data_ptr<float>();
  int64_t* out_codes = codes.data_ptr<int64_t>();
  float* out_q = quantized.data_ptr<float>();
  const int64_t work = std::max<int64_t>(1, levels * k * d);
  at::parallel_for(0, ceil_div(s.n, kRows), std::max<int64_t>(1, 65536 / work), [&](int64_t b0, int64_t b1) {
    // Residuals and sums of the block's rows; rows past N stay zero and are never written out.
    std::vector<float> r(kRows * d), q(kRows * d);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * kRows, rows = std::min(kRows, s.n - n0);
      std::fill(r.begin(), r.end(), 0.f);
      std::fill(q.begin(), q.end(), 0.f);
      std::copy(xs + n0 * d, xs + (n0 + rows) * d, r.begin());
      for (int64_t l = 0; l < levels; ++l) {
        const float* cl = c + l * k * d;
        float best[kRows], dot[kRows];
        int64_t arg[kRows] = {};
        std::fill(best, best + kRows, std::numeric_limits<float>::infinity());
        for (int64_t kk = 0; kk < k; ++kk) {
          dots(r.data(), d, cl + kk * d, dot);
          for (int64_t i = 0; i < kRows; ++i) {
            const float dist = norms[l * k + kk] - 2.f * dot[i];
            // Strictly smaller: a tie keeps the lower index, since codewords go in order.
            if (dist < best[i]) {
              best[i] = dist;
              arg[i] = kk;
            }
          }
        }
        for (int64_t i = 0; i < rows; ++i) {
          out_codes[(n0 + i) * levels + l] = arg[i];
          const float* chosen = cl + arg[i] * d;
          for (int64_t j = 0; j < d; ++j) {
            r[i * d + j] -= chosen[j];
            q[i * d + j] += chosen[j];
          }
        }
      }
      std::copy(q.begin(), q.begin() + rows * d, out_q + n0 * d);
    }
  });
  return {codes, quantized};
}

template <typename I, typename T>
void decode(const at::Tensor& codes, const at::Tensor& cb, at::Tensor& out, const RvqShape& s) {
  const I* idx = codes.data_ptr<I>();
  const T* c = cb.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t levels = s.levels, k = s.k, d = s.d;
  for (int64_t i = 0; i < s.n * levels; ++i) {
    TORCH_CHECK(idx[i] >= -1 && idx[i] < k, "rvq_decode: code ", static_cast<int64_t>(idx[i]), " at [",
                i / levels, ", ", i % levels, "] is out of range for codebooks of shape ", cb.sizes(),
                " (expected -1..", k - 1, ")");
  }
  at::parallel_for(0, s.n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, levels * d)), [&](int64_t n0, int64_t n1) {
    std::vector<float> acc(d);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(acc.begin(), acc.end(), 0.f);
      // Levels in order into an fp32 zero, as the torch reference does: bit-identical sums.
      for (int64_t l = 0; l < levels; ++l) {
        const int64_t code = idx[n * levels + l];
        if (code < 0) continue;
        const T* row = c + (l * k + code) * d;
        for (int64_t j = 0; j < d; ++j) acc[j] += static_cast<float>(row[j]);
      }
      for (int64_t j = 0; j < d; ++j) o[n * d + j] = static_cast<T>(acc[j]);
    }
  });
}

at::Tensor rvq_decode(const at::Tensor& codes, const at::Tensor& codebooks) {
  const RvqShape s = check_rvq_decode(codes, codebooks, c10::DeviceType::CPU);
  const at::Tensor idx = codes.contiguous();
  const at::Tensor cb = codebooks.contiguous();
  at::Tensor out = at::empty({s.n, s.d}, codebooks.options());
  dispatch_float_out(codebooks.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (codes.scalar_type() == at::kInt) {
      decode<int32_t, T>(idx, cb, out, s);
    } else {
      decode<int64_t, T>(idx, cb, out, s);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tinykern, CPU, m) {
  m.impl("rvq_encode", &rvq_encode);
  m.impl("rvq_decode", &rvq_decode);
}

}  // namespace tinykern::cpu
