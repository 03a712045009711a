// Run-time CPU feature checks shared by the CPU kernels (the build never assumes AVX-512: no -march).
#pragma once

#include <cstdlib>

namespace lowrank_ext {

// AVX-512 F + BW + DQ + VL, the subset every AVX-512 path of the extension uses. LOWRANK_EXT_NO_AVX512=1
// forces the portable paths (read once), so tests can check them on any CPU.
inline bool cpu_has_avx512() {
  static const bool has = std::getenv("LOWRANK_EXT_NO_AVX512") == nullptr && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return has;
}

}  // namespace lowrank_ext
