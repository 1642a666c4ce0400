// Residual vector quantization on CPU. Encoding works on tiles of rows whose residuals stay in
// cache through all levels: each level's codebook is multiplied against them a tile of codes at a
// time (at::mm, i.e. the vendor GEMM, on a [kTileRows, kTileCodes] fp32 block that fits in L2) and
// a vectorized scan folds the block into a running min/argmin per row. No N x K distance matrix is
// ever built: the extra memory is one block per thread.
#include "cpu/blockquant.h"  // first: it includes the intrinsics headers
#include "cpu/simd.h"

#include <torch/library.h>

#include <limits>
#include <string_view>
#include <tuple>
#include <vector>

namespace tinykern::cpu {
namespace {

// 256 x 1024 fp32 = 1 MiB per thread: large enough for the GEMM to run at full speed, small
// enough to be scanned from L2 right after it is written.
constexpr int64_t kTileRows = 256;
constexpr int64_t kTileCodes = 1024;

// The lowest index of the smallest norms[j] - 2 * dots[j] (j < k), and that value.
struct Nearest {
  float dist;
  int64_t index;
};

Nearest nearest_scalar(const float* dots, const float* norms, int64_t k) {
  Nearest best{std::numeric_limits<float>::infinity(), 0};
  for (int64_t j = 0; j < k; ++j) {
    const float d = norms[j] - 2.f * dots[j];
    if (d < best.dist) best = {d, j};  // strictly smaller: a tie keeps the lower index
  }
  return best;
}

// Lane-wise running minima, then the lanes merged with ties going to the lower index: the
// same answer as the scalar scan.
template <int kLanes>
Nearest merge_lanes(const float* dist, const int32_t* index, const float* dots, const float* norms, int64_t j,
                    int64_t k) {
  Nearest best{std::numeric_limits<float>::infinity(), 0};
  for (int i = 0; i < kLanes; ++i) {
    if (dist[i] < best.dist || (dist[i] == best.dist && index[i] < best.index)) best = {dist[i], index[i]};
  }
  const Nearest tail = nearest_scalar(dots + j, norms + j, k - j);
  if (tail.dist < best.dist) best = {tail.dist, j + tail.index};
  return best;
}

#if defined(__x86_64__)
TK_AVX2 Nearest nearest_avx2(const float* dots, const float* norms, int64_t k) {
  __m256 best = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256i index = _mm256_setzero_si256(), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 two = _mm256_set1_ps(2.f);
  const __m256i step = _mm256_set1_epi32(8);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m256 d = _mm256_fnmadd_ps(two, _mm256_loadu_ps(dots + j), _mm256_loadu_ps(norms + j));
    const __m256 less = _mm256_cmp_ps(d, best, _CMP_LT_OQ);
    best = _mm256_blendv_ps(best, d, less);
    index = _mm256_blendv_epi8(index, lane, _mm256_castps_si256(less));
    lane = _mm256_add_epi32(lane, step);
  }
  alignas(32) float dist[8];
  alignas(32) int32_t idx[8];
  _mm256_store_ps(dist, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(idx), index);
  return merge_lanes<8>(dist, idx, dots, norms, j, k);
}

TK_AVX512 Nearest nearest_avx512(const float* dots, const float* norms, int64_t k) {
  __m512 best = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512i index = _mm512_setzero_si512();
  __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 two = _mm512_set1_ps(2.f);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    const __m512 d = _mm512_fnmadd_ps(two, _mm512_loadu_ps(dots + j), _mm512_loadu_ps(norms + j));
    const __mmask16 less = _mm512_cmp_ps_mask(d, best, _CMP_LT_OQ);
    best = _mm512_mask_mov_ps(best, less, d);
    index = _mm512_mask_mov_epi32(index, less, lane);
    lane = _mm512_add_epi32(lane, step);
  }
  alignas(64) float dist[16];
  alignas(64) int32_t idx[16];
  _mm512_store_ps(dist, best);
  _mm512_store_si512(idx, index);
  return merge_lanes<16>(dist, idx, dots, norms, j, k);
}
#endif

using NearestFn = Nearest (*)(const float*, const float*, int64_t);

NearestFn pick_nearest() {
#if defined(__x86_64__)
  // By capability, not by level name: levels above avx512 (avx512+amx) take its kernel too.
  if (has_avx512()) return nearest_avx512;
  if (has_avx2_fma()) return nearest_avx2;
#endif
  return nearest_scalar;
}

std::tuple<at::Tensor, at::Tensor> rvq_encode(const at::Tensor& x, const at::Tensor& codebooks) {
  const RvqShape s = check_rvq_encode(x, codebooks, c10::DeviceType::CPU);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  at::Tensor codes = at::empty({s.n, s.levels}, x.options().dtype(at::kLong));
  at::Tensor quantized = at::empty({s.n, s.d}, x.options().dtype(at::kFloat));
  const int64_t d = s.d, k = s.k, levels = s.levels;
  // ||c||^2 once per codeword; ||r||^2 is the same for every codeword of a row,
  // so the argmin over ||c||^2 - 2 r.c needs only these and the dot products.
  std::vector<at::Tensor> books;
  for (int64_t l = 0; l < levels; ++l) books.push_back(codebooks.select(0, l).contiguous());
  std::vector<float> norms(levels * k);
  at::parallel_for(0, levels * k, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, d)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* c = books[i / k].data_ptr<float>() + (i % k) * d;
      float sq = 0.f;
      for (int64_t j = 0; j < d; ++j) sq += c[j] * c[j];
      norms[i] = sq;
    }
  });
  const NearestFn nearest = pick_nearest();
  const float* xs = x32.data_ptr<float>();
  int64_t* out_codes = codes.data_ptr<int64_t>();
  float* out_q = quantized.data_ptr<float>();
  at::parallel_for(0, ceil_div(s.n, kTileRows), 1, [&](int64_t t0, int64_t t1) {
    const int64_t tile_codes = std::min(k, kTileCodes);
    at::Tensor r = at::empty({kTileRows, d}, x32.options());
    at::Tensor dots = at::empty({kTileRows, tile_codes}, x32.options());
    std::vector<float> q(kTileRows * d), best(kTileRows);
    std::vector<int64_t> arg(kTileRows);
    float* rs = r.data_ptr<float>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileRows, rows = std::min(kTileRows, s.n - n0);
      std::copy(xs + n0 * d, xs + (n0 + rows) * d, rs);
      std::fill(q.begin(), q.begin() + rows * d, 0.f);
      const at::Tensor rt = r.narrow(0, 0, rows);
      for (int64_t l = 0; l < levels; ++l) {
        const float* cl = books[l].data_ptr<float>();
        std::fill(best.begin(), best.end(), std::numeric_limits<float>::infinity());
        std::fill(arg.begin(), arg.end(), 0);
        // Code tiles in increasing order, and only a strictly smaller distance replaces the
        // best so far: ties go to the lowest index across tiles as within them.
        for (int64_t k0 = 0; k0 < k; k0 += tile_codes) {
          const int64_t kt = std::min(tile_codes, k - k0);
          at::Tensor block = dots.narrow(0, 0, rows).narrow(1, 0, kt);
          // The CPU GEMM, single-threaded inside this parallel region.
          at::cpu::mm_out(block, rt, books[l].narrow(0, k0, kt).t());
          const float* dp = block.data_ptr<float>();
          const float* np = norms.data() + l * k + k0;
          for (int64_t i = 0; i < rows; ++i) {
            const Nearest hit = nearest(dp + i * block.stride(0), np, kt);
            if (hit.dist < best[i]) {
              best[i] = hit.dist;
              arg[i] = k0 + hit.index;
            }
          }
        }
        for (int64_t i = 0; i < rows; ++i) {
          out_codes[(n0 + i) * levels + l] = arg[i];
          const float* chosen = cl + arg[i] * d;
          for (int64_t j = 0; j < d; ++j) {
            rs[i * d + j] -= chosen[j];
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
