#pragma once

namespace tinykern::cpu {

// True when this CPU runs AVX2 + FMA (+ F16C, which every AVX2 CPU has) code; kernels pick
// their path on it at each call.
bool has_avx2_fma();

// True when, on top of that, it runs AVX-512F (the Q4_K GEMV has a 16-lane variant).
bool has_avx512();

// True when, on top of AVX-512F, the CPU has AVX512-BW, -VL and -VNNI (the int8 kernels'
// 16-lane variant; without them they take the AVX2 one). Capped like has_avx512().
bool has_avx512_vnni();

// True when, on top of that, the CPU has AMX-BF16 and torch's oneDNN brgemm ukernel runs on it.
bool has_amx_bf16();

// True when the CPU multiplies bf16 in hardware: AMX-BF16, or AVX512-BF16 on top of AVX-512F
// (the bf16 path of the wide matmul: there oneDNN's bf16 GEMM runs 4-5x its fp32 one).
bool has_bf16_gemm();

// "avx512+amx", "avx512", "avx2+fma" or "scalar": the widest path the CPU kernels take on this machine.
// TINYKERN_CPU_SIMD=avx512, =avx2 or =scalar caps it (read at each call, so tests can reach every path).
const char* simd_level();

}  // namespace tinykern::cpu
