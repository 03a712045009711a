// Row conversions between the activation dtypes and float32 for the CPU LoRA kernels (lora_cpu.cpp).
//
// Both round exactly as torch's own CPU kernels do (so results are bit-identical to the `copy_` /
// `add_` they replace): float16/bfloat16 -> float32 is exact; float32 -> bfloat16 rounds to nearest even
// on the bits with NaN -> 0x7FC0 (c10::BFloat16), float32 -> float16 is IEEE round to nearest even.
// Single-threaded; AVX-512 when the CPU has it, a portable loop otherwise.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace lowrank_ext {

// dst[j] = float32(src[j]) for j in [0, n); src holds float32, float16 or bfloat16 values.
void convert_to_float(const void* src, at::ScalarType src_dtype, float* dst, int64_t n);

// out[j] = dtype(float32(out[j]) + add[j]) for j in [0, n), one rounding: what `out.add_(add)` computes
// for a float16/bfloat16 `out` and a float32 `add` (for float32, out[j] + add[j]).
void add_float_rounded(void* out, at::ScalarType dtype, const float* add, int64_t n);

}  // namespace lowrank_ext
