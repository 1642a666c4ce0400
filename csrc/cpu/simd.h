#pragma once

namespace tinykern::cpu {

// True when this CPU runs AVX2 + FMA code; kernels pick their path on it at run time.
bool has_avx2_fma();

// "avx2+fma" or "scalar": the path the CPU kernels take on this machine.
const char* simd_level();

}  // namespace tinykern::cpu
