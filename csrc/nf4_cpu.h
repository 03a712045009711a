// Shared declarations of the CPU NF4/FP4 kernels (csrc/nf4_cpu.cpp) used by the fused LoRA kernels.
//
// Every file of the extension is compiled with -ffp-contract=off: the double-quantized block constant
// is fp32(dyn[q] * nested_absmax) + nested_offset with two roundings, never a fused multiply-add.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <optional>
#include <string>

#include "tables.h"

namespace lowrank_ext {

constexpr int64_t kNestedBlocksize = 256;

// A read-only view of a 4-bit tensor: packed codes plus its block constants (plain or double-quantized).
// All pointers are to contiguous CPU memory owned by the tensors the view was made from.
struct Nf4View {
  const uint8_t* packed = nullptr;   // [(numel + 1) / 2], first element in the high nibble
  const float* absmax = nullptr;     // fp32 [nb], or nullptr when double-quantized
  const uint8_t* qabsmax = nullptr;  // uint8 [nb] nested codes (double quant)
  const float* nested_absmax = nullptr;  // fp32 [ceil(nb / 256)] (double quant)
  float nested_offset = 0.0f;        // mean subtracted before the nested quantization (double quant),
                                     // already rounded to nested_dtype
  at::ScalarType nested_dtype = at::kFloat;  // dtype the constants are reconstructed in (bitsandbytes)
  int64_t numel = 0;
  int64_t blocksize = 64;
  const float* code = nullptr;       // the 16 code values of the quant type

  // The fp32 constant of block b: two roundings (product, then sum) for double-quantized constants;
  // a bf16/fp16 nested state rounds the product and the sum to that dtype too: T(T(p) + T(nested_offset)).
  inline float block_scale(int64_t b) const {
    if (absmax != nullptr) return absmax[b];
    const float product = kDynamicMap[qabsmax[b]] * nested_absmax[b / kNestedBlocksize];
    if (nested_dtype == at::kBFloat16) {
      const float sum = static_cast<float>(c10::BFloat16(product)) + nested_offset;
      return static_cast<float>(c10::BFloat16(sum));
    }
    if (nested_dtype == at::kHalf) {
      const float sum = static_cast<float>(c10::Half(product)) + nested_offset;
      return static_cast<float>(c10::Half(sum));
    }
    return product + nested_offset;
  }
};

// Checks quant_type and blocksize, naming the bad value.
void check_quant_args(int64_t blocksize, const std::string& quant_type);

// Validates the tensors of a 4-bit weight of `numel` elements and returns a view of them. The tensors
// must outlive the view; `keep` receives contiguous copies where the inputs were not contiguous.
Nf4View make_view(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                  const std::optional<at::Tensor>& nested_offset, int64_t numel, int64_t blocksize,
                  const std::string& quant_type, at::ScalarType nested_dtype, std::vector<at::Tensor>& keep);

// Decodes elements [start, start + count) of the flattened tensor into `out` (count values of `dtype`:
// float32, float16 or bfloat16), single-threaded: out = dtype(code[q] * block_scale), one rounding.
void decode_range(const Nf4View& w, int64_t start, int64_t count, void* out, at::ScalarType dtype);

}  // namespace lowrank_ext
