#include "simd.h"

#include <ATen/native/CPUBlas.h>

#include <cstdlib>
#include <cstring>

namespace tinykern::cpu {

namespace {

// 0 scalar, 1 AVX2 + FMA + F16C, 2 AVX-512F on top, 3 AMX-BF16 with oneDNN's brgemm on top.
int cpu_level() {
#if defined(__x86_64__) || defined(_M_X64)
  static const int level = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) return 0;
    if (!__builtin_cpu_supports("avx512f")) return 1;
    // could_pack: torch's oneDNN ukernel runs here (it needs AMX); amx-bf16 itself is asked of
    // the CPU as well, since the ukernel also serves int8.
    return __builtin_cpu_supports("amx-bf16") && at::native::cpublas::could_pack(at::kBFloat16) ? 3 : 2;
  }();
  return level;
#else
  return 0;
#endif
}

int level() {
  const char* cap = std::getenv("TINYKERN_CPU_SIMD");
  int allowed = 3;
  if (cap != nullptr && std::strcmp(cap, "scalar") == 0) allowed = 0;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) allowed = 1;
  if (cap != nullptr && std::strcmp(cap, "avx512") == 0) allowed = 2;
  return cpu_level() < allowed ? cpu_level() : allowed;
}

}  // namespace

bool has_avx2_fma() { return level() >= 1; }

bool has_avx512() { return level() >= 2; }

bool has_avx512_vnni() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool vnni = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("avx512vnni");
  return vnni && has_avx512();
#else
  return false;
#endif
}

bool has_amx_bf16() { return level() >= 3; }

bool has_bf16_gemm() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx512_bf16 = __builtin_cpu_supports("avx512bf16");
  return has_amx_bf16() || (avx512_bf16 && has_avx512());
#else
  return false;
#endif
}

const char* simd_level() {
  static const char* const names[] = {"scalar", "avx2+fma", "avx512", "avx512+amx"};
  return names[level()];
}

}  // namespace tinykern::cpu
