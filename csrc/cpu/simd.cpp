#include "simd.h"

#include <cstdlib>
#include <cstring>

namespace tinykern::cpu {

namespace {

// 0 scalar, 1 AVX2 + FMA + F16C, 2 AVX-512F on top.
int cpu_level() {
#if defined(__x86_64__) || defined(_M_X64)
  static const int level = !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                             __builtin_cpu_supports("f16c"))
                               ? 0
                               : __builtin_cpu_supports("avx512f") ? 2 : 1;
  return level;
#else
  return 0;
#endif
}

int level() {
  const char* cap = std::getenv("TINYKERN_CPU_SIMD");
  int allowed = 2;
  if (cap != nullptr && std::strcmp(cap, "scalar") == 0) allowed = 0;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) allowed = 1;
  return cpu_level() < allowed ? cpu_level() : allowed;
}

}  // namespace

bool has_avx2_fma() { return level() >= 1; }

bool has_avx512() { return level() >= 2; }

const char* simd_level() {
  static const char* const names[] = {"scalar", "avx2+fma", "avx512"};
  return names[level()];
}

}  // namespace tinykern::cpu
