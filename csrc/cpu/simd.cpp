#include "simd.h"

namespace tinykern::cpu {

bool has_avx2_fma() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

const char* simd_level() { return has_avx2_fma() ? "avx2+fma" : "scalar"; }

}  // namespace tinykern::cpu
