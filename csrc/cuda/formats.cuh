// The GGML block formats on CUDA, one trait struct each, as csrc/cpu/blockquant.h's Format
// structs are on the CPU: kType (the GGML type id), kBlock weights in kBlockBytes bytes,
// kAlign (the byte alignment every block has inside a 16-byte aligned tensor: blocks of 18,
// 22, 34, 110 and 210 bytes are only 2-byte aligned) and
//
//   decode8(blk, g, w): weights 8g..8g+7 of the block at blk (0 <= g < kBlock / 8) as fp32,
//   bit-identical to gguf-py's fp32 dequantization (gguf/quants.py).
//
// Eight consecutive weights always share one scale (sub-blocks are 16 or 32 weights) and come
// from eight consecutive bytes of each code array, so a group is one 8-byte read per array.
// Every product and sum uses the _rn intrinsics: nvcc contracts a*b+c into an FMA otherwise,
// which rounds once where numpy rounds twice.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace tinykern::cuda::formats {

// 8 bytes at p, known to be A-byte aligned (A = 2, 4, 8 or 16), as two little-endian words.
template <int A>
__device__ __forceinline__ uint2 load8(const uint8_t* p) {
  if constexpr (A >= 8) {
    return *reinterpret_cast<const uint2*>(p);
  } else if constexpr (A == 4) {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(p);
    return make_uint2(q[0], q[1]);
  } else {
    static_assert(A == 2, "blocks are at least 2-byte aligned");
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
    return make_uint2(h[0] | (static_cast<uint32_t>(h[1]) << 16), h[2] | (static_cast<uint32_t>(h[3]) << 16));
  }
}

// 4 bytes at p, A-byte aligned, as one little-endian word.
template <int A>
__device__ __forceinline__ uint32_t load4(const uint8_t* p) {
  if constexpr (A >= 4) {
    return *reinterpret_cast<const uint32_t*>(p);
  } else {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
    return h[0] | (static_cast<uint32_t>(h[1]) << 16);
  }
}

// The fp16 at p (2-byte aligned) as fp32 (exact).
__device__ __forceinline__ float f16_at(const uint8_t* p) {
  return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(p)));
}

// Byte e (0..7) of v, an unsigned code, minus `offset` as an exact float: one byte permute
// builds the float with bits 0x4B0000bb, 2^23 + bb, and one subtraction removes 2^23 + offset.
// Codes are unpacked a word (four weights) at a time into such bytes.
__device__ __forceinline__ float code_to_float(uint2 v, int e, float offset) {
  const float f = __int_as_float(__byte_perm(e < 4 ? v.x : v.y, 0x4B000000u, (e & 3) | 0x7540));
  return __fsub_rn(f, 8388608.f + offset);
}

// Each byte of v shifted right by `shift` and masked: (v >> shift) & mask per byte, with the
// mask repeated in every byte so that no bits cross from the next byte.
__device__ __forceinline__ uint2 bytes_shr(uint2 v, int shift, uint32_t mask) {
  return make_uint2((v.x >> shift) & mask, (v.y >> shift) & mask);
}
__device__ __forceinline__ uint2 bytes_or(uint2 a, uint2 b, int shift) {
  return make_uint2(a.x | (b.x << shift), a.y | (b.y << shift));
}

// Bits 0..7 of h spread to bit 0 of bytes 0..7: 0x00204081 moves bit i of a nibble to bit 8i,
// and its four shifted copies never overlap, so no carries.
__device__ __forceinline__ uint2 bits_to_bytes(uint32_t h) {
  return make_uint2(((h & 15u) * 0x00204081u) & 0x01010101u, (((h >> 4) & 15u) * 0x00204081u) & 0x01010101u);
}

// An integer |v| < 2^22 as an exact float, on the FP32 pipe instead of the slower I2F: the
// float with bits 0x4B400000 + v is 1.5 * 2^23 + v.
__device__ __forceinline__ float int_to_float(int v) {
  return __fsub_rn(__int_as_float(0x4B400000 + v), 12582912.f);
}

// Q4_0: d fp16 | qs[16]; weight j < 16 is the low nibble of qs[j], weight 16 + j the high one;
// w = d * (q - 8).
struct Q4_0 {
  static constexpr int kType = 2, kBlock = 32, kBlockBytes = 18, kAlign = 2;
  __device__ __forceinline__ static void decode8(const uint8_t* blk, int g, float w[8]) {
    const float d = f16_at(blk);
    const uint2 c = bytes_shr(load8<kAlign>(blk + 2 + 8 * (g & 1)), 4 * (g >> 1), 0x0F0F0F0Fu);
#pragma unroll
    for (int e = 0; e < 8; ++e) w[e] = __fmul_rn(d, code_to_float(c, e, 8.f));
  }
};

// Q4_1: d fp16 | m fp16 | qs[16], nibbles as Q4_0; w = d * q + m.
struct Q4_1 {
  static constexpr int kType = 3, kBlock = 32, kBlockBytes = 20, kAlign = 4;
  __device__ __forceinline__ static void decode8(const uint8_t* blk, int g, float w[8]) {
    const float d = f16_at(blk), m = f16_at(blk + 2);
    const uint2 c = bytes_shr(load8<kAlign>(blk + 4 + 8 * (g & 1)), 4 * (g >> 1), 0x0F0F0F0Fu);
#pragma unroll
    for (int e = 0; e < 8; ++e) w[e] = __fadd_rn(__fmul_rn(d, code_to_float(c, e, 0.f)), m);
  }
};

// Q5_0: d fp16 | qh u32 | qs[16]; weight j's fifth bit is bit j of qh, its low four bits the
// nibbles as Q4_0; w = d * (q - 16).
struct Q5_0 {
  static constexpr int kType = 6, kBlock = 32, kBlockBytes = 22, kAlign = 2;
  __device__ __forceinline__ static void decode8(const uint8_t* blk, int g, float w[8]) {
    const float d = f16_at(blk);
    const uint2 high = bits_to_bytes(load4<kAlign>(blk + 2) >> (8 * g));
    const uint2 c = bytes_or(bytes_shr(load8<kAlign>(blk + 6 + 8 * (g & 1)), 4 * (g >> 1), 0x0F0F0F0Fu), high, 4);
#pragma unroll
    for (int e = 0; e < 8; ++e) w[e] = __fmul_rn(d, code_to_float(c, e, 16.f));
  }
};

// Q5_1: d fp16 | m fp16 | qh u32 | qs[16], codes as Q5_0 without the offset; w = d * q + m.
struct Q5_1 {
  static constexpr int kType = 7, kBlock = 32, kBlockBytes = 24, kAlign = 8;
  __device__ __forceinline__ static void decode8(const uint8_t* blk, int g, float w[8]) {
    const float d = f16_at(blk), m = f16_at(blk + 2);
    const uint2 high = bits_to_bytes(load4<kAlign>(blk + 4) >> (8 * g));
    const uint2 c = bytes_or(bytes_shr(load8<kAlign>(blk + 8 + 8 * (g & 1)), 4 * (g >> 1), 0x0F0F0F0Fu), high, 4);
#pragma unroll
    for (int e = 0; e < 8; ++e) w[e] = __fadd_rn(__fmul_rn(d, code_to_float(c, e, 0.f)), m);
  }
};

// Q8_0: d fp16 | qs int8[32]; w = q * d.
struct Q8_0 {
  static constexpr int kType = 8, kBlock = 32, kBlockBytes = 34, kAlign = 2;
  __device__ __forceinline__ static void decode8(const uint8_t* blk, int g, float w[8]) {
    const float d = f16_at(blk);
    // Flipping each sign bit gives the code q + 128 as an unsigned byte.
    const uint2 q = load8<kAlign>(blk + 2 + 8 * g);
    const uint2 c = make_uint2(q.x ^ 0x80808080u, q.y ^ 0x80808080u);
#pragma unroll
    for (int e = 0; e < 8; ++e) w[e] = __fmul_rn(code_to_float(c, e, 128.f), d);
  }
};

// The K-quants: 256 weights in sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 32 (Q4_K, Q5_K). In
// group g (weights i = 8g + e): half h = g / 16 of the block, 2-bit plane s = (g % 16) / 4,
// l = i % 32 = 8 (g % 4) + e.

// Q2_K: scales[16] (low nibble scale, high nibble min) | qs[64] | d fp16 | dmin fp16;
// code = (qs[32h + l] >> 2s) & 3; w = (d * sc) * q - dmin * mn for sub-block i / 16 = g / 2.
struct Q2_K {
  static constexpr int kType = 10, kBlock = 256, kBlockBytes = 84, kAlign = 4;
  __device__ __forceinline__ static void decode8(const uint8_t* blk, int g, float w[8]) {
    const float d = f16_at(blk + 80), dmin = f16_at(blk + 82);
    const uint32_t sm = blk[g >> 1];
    const float dl = __fmul_rn(d, int_to_float(static_cast<int>(sm & 15u)));
    const float ml = __fmul_rn(dmin, int_to_float(static_cast<int>(sm >> 4)));
    const uint2 c = bytes_shr(load8<kAlign>(blk + 16 + 32 * (g >> 4) + 8 * (g & 3)), 2 * ((g & 15) >> 2), 0x03030303u);
#pragma unroll
    for (int e = 0; e < 8; ++e) w[e] = __fsub_rn(__fmul_rn(dl, code_to_float(c, e, 0.f)), ml);
  }
};

// Q3_K: hmask[32] | qs[64] | scales[12] | d fp16. Low two bits as Q2_K's codes; the high bit
// is bit i / 32 = g / 4 of hmask[l], and a clear bit subtracts 4. The 6-bit scale j = g / 2:
// low four bits from scales[j] (j < 8) or scales[j - 8] >> 4, high two from
// scales[8 + j % 4] >> 2 (j / 4); w = (d * (sc - 32)) * q.
struct Q3_K {
  static constexpr int kType = 11, kBlock = 256, kBlockBytes = 110, kAlign = 2;
  __device__ __forceinline__ static void decode8(const uint8_t* blk, int g, float w[8]) {
    const float d = f16_at(blk + 108);
    const int j = g >> 1;
    const uint32_t lo = j < 8 ? (blk[96 + j] & 15u) : (blk[96 + j - 8] >> 4);
    const uint32_t hi = (blk[104 + (j & 3)] >> (2 * (j >> 2))) & 3u;
    const float dl = __fmul_rn(d, int_to_float(static_cast<int>(lo | (hi << 4)) - 32));
    // low - (high ? 0 : 4) = (low | high << 2) - 4.
    const uint2 low =
        bytes_shr(load8<kAlign>(blk + 32 + 32 * (g >> 4) + 8 * (g & 3)), 2 * ((g & 15) >> 2), 0x03030303u);
    const uint2 high = bytes_shr(load8<kAlign>(blk + 8 * (g & 3)), g >> 2, 0x01010101u);
    const uint2 c = bytes_or(low, high, 2);
#pragma unroll
    for (int e = 0; e < 8; ++e) w[e] = __fmul_rn(dl, code_to_float(c, e, 4.f));
  }
};

// Q4_K and Q5_K's 6-bit scale and min of sub-block j (docs/q4k-format.md), from scales[12].
__device__ __forceinline__ void k_scale_min(const uint8_t* scales, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = scales[j] & 63;
    *mn = scales[j + 4] & 63;
  } else {
    *sc = (scales[j + 4] & 15) | ((scales[j - 4] >> 6) << 4);
    *mn = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
  }
}

// Q4_K: d fp16 | dmin fp16 | scales[12] | qs[128]. Chunk c = g / 8 of 64 weights owns
// qs[32c ..]: its first 32 weights are the low nibbles, the next 32 the high ones;
// w = (d * sc) * q - dmin * mn for sub-block g / 4.
struct Q4_K {
  static constexpr int kType = 12, kBlock = 256, kBlockBytes = 144, kAlign = 16;
  __device__ __forceinline__ static void decode8(const uint8_t* blk, int g, float w[8]) {
    const float d = f16_at(blk), dmin = f16_at(blk + 2);
    int sc, mn;
    k_scale_min(blk + 4, g >> 2, &sc, &mn);
    const float dl = __fmul_rn(d, int_to_float(sc)), ml = __fmul_rn(dmin, int_to_float(mn));
    const uint2 c = bytes_shr(load8<8>(blk + 16 + 32 * (g >> 3) + 8 * (g & 3)), 4 * ((g >> 2) & 1), 0x0F0F0F0Fu);
#pragma unroll
    for (int e = 0; e < 8; ++e) w[e] = __fsub_rn(__fmul_rn(dl, code_to_float(c, e, 0.f)), ml);
  }
};

// Q5_K: d fp16 | dmin fp16 | scales[12] | qh[32] | qs[128]. Low nibbles as Q4_K; the fifth
// bit is bit i / 32 = g / 4 of qh[l]; w as Q4_K.
struct Q5_K {
  static constexpr int kType = 13, kBlock = 256, kBlockBytes = 176, kAlign = 16;
  __device__ __forceinline__ static void decode8(const uint8_t* blk, int g, float w[8]) {
    const float d = f16_at(blk), dmin = f16_at(blk + 2);
    int sc, mn;
    k_scale_min(blk + 4, g >> 2, &sc, &mn);
    const float dl = __fmul_rn(d, int_to_float(sc)), ml = __fmul_rn(dmin, int_to_float(mn));
    const uint2 low = bytes_shr(load8<8>(blk + 48 + 32 * (g >> 3) + 8 * (g & 3)), 4 * ((g >> 2) & 1), 0x0F0F0F0Fu);
    const uint2 high = bytes_shr(load8<8>(blk + 16 + 8 * (g & 3)), g >> 2, 0x01010101u);
    const uint2 c = bytes_or(low, high, 4);
#pragma unroll
    for (int e = 0; e < 8; ++e) w[e] = __fsub_rn(__fmul_rn(dl, code_to_float(c, e, 0.f)), ml);
  }
};

// Q6_K: ql[128] | qh[64] | scales int8[16] | d fp16. Low four bits: nibble (g % 16) / 8 of
// ql[64h + i % 64]; high two: bits 2s of qh[32h + l]; w = (d * sc) * (q - 32) for scale g / 2.
struct Q6_K {
  static constexpr int kType = 14, kBlock = 256, kBlockBytes = 210, kAlign = 2;
  __device__ __forceinline__ static void decode8(const uint8_t* blk, int g, float w[8]) {
    const float d = f16_at(blk + 208);
    const float dl = __fmul_rn(d, int_to_float(static_cast<int8_t>(blk[192 + (g >> 1)])));
    const uint2 low = bytes_shr(load8<kAlign>(blk + 64 * (g >> 4) + 8 * (g & 7)), 4 * ((g >> 3) & 1), 0x0F0F0F0Fu);
    const uint2 high =
        bytes_shr(load8<kAlign>(blk + 128 + 32 * (g >> 4) + 8 * (g & 3)), 2 * ((g & 15) >> 2), 0x03030303u);
    const uint2 c = bytes_or(low, high, 4);
#pragma unroll
    for (int e = 0; e < 8; ++e) w[e] = __fmul_rn(dl, code_to_float(c, e, 32.f));
  }
};

// Calls fn(Format{}) for GGML type `type`; false for a type with no kernels here.
template <class Fn>
bool visit(int64_t type, Fn&& fn) {
  switch (type) {
    case Q4_0::kType: fn(Q4_0{}); return true;
    case Q4_1::kType: fn(Q4_1{}); return true;
    case Q5_0::kType: fn(Q5_0{}); return true;
    case Q5_1::kType: fn(Q5_1{}); return true;
    case Q8_0::kType: fn(Q8_0{}); return true;
    case Q2_K::kType: fn(Q2_K{}); return true;
    case Q3_K::kType: fn(Q3_K{}); return true;
    case Q4_K::kType: fn(Q4_K{}); return true;
    case Q5_K::kType: fn(Q5_K{}); return true;
    case Q6_K::kType: fn(Q6_K{}); return true;
    default: return false;
  }
}

// For error messages.
inline constexpr const char* kTypeList =
    "2 (q4_0), 3 (q4_1), 6 (q5_0), 7 (q5_1), 8 (q8_0), 10 (q2_k), 11 (q3_k), 12 (q4_k), 13 (q5_k), 14 (q6_k)";

}  // namespace tinykern::cuda::formats
