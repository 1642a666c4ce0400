// Residual vector quantization on CUDA. Encoding: a CTA keeps the residuals of 16 rows in
// shared memory across all levels and streams each level's codebook through shared memory in
// 32 x 32 tiles, keeping a running min/argmin per (row, lane); no N x K distance matrix exists.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/checks.h"
#include "cuda/common.cuh"

namespace tinykern::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = kWarps * kRowsPerWarp;
constexpr int kTileK = 32;  // one codeword per lane
constexpr int kTileD = 32;

// ||c||^2 of each codeword, one warp per codeword.
__global__ void norms_kernel(const float* __restrict__ cb, int64_t count, int64_t d, float* __restrict__ norms) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
  for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; i < count; i += warps) {
    float s = 0.f;
    for (int64_t j = lane; j < d; j += 32) s = fmaf(cb[i * d + j], cb[i * d + j], s);
    s = warp_sum(s);
    if (lane == 0) norms[i] = s;
  }
}

// Warp w owns rows 4w..4w+3 of the CTA's 16; lane l scores codewords k0 + l of each tile with
// ||c||^2 - 2 r.c (||r||^2 is the same for every codeword of a row). Each lane sees its codewords
// in increasing order and keeps strict improvements, and the warp reduction prefers the lower
// index on equal distance, so ties go to the lowest index. quantized sums the chosen codewords
// level by level from zero, as rvq_decode does.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) encode_kernel(const T* __restrict__ x, const float* __restrict__ cb,
                                                             const float* __restrict__ norms, int64_t n, int64_t d,
                                                             int64_t levels, int64_t k, int64_t* __restrict__ codes,
                                                             float* __restrict__ quantized) {
  extern __shared__ float residual[];  // [kRows][d]
  __shared__ float tile[kTileK][kTileD + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int64_t row0 = (int64_t)blockIdx.x * kRows;
  for (int64_t i = threadIdx.x; i < kRows * d; i += blockDim.x) {
    const int64_t row = row0 + i / d;
    residual[i] = row < n ? to_float(x[row * d + i % d]) : 0.f;
  }
  float* mine = residual + warp * kRowsPerWarp * d;
  for (int64_t l = 0; l < levels; ++l) {
    const float* cl = cb + l * k * d;
    float best[kRowsPerWarp];
    int64_t arg[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) best[i] = INFINITY, arg[i] = 0;
    for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
      float dot[kRowsPerWarp] = {};
      for (int64_t d0 = 0; d0 < d; d0 += kTileD) {
        __syncthreads();  // the previous tile is consumed (and, first time, the residuals written)
        for (int t = threadIdx.x; t < kTileK * kTileD; t += blockDim.x) {
          const int kk = t / kTileD, dd = t % kTileD;
          tile[kk][dd] = (k0 + kk < k && d0 + dd < d) ? cl[(k0 + kk) * d + d0 + dd] : 0.f;
        }
        __syncthreads();
        const int width = static_cast<int>(d - d0 < kTileD ? d - d0 : kTileD);
        for (int dd = 0; dd < width; ++dd) {
          const float c = tile[lane][dd];
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i) dot[i] = fmaf(mine[i * d + d0 + dd], c, dot[i]);
        }
      }
      const int64_t code = k0 + lane;
      if (code < k) {
        const float norm = norms[l * k + code];
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          const float dist = norm - 2.f * dot[i];
          if (dist < best[i]) best[i] = dist, arg[i] = code;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      float b = best[i];
      int64_t a = arg[i];
      for (int offset = 16; offset > 0; offset >>= 1) {
        const float ob = __shfl_xor_sync(0xFFFFFFFFu, b, offset);
        const int64_t oa = __shfl_xor_sync(0xFFFFFFFFu, a, offset);
        if (ob < b || (ob == b && oa < a)) b = ob, a = oa;
      }
      const int64_t row = row0 + warp * kRowsPerWarp + i;
      if (row < n) {
        if (lane == 0) codes[row * levels + l] = a;
        const float* chosen = cl + a * d;
        for (int64_t j = lane; j < d; j += 32) {
          const float c = chosen[j];
          mine[i * d + j] -= c;
          quantized[row * d + j] = (l == 0 ? 0.f : quantized[row * d + j]) + c;
        }
      }
    }
    __syncwarp();
  }
}

template <typename I, typename T>
__global__ void decode_kernel(const I* __restrict__ codes, const T* __restrict__ cb, int64_t n, int64_t levels,
                              int64_t k, int64_t d, T* __restrict__ out) {
  const int64_t threads = (int64_t)gridDim.x * blockDim.x;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < n * d; t += threads) {
    const int64_t row = t / d, j = t % d;
    float acc = 0.f;
    // Levels in order into an fp32 zero, as the torch reference does: bit-identical sums.
    for (int64_t l = 0; l < levels; ++l) {
      const int64_t code = codes[row * levels + l];
      CUDA_KERNEL_ASSERT(code >= -1 && code < k);
      if (code >= 0) acc += to_float(cb[(l * k + code) * d + j]);
    }
    out[t] = from_float<T>(acc);
  }
}

std::tuple<at::Tensor, at::Tensor> rvq_encode(const at::Tensor& x, const at::Tensor& codebooks) {
  const RvqShape s = check_rvq_encode(x, codebooks, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor cb = codebooks.contiguous();
  at::Tensor codes = at::empty({s.n, s.levels}, x.options().dtype(at::kLong));
  at::Tensor quantized = at::zeros({s.n, s.d}, x.options().dtype(at::kFloat));
  if (s.n == 0 || s.levels == 0) return {codes, quantized};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor norms = at::empty({s.levels * s.k}, cb.options());
  norms_kernel<<<grid_for(s.levels * s.k, 8), 256, 0, stream>>>(cb.data_ptr<float>(), s.levels * s.k, s.d,
                                                                 norms.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const size_t smem = sizeof(float) * kRows * s.d;
  int device_max = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&device_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index()));
  const size_t limit = static_cast<size_t>(device_max) - sizeof(float) * kTileK * (kTileD + 1);
  TORCH_CHECK(smem <= limit, "rvq_encode: D = ", s.d, " needs ", smem, " bytes of shared memory for ", kRows,
              " residual rows; this GPU allows ", limit, " (D <= ", limit / (sizeof(float) * kRows), ")");
  dispatch_float(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(encode_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    encode_kernel<T><<<static_cast<unsigned>((s.n + kRows - 1) / kRows), kWarps * 32, smem, stream>>>(
        reinterpret_cast<const T*>(xc.data_ptr()), cb.data_ptr<float>(), norms.data_ptr<float>(), s.n, s.d, s.levels,
        s.k, codes.data_ptr<int64_t>(), quantized.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {codes, quantized};
}

at::Tensor rvq_decode(const at::Tensor& codes, const at::Tensor& codebooks) {
  const RvqShape s = check_rvq_decode(codes, codebooks, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor idx = codes.contiguous();
  const at::Tensor cb = codebooks.contiguous();
  at::Tensor out = at::empty({s.n, s.d}, codebooks.options());
  if (s.n * s.d == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(codebooks.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* c = reinterpret_cast<const T*>(cb.data_ptr());
    T* o = reinterpret_cast<T*>(out.data_ptr());
    if (codes.scalar_type() == at::kInt) {
      decode_kernel<int32_t, T><<<grid_for(s.n * s.d, 256), 256, 0, stream>>>(idx.data_ptr<int32_t>(), c, s.n,
                                                                              s.levels, s.k, s.d, o);
    } else {
      decode_kernel<int64_t, T><<<grid_for(s.n * s.d, 256), 256, 0, stream>>>(idx.data_ptr<int64_t>(), c, s.n,
                                                                              s.levels, s.k, s.d, o);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tinykern, CUDA, m) {
  m.impl("rvq_encode", &rvq_encode);
  m.impl("rvq_decode", &rvq_decode);
}

}  // namespace tinykern::cuda
