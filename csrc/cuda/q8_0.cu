// Q8_0 on CUDA: blocks of an fp16 scale d and 32 int8 codes, w = float(d) * q (an exact
// product). Dequantize, a GEMV for small M, dequantize + cuBLAS for larger M. Blocks are 34
// bytes, so loads are 2-byte aligned only: each thread reads its 8 codes as four 16-bit words.
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

constexpr int kBlock = 32;
constexpr int kBlockBytes = 34;
constexpr int64_t kGemvMaxRows = 16;

// The scale and codes 8*part.. of a block: codes as two words of four int8 each.
__device__ __forceinline__ void load_part(const uint8_t* blk, int part, float* d, uint32_t q[2]) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(blk);
  *d = half_bits_to_float(h[0]);
  const uint16_t* c = h + 1 + 4 * part;
  q[0] = c[0] | (static_cast<uint32_t>(c[1]) << 16);
  q[1] = c[2] | (static_cast<uint32_t>(c[3]) << 16);
}

// Signed byte e of w as an exact float: flipping the sign bit gives q + 128 in 0..255.
__device__ __forceinline__ float int8_to_float(uint32_t w, int e) {
  return byte_to_float(w ^ 0x80808080u, e) - 128.f;
}

// Four threads per block, eight weights each.
template <typename T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ blocks, T* __restrict__ out, int64_t count) {
  const int64_t threads = (int64_t)gridDim.x * blockDim.x;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < count * 4; t += threads) {
    const int64_t b = t / 4;
    const int part = t % 4;
    float d;
    uint32_t q[2];
    load_part(blocks + b * kBlockBytes, part, &d, q);
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = __fmul_rn(d, int8_to_float(q[e / 4], e % 4));
    store8(out + b * kBlock + 8 * part, v);
  }
}

// y[m, n] = x[m, :K] . dequant(w[n]) for R weight rows per warp and up to MT rows of x per grid
// row. Lane l reads codes 8*(l%4).. of blocks l/4, l/4 + 8, ...: a warp covers 8 consecutive
// blocks (272 bytes) per step. x columns at or past K read as zero (K % 4 == 0, ldx % 4 == 0).
template <typename T, int R, int MT>
__global__ void __launch_bounds__(128) gemv_kernel(const T* __restrict__ x, int64_t ldx, int64_t m, int64_t k,
                                                   const uint8_t* __restrict__ w, int64_t n, int64_t nb,
                                                   const float* __restrict__ bias, T* __restrict__ y) {
  const int lane = threadIdx.x & 31, part = lane & 3;
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
    const int64_t col = b * kBlock + 8 * part;
    float xv[MT][8];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (col + 4 * h < k) {
          load4(xs[i] + col + 4 * h, xv[i] + 4 * h);
        } else {
          xv[i][4 * h] = xv[i][4 * h + 1] = xv[i][4 * h + 2] = xv[i][4 * h + 3] = 0.f;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float d;
      uint32_t q[2];
      load_part(rows[r] + b * kBlockBytes, part, &d, q);
      float s[MT] = {};
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float qf = int8_to_float(q[e / 4], e % 4);
#pragma unroll
        for (int i = 0; i < MT; ++i) s[i] = fmaf(qf, xv[i][e], s[i]);
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) acc[r][i] = fmaf(d, s[i], acc[r][i]);
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
    dequantize_kernel<T><<<grid_for(count * 4, 256), 256, 0, stream>>>(
        blocks.data_ptr<uint8_t>(), reinterpret_cast<T*>(out.data_ptr()), count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor q8_0_dequantize(const at::Tensor& blocks, at::ScalarType dtype) {
  const int64_t count = check_blocks("q8_0_dequantize", blocks, kBlockBytes, c10::DeviceType::CUDA);
  check_output_dtype("q8_0_dequantize", dtype);
  const c10::cuda::CUDAGuard guard(blocks.device());
  const at::Tensor src = contiguous_aligned(blocks);
  std::vector<int64_t> sizes = blocks.sizes().vec();
  sizes.back() = sizes.back() / kBlockBytes * kBlock;
  at::Tensor out = at::empty(sizes, blocks.options().dtype(dtype));
  launch_dequantize(src, out, count);
  return out;
}

// `exact` is for the CPU kernels: these compute in fp32 whatever it says.
at::Tensor q8_0_matmul(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool /*exact*/) {
  const MatmulShape s = check_matmul("q8_0_matmul", kBlock, kBlockBytes, x, w, bias, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor wc = contiguous_aligned(w);
  if (s.m > kGemvMaxRows) {
    at::Tensor dense = at::empty({s.n, s.nb * kBlock}, x.options());
    launch_dequantize(wc, dense, s.n * s.nb);
    const at::Tensor wt = dense.narrow(1, 0, s.k).t();
    return bias.has_value() ? at::addmm(bias->to(x.scalar_type()), x, wt) : at::mm(x, wt);
  }
  at::Tensor out = at::empty({s.m, s.n}, x.options());
  if (s.m == 0 || s.n == 0) return out;
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
    if (s.m == 1) {
      gemv_kernel<T, 4, 1><<<dim3((s.n + 15) / 16, 1), 128, 0, stream>>>(xp, ldx, s.m, s.k, wc.data_ptr<uint8_t>(),
                                                                          s.n, s.nb, bias_ptr, yp);
    } else {
      gemv_kernel<T, 2, 4><<<dim3((s.n + 7) / 8, (s.m + 3) / 4), 128, 0, stream>>>(
          xp, ldx, s.m, s.k, wc.data_ptr<uint8_t>(), s.n, s.nb, bias_ptr, yp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tinykern, CUDA, m) {
  m.impl("q8_0_dequantize", &q8_0_dequantize);
  m.impl("q8_0_matmul", &q8_0_matmul);
}

}  // namespace tinykern::cuda
