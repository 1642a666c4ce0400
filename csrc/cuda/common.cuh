// What the CUDA kernels share: float conversions of the activation types (torch builds
// extensions with the implicit half/bf16 conversions disabled), vector loads and stores, warp
// sums, dtype dispatch and the launch context.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace tinykern::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, as torch's .to(dtype) does.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float half_bits_to_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xFFFFu)));
}

// Four consecutive values as floats: one 16-byte (fp32) or 8-byte (16-bit types) load, so p
// must be aligned to four elements.
__device__ __forceinline__ void load4(const float* p, float o[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  o[0] = v.x, o[1] = v.y, o[2] = v.z, o[3] = v.w;
}
__device__ __forceinline__ void load4(const __half* p, float o[4]) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&v.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&v.y));
  o[0] = a.x, o[1] = a.y, o[2] = b.x, o[3] = b.y;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float o[4]) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v.y));
  o[0] = a.x, o[1] = a.y, o[2] = b.x, o[3] = b.y;
}

// Eight values to p, aligned to eight elements: 2 x 16 bytes (fp32) or 16 bytes.
__device__ __forceinline__ void store8(float* p, const float v[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(__half* p, const float v[8]) {
  uint4 u;
  __half2 h[4] = {__floats2half2_rn(v[0], v[1]), __floats2half2_rn(v[2], v[3]), __floats2half2_rn(v[4], v[5]),
                  __floats2half2_rn(v[6], v[7])};
  memcpy(&u, h, 16);
  *reinterpret_cast<uint4*>(p) = u;
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float v[8]) {
  uint4 u;
  __nv_bfloat162 h[4] = {__floats2bfloat162_rn(v[0], v[1]), __floats2bfloat162_rn(v[2], v[3]),
                         __floats2bfloat162_rn(v[4], v[5]), __floats2bfloat162_rn(v[6], v[7])};
  memcpy(&u, h, 16);
  *reinterpret_cast<uint4*>(p) = u;
}

// Byte e (0..3) of w as an exact float, without the slower integer-to-float unit: 0x4B0000bb
// read as a float is 2^23 + bb.
__device__ __forceinline__ float byte_to_float(uint32_t w, int e) {
  return __int_as_float(__byte_perm(w, 0x4B000000u, e | 0x7540)) - 8388608.f;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// t contiguous with its data 16-byte aligned (a view with a storage offset may not be).
inline at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c.data_ptr()) ? c : c.clone();
}

// Runs fn(T*) with T the CUDA type of an fp32/fp16/bf16 dtype (checked by the caller).
template <class Fn>
void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kFloat) {
    fn(static_cast<float*>(nullptr));
  } else if (dtype == at::kHalf) {
    fn(static_cast<__half*>(nullptr));
  } else {
    fn(static_cast<__nv_bfloat16*>(nullptr));
  }
}

inline unsigned grid_for(int64_t items, int64_t per_cta) {
  // Grid-stride loops cover the rest; 1 << 20 CTAs is far past what fills any GPU.
  const int64_t ctas = (items + per_cta - 1) / per_cta;
  return static_cast<unsigned>(ctas < (1 << 20) ? (ctas > 0 ? ctas : 1) : (1 << 20));
}

}  // namespace tinykern::cuda
