// block_dequantize and block_matmul on CUDA for every GGML block format of formats.cuh, one
// template per kernel. block_matmul picks by rows of x: up to kGemvMaxRows a GEMV that decodes
// the weights on the fly (memory bound: every weight byte is read once per column tile), above
// that a tiled tensor-core GEMM that decodes [64, 64] weight tiles into shared memory. Neither
// ever writes the dense weight to global memory.
#include <ATen/ops/empty.h>
#include <mma.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cpu/checks.h"
#include "cuda/common.cuh"
#include "cuda/formats.cuh"

namespace tinykern::cuda {
namespace {

constexpr int64_t kGemvMaxRows = 16;

// Elements gk .. gk+7 of row i of x [m, k] as fp32 in v, zero past m and k; eight at a time
// where `vec` (k % 8 == 0, x 16-byte aligned) and the group lies inside the row.
template <typename T>
__device__ __forceinline__ void load_x8(const T* __restrict__ x, int64_t i, int64_t m, int64_t k, int64_t gk, bool vec,
                                        float v[8]) {
  if (i < m && vec && gk + 8 <= k) {
    load4(x + i * k + gk, v);
    load4(x + i * k + gk + 4, v + 4);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = (i < m && gk + e < k) ? to_float(x[i * k + gk + e]) : 0.f;
  }
}

// One thread per group of eight weights.
template <class F, typename T>
__global__ void block_dequantize_kernel(const uint8_t* __restrict__ blocks, T* __restrict__ out, int64_t groups) {
  constexpr int kGroups = F::kBlock / 8;
  const int64_t threads = (int64_t)gridDim.x * blockDim.x;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < groups; t += threads) {
    float v[8];
    F::decode8(blocks + (t / kGroups) * F::kBlockBytes, static_cast<int>(t % kGroups), v);
    store8(out + t * 8, v);
  }
}

// x[m, k] @ dequant(w).T for m <= MT, R weight rows per warp, 8 warps. x is staged through
// shared memory in chunks of KC columns (whole blocks of any format), converted to fp32 once
// there rather than per weight row in the loop, zero past M and K. Lane l decodes groups l,
// l + 32, ... of a chunk, so a warp step covers 256 consecutive weights of each of its rows.
// One warp sum per output after the K loop. vec: k % 8 == 0 (with x 16-byte aligned), so that
// x rows are read eight elements at a time.
template <class F, typename T, int MT, int R>
__global__ void __launch_bounds__(256, 2) block_gemv_kernel(const T* __restrict__ x, int64_t m, int64_t k, bool vec,
                                                         const uint8_t* __restrict__ w, int64_t n, int64_t nb,
                                                         const float* __restrict__ bias, T* __restrict__ y) {
  constexpr int kWarps = 8;
  // 32 KB of x per chunk.
  constexpr int KC = 32768 / (MT * static_cast<int>(sizeof(float)));
  static_assert(KC % 256 == 0, "a chunk must hold whole blocks and whole warp steps");
  __shared__ __align__(16) float xs[MT * KC];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col0 = ((int64_t)blockIdx.x * kWarps + warp) * R;
  const uint8_t* rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = w + min(col0 + r, n - 1) * nb * F::kBlockBytes;

  float acc[R][MT] = {};
  for (int64_t k0 = 0; k0 < k; k0 += KC) {
    __syncthreads();  // every warp is done with the previous chunk
    for (int idx = threadIdx.x; idx < MT * KC / 8; idx += blockDim.x) {
      const int i = idx / (KC / 8), c = (idx % (KC / 8)) * 8;
      const int64_t gk = k0 + c;
      float v[8];
      load_x8(x, i, m, k, gk, vec, v);
      store8(xs + i * KC + c, v);
    }
    __syncthreads();
    const int kend = static_cast<int>(k - k0 < KC ? k - k0 : KC);
    for (int c = 8 * lane; c < kend; c += 256) {
      const int64_t gk = k0 + c;
      const int64_t blk = gk / F::kBlock;
      const int grp = static_cast<int>(gk % F::kBlock) / 8;
      float wv[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        F::decode8(rows[r] + blk * F::kBlockBytes, grp, wv[r]);
        // Row padding past K never meets x, not even as 0 * inf.
        if (c + 8 > kend) {
#pragma unroll
          for (int e = 0; e < 8; ++e) wv[r][e] = c + e < kend ? wv[r][e] : 0.f;
        }
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        float xv[8];
        load4(xs + i * KC + c, xv);
        load4(xs + i * KC + c + 4, xv + 4);
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[r][i] = fmaf(wv[r][e], xv[e], acc[r][i]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const float total = warp_sum(acc[r][i]);
      if (lane == 0 && col0 + r < n && i < m) {
        y[i * n + col0 + r] = from_float<T>(total + (bias != nullptr ? bias[col0 + r] : 0.f));
      }
    }
  }
}

// The tensor-core input type for activations T: fp16 for fp16 x, bf16 for bf16 x, TF32 (held
// as float) for fp32 x, whose range fp16 would not cover. fp16 and TF32 keep 10 mantissa bits,
// bf16 7, so fp32 x is not computed exactly.
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat16,
                                     std::conditional_t<std::is_same_v<T, __half>, __half, float>>;

template <typename Tc>
__device__ __forceinline__ void store8_compute(Tc* p, float v[8]) {
  if constexpr (std::is_same_v<Tc, float>) {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = nvcuda::wmma::__float_to_tf32(v[e]);
  }
  store8(p, v);
}

// 128 rows of x per CTA: each weight tile a CTA decodes feeds twice as many MMAs as at 64.
constexpr int kTileM = 128, kTileN = 64, kTileThreads = 256;

// y[m, n] = x @ dequant(w).T (+ bias) for a [128, 64] output tile per CTA of 8 warps, each
// warp a [32, 32] part as 2 x 2 WMMA fragments with fp32 accumulators. Per K step (64 wide, 32
// for TF32 to stay within 48 KB of static shared memory) the CTA converts its x tile and
// decodes its weight tile (row n, columns k) to Tc in shared memory, zero past M, N and K. The
// accumulators leave through shared memory, so that the bias is added in fp32 and the output
// written in T with bounds checks.
template <class F, typename T>
__global__ void __launch_bounds__(kTileThreads, 2) block_mma_kernel(const T* __restrict__ x, int64_t m, int64_t k,
                                                                 bool vec, const uint8_t* __restrict__ w, int64_t n,
                                                                 int64_t nb, const float* __restrict__ bias,
                                                                 T* __restrict__ y) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using Tc = compute_t<T>;
  constexpr bool kTf32 = std::is_same_v<Tc, float>;
  using Prec = std::conditional_t<kTf32, wmma::precision::tf32, Tc>;
  constexpr int FK = kTf32 ? 8 : 16;
  constexpr int kTileK = kTf32 ? 32 : 64;
  // Rows padded against bank conflicts; 144 bytes (either type) keep every fragment 32-byte
  // aligned and every group of eight 16-byte aligned.
  constexpr int LD = kTileK + (kTf32 ? 4 : 8);
  constexpr int LDC = kTileN + 4;
  constexpr int kTileBytes = (kTileM + kTileN) * LD * static_cast<int>(sizeof(Tc));
  constexpr int kOutBytes = kTileM * LDC * static_cast<int>(sizeof(float));
  __shared__ __align__(128) unsigned char smem[kTileBytes > kOutBytes ? kTileBytes : kOutBytes];
  Tc* xs = reinterpret_cast<Tc*>(smem);
  Tc* ws = xs + kTileM * LD;
  float* cs = reinterpret_cast<float*>(smem);

  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t m0 = (int64_t)blockIdx.x * kTileM, n0 = (int64_t)blockIdx.y * kTileN;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int64_t row_bytes = nb * F::kBlockBytes;

  wmma::fragment<wmma::accumulator, 16, 16, FK, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
    for (int idx = tid; idx < kTileM * kTileK / 8; idx += kTileThreads) {
      const int r = idx / (kTileK / 8), c = (idx % (kTileK / 8)) * 8;
      const int64_t gm = m0 + r, gk = k0 + c;
      float v[8];
      load_x8(x, gm, m, k, gk, vec, v);
      store8_compute(xs + r * LD + c, v);
    }
    for (int idx = tid; idx < kTileN * kTileK / 8; idx += kTileThreads) {
      const int r = idx / (kTileK / 8), c = (idx % (kTileK / 8)) * 8;
      const int64_t gn = n0 + r, gk = k0 + c;
      float v[8];
      if (gn < n && gk < k) {
        // gk is a multiple of 8, so the group lies inside one block.
        F::decode8(w + gn * row_bytes + (gk / F::kBlock) * F::kBlockBytes, static_cast<int>(gk % F::kBlock) / 8, v);
        if (gk + 8 > k) {
#pragma unroll
          for (int e = 0; e < 8; ++e) v[e] = gk + e < k ? v[e] : 0.f;
        }
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = 0.f;
      }
      store8_compute(ws + r * LD + c, v);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += FK) {
      wmma::fragment<wmma::matrix_a, 16, 16, FK, Prec, wmma::row_major> a[2];
      // The weight tile is [n][k]: as the K x N operand that is column-major.
      wmma::fragment<wmma::matrix_b, 16, 16, FK, Prec, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], xs + (wm + 16 * i) * LD + kk, LD);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], ws + (wn + 16 * j) * LD + kk, LD);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();  // the tiles are rewritten next step, or reused as cs below
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(cs + (wm + 16 * i) * LDC + wn + 16 * j, acc[i][j], LDC, wmma::mem_row_major);
    }
  }
  __syncthreads();
  for (int idx = tid; idx < kTileM * kTileN; idx += kTileThreads) {
    const int r = idx / kTileN, c = idx % kTileN;
    const int64_t gm = m0 + r, gn = n0 + c;
    if (gm < m && gn < n) y[gm * n + gn] = from_float<T>(cs[r * LDC + c] + (bias != nullptr ? bias[gn] : 0.f));
  }
#else
  __trap();  // the host refuses GPUs below sm_80 before launching
#endif
}

template <class F>
void launch_dequantize(const at::Tensor& blocks, at::Tensor& out, int64_t count) {
  const int64_t groups = count * (F::kBlock / 8);
  if (groups == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(out.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    block_dequantize_kernel<F, T><<<grid_for(groups, 256), 256, 0, stream>>>(
        blocks.data_ptr<uint8_t>(), reinterpret_cast<T*>(out.data_ptr()), groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void unknown_type(const char* op, int64_t type) {
  TORCH_CHECK(false, op, ": GGML type ", type, " has no CUDA kernels; expected one of ", formats::kTypeList);
}

at::Tensor block_dequantize(const at::Tensor& blocks, int64_t ggml_type, at::ScalarType dtype) {
  constexpr const char* op = "block_dequantize";
  at::Tensor out;
  const bool known = formats::visit(ggml_type, [&](auto format) {
    using F = decltype(format);
    const int64_t count = check_blocks(op, blocks, F::kBlockBytes, c10::DeviceType::CUDA);
    check_output_dtype(op, dtype);
    const c10::cuda::CUDAGuard guard(blocks.device());
    const at::Tensor src = contiguous_aligned(blocks);
    std::vector<int64_t> sizes = blocks.sizes().vec();
    sizes.back() = sizes.back() / F::kBlockBytes * F::kBlock;
    out = at::empty(sizes, blocks.options().dtype(dtype));
    launch_dequantize<F>(src, out, count);
  });
  if (!known) unknown_type(op, ggml_type);
  return out;
}

template <class F, typename T, int MT>
void launch_gemv(const T* x, const MatmulShape& s, bool vec, const uint8_t* w, const float* bias, T* y,
                 cudaStream_t stream) {
  constexpr int R = 2, kColsPerCta = 8 * R;
  block_gemv_kernel<F, T, MT, R>
      <<<grid_for(s.n, kColsPerCta), 256, 0, stream>>>(x, s.m, s.k, vec, w, s.n, s.nb, bias, y);
}

template <class F>
at::Tensor matmul(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "block_matmul";
  const MatmulShape s = check_matmul(op, F::kBlock, F::kBlockBytes, x, w, bias, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({s.m, s.n}, x.options());
  if (s.m == 0 || s.n == 0) return out;
  if (s.k == 0) {
    // No blocks at all (nb == 0): the product is empty and only the bias remains.
    if (bias.has_value()) {
      out.copy_(bias->to(x.scalar_type()).unsqueeze(0).expand({s.m, s.n}));
    } else {
      out.zero_();
    }
    return out;
  }
  const bool tiled = s.m > kGemvMaxRows;
  if (tiled) {
    // The runtime attribute, not ATen's CUDAContext.h, which needs the cuSPARSE headers.
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, x.get_device()));
    TORCH_CHECK(major >= 8, op, ": the tensor-core kernel for x with more than ", kGemvMaxRows,
                " rows needs compute capability 8.0 or newer, got ", major, ".", minor, " on ", x.device());
    TORCH_CHECK((s.n + kTileN - 1) / kTileN <= 65535, op, ": w of shape ", w.sizes(), " has more than ",
                65535 * kTileN, " rows, more than one launch covers");
  }
  // grid_for's grid-stride cap never applies here: the GEMV grid covers N / 16 CTAs exactly.
  TORCH_CHECK(tiled || (s.n + 15) / 16 < (1 << 20), op, ": w of shape ", w.sizes(), " has too many rows");
  const at::Tensor xc = contiguous_aligned(x);
  const at::Tensor wc = contiguous_aligned(w);
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bias_ptr = bias.has_value() ? bias32.data_ptr<float>() : nullptr;
  const bool vec = s.k % 8 == 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = reinterpret_cast<const T*>(xc.data_ptr());
    T* yp = reinterpret_cast<T*>(out.data_ptr());
    const uint8_t* wp = wc.data_ptr<uint8_t>();
    if (tiled) {
      const dim3 grid(static_cast<unsigned>((s.m + kTileM - 1) / kTileM),
                      static_cast<unsigned>((s.n + kTileN - 1) / kTileN));
      block_mma_kernel<F, T><<<grid, kTileThreads, 0, stream>>>(xp, s.m, s.k, vec, wp, s.n, s.nb, bias_ptr, yp);
    } else if (s.m == 1) {
      launch_gemv<F, T, 1>(xp, s, vec, wp, bias_ptr, yp, stream);
    } else if (s.m <= 4) {
      launch_gemv<F, T, 4>(xp, s, vec, wp, bias_ptr, yp, stream);
    } else if (s.m <= 8) {
      launch_gemv<F, T, 8>(xp, s, vec, wp, bias_ptr, yp, stream);
    } else {
      launch_gemv<F, T, 16>(xp, s, vec, wp, bias_ptr, yp, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// `exact` is for the CPU kernels: these always accumulate in fp32 (see compute_t for the
// tensor-core inputs).
at::Tensor block_matmul(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                        int64_t ggml_type, bool /*exact*/) {
  at::Tensor out;
  const bool known = formats::visit(ggml_type, [&](auto format) { out = matmul<decltype(format)>(x, w, bias); });
  if (!known) unknown_type("block_matmul", ggml_type);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tinykern, CUDA, m) {
  m.impl("block_dequantize", &block_dequantize);
  m.impl("block_matmul", &block_matmul);
}

}  // namespace tinykern::cuda
