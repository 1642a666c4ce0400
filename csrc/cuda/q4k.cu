// Q4_K on CUDA: dequantize, a GEMV for small M that reads the packed weights once with 16-byte
// loads, and dequantize + cuBLAS for larger M. Layout: docs/formats.md.
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "cpu/checks.h"
#include "cuda/common.cuh"

namespace tinykern::cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kBlockBytes = 144;
// Up to this many rows of x take the GEMV; above, the weight is dequantized for cuBLAS.
constexpr int64_t kGemvMaxRows = 16;

// sc and m of sub-blocks 2c and 2c+1 from the 12 scale bytes, held as the words s0 (bytes
// 0-3), s1 (4-7), s2 (8-11). Bytes 0-3 hold sc0..3 in their low 6 bits and the top bits of
// sc4..7; bytes 4-7 the same for the mins; bytes 8-11 the low nibbles of sc4..7 / m4..7.
__device__ __forceinline__ void chunk_scales(uint32_t s0, uint32_t s1, uint32_t s2, int c, uint32_t sc[2],
                                             uint32_t m[2]) {
  const uint32_t scw = c < 2 ? (s0 & 0x3F3F3F3Fu) : ((s2 & 0x0F0F0F0Fu) | ((s0 >> 2) & 0x30303030u));
  const uint32_t mw = c < 2 ? (s1 & 0x3F3F3F3Fu) : (((s2 >> 4) & 0x0F0F0F0Fu) | ((s1 >> 2) & 0x30303030u));
  const int shift = 16 * (c & 1);
  sc[0] = (scw >> shift) & 0xFF, sc[1] = (scw >> (shift + 8)) & 0xFF;
  m[0] = (mw >> shift) & 0xFF, m[1] = (mw >> (shift + 8)) & 0xFF;
}

// One warp per block: lane l writes the 8 weights 8*(l%4).. of sub-block j = l/4. Bit-exact
// with the formats module: (d * sc) * q - dmin * m in fp32, each step rounded on its own.
template <typename T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ blocks, T* __restrict__ out, int64_t count) {
  const int lane = threadIdx.x & 31, j = lane >> 2, part = lane & 3;
  const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
  for (int64_t b = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; b < count; b += warps) {
    const uint8_t* blk = blocks + b * kBlockBytes;
    const uint4 hdr = *reinterpret_cast<const uint4*>(blk);
    uint32_t sc[2], m[2];
    chunk_scales(hdr.y, hdr.z, hdr.w, j / 2, sc, m);
    const float scale = __fmul_rn(half_bits_to_float(hdr.x), static_cast<float>(sc[j & 1]));
    const float offset = __fmul_rn(half_bits_to_float(hdr.x >> 16), static_cast<float>(m[j & 1]));
    const uint2 q = *reinterpret_cast<const uint2*>(blk + 16 + 32 * (j / 2) + 8 * part);
    const int shift = 4 * (j & 1);
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const uint32_t code = (((e < 4 ? q.x : q.y) >> (8 * (e & 3) + shift)) & 15u);
      v[e] = __fsub_rn(__fmul_rn(scale, static_cast<float>(code)), offset);
    }
    store8(out + b * kBlock + 32 * j + 8 * part, v);
  }
}

// y[m, n] = x[m, :K] . dequant(w[n]) for R weight rows per warp and up to MT rows of x per
// grid row. Lane l takes chunk c = l%4 (64 weights: sub-blocks 2c and 2c+1) of blocks l/4,
// l/4 + 8, ...: per block and weight row one 16-byte load of the header and two of the codes,
// all warp-coalesced. Each x value feeds R rows; the mins enter through per-sub-block sums of
// x: sum x*(s*q - o) = s*sum(x*q) - o*sum(x). x columns at or past K read as zero (K % 4 == 0
// and ldx % 4 == 0, so a 4-wide load is entirely inside or outside).
template <typename T, int R, int MT>
__global__ void __launch_bounds__(128) gemv_kernel(const T* __restrict__ x, int64_t ldx, int64_t m, int64_t k,
                                                   const uint8_t* __restrict__ w, int64_t n, int64_t nb,
                                                   const float* __restrict__ bias, T* __restrict__ y) {
  const int lane = threadIdx.x & 31, c = lane & 3;
  const int64_t row0 = ((int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * R;
  const int64_t m0 = (int64_t)blockIdx.y * MT;
  if (row0 >= n) return;
  const uint8_t* rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = w + min(row0 + r, n - 1) * nb * kBlockBytes;
  const T* xs[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) xs[i] = x + min(m0 + i, m - 1) * ldx;

  float acc[R][MT] = {};
  for (int64_t b = lane >> 2; b < nb; b += 8) {
    uint4 hdr[R], q[R][2];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = rows[r] + b * kBlockBytes;
      hdr[r] = *reinterpret_cast<const uint4*>(blk);
      q[r][0] = *reinterpret_cast<const uint4*>(blk + 16 + 32 * c);
      q[r][1] = *reinterpret_cast<const uint4*>(blk + 32 + 32 * c);
    }
    const int64_t col = b * kBlock + 64 * c;
    float sum_lo[R][MT] = {}, sum_hi[R][MT] = {}, xsum_lo[MT] = {}, xsum_hi[MT] = {};
#pragma unroll
    for (int word = 0; word < 8; ++word) {
      // Code word `word` holds weights 4*word.. of both sub-blocks: low and high nibbles.
      float x_lo[MT][4], x_hi[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int64_t at = col + 4 * word;
        if (at < k) {
          load4(xs[i] + at, x_lo[i]);
        } else {
          x_lo[i][0] = x_lo[i][1] = x_lo[i][2] = x_lo[i][3] = 0.f;
        }
        if (at + 32 < k) {
          load4(xs[i] + at + 32, x_hi[i]);
        } else {
          x_hi[i][0] = x_hi[i][1] = x_hi[i][2] = x_hi[i][3] = 0.f;
        }
        xsum_lo[i] += (x_lo[i][0] + x_lo[i][1]) + (x_lo[i][2] + x_lo[i][3]);
        xsum_hi[i] += (x_hi[i][0] + x_hi[i][1]) + (x_hi[i][2] + x_hi[i][3]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint4 qq = q[r][word / 4];
        const uint32_t bits = (word & 3) == 0 ? qq.x : (word & 3) == 1 ? qq.y : (word & 3) == 2 ? qq.z : qq.w;
        const uint32_t lo = bits & 0x0F0F0F0Fu, hi = (bits >> 4) & 0x0F0F0F0Fu;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float q_lo = byte_to_float(lo, e), q_hi = byte_to_float(hi, e);
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            sum_lo[r][i] = fmaf(q_lo, x_lo[i][e], sum_lo[r][i]);
            sum_hi[r][i] = fmaf(q_hi, x_hi[i][e], sum_hi[r][i]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      uint32_t sc[2], mn[2];
      chunk_scales(hdr[r].y, hdr[r].z, hdr[r].w, c, sc, mn);
      const float d = half_bits_to_float(hdr[r].x), dmin = half_bits_to_float(hdr[r].x >> 16);
      const float s_lo = d * sc[0], s_hi = d * sc[1], o_lo = dmin * mn[0], o_hi = dmin * mn[1];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        acc[r][i] += s_lo * sum_lo[r][i] + s_hi * sum_hi[r][i] - (o_lo * xsum_lo[i] + o_hi * xsum_hi[i]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const float total = warp_sum(acc[r][i]);
      if (lane == 0 && row0 + r < n && m0 + i < m) {
        y[(m0 + i) * n + row0 + r] = from_float<T>(total + (bias != nullptr ? bias[row0 + r] : 0.f));
      }
    }
  }
}

void launch_dequantize(const at::Tensor& blocks, at::Tensor& out, int64_t count) {
  if (count == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(out.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dequantize_kernel<T><<<grid_for(count, 8), 256, 0, stream>>>(blocks.data_ptr<uint8_t>(),
                                                                 reinterpret_cast<T*>(out.data_ptr()), count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor q4k_dequantize(const at::Tensor& blocks, at::ScalarType dtype) {
  const int64_t count = check_blocks("q4k_dequantize", blocks, kBlockBytes, c10::DeviceType::CUDA);
  check_output_dtype("q4k_dequantize", dtype);
  const c10::cuda::CUDAGuard guard(blocks.device());
  const at::Tensor src = contiguous_aligned(blocks);
  std::vector<int64_t> sizes = blocks.sizes().vec();
  sizes.back() = sizes.back() / kBlockBytes * kBlock;
  at::Tensor out = at::empty(sizes, blocks.options().dtype(dtype));
  launch_dequantize(src, out, count);
  return out;
}

// `exact` is for the CPU kernels: these compute in fp32 whatever it says.
at::Tensor q4k_matmul(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool /*exact*/) {
  const MatmulShape s = check_matmul("q4k_matmul", kBlock, kBlockBytes, x, w, bias, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor wc = contiguous_aligned(w);
  if (s.m > kGemvMaxRows) {
    // Compute-bound: a half-precision (or fp32) copy of the weight and cuBLAS.
    at::Tensor dense = at::empty({s.n, s.nb * kBlock}, x.options());
    launch_dequantize(wc, dense, s.n * s.nb);
    const at::Tensor wt = dense.narrow(1, 0, s.k).t();
    return bias.has_value() ? at::addmm(bias->to(x.scalar_type()), x, wt) : at::mm(x, wt);
  }
  at::Tensor out = at::empty({s.m, s.n}, x.options());
  if (s.m == 0 || s.n == 0) return out;
  // The GEMV reads x four values at a time: rows must start on a multiple of 4 elements.
  at::Tensor xc = contiguous_aligned(x);
  int64_t ldx = s.k;
  if (s.k % 4 != 0) {
    ldx = s.nb * kBlock;
    xc = at::zeros({s.m, ldx}, x.options());
    xc.narrow(1, 0, s.k).copy_(x);
  }
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_ptr = bias.has_value() ? bias32.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = reinterpret_cast<const T*>(xc.data_ptr());
    T* yp = reinterpret_cast<T*>(out.data_ptr());
    // 4 warps per CTA; one row of x: 4 weight rows per warp; more: 2 weight rows x 4 x rows.
    if (s.m == 1) {
      const dim3 grid((s.n + 15) / 16, 1);
      gemv_kernel<T, 4, 1><<<grid, 128, 0, stream>>>(xp, ldx, s.m, s.k, wc.data_ptr<uint8_t>(), s.n, s.nb,
                                                      bias_ptr, yp);
    } else {
      const dim3 grid((s.n + 7) / 8, (s.m + 3) / 4);
      gemv_kernel<T, 2, 4><<<grid, 128, 0, stream>>>(xp, ldx, s.m, s.k, wc.data_ptr<uint8_t>(), s.n, s.nb,
                                                      bias_ptr, yp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tinykern, CUDA, m) {
  m.impl("q4k_dequantize", &q4k_dequantize);
  m.impl("q4k_matmul", &q4k_matmul);
}

}  // namespace tinykern::cuda
