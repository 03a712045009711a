// Shared declarations of the CUDA kernels (csrc/cuda/nf4_cuda.cu, csrc/cuda/lora_cuda.cu).
//
// Numerics are those of csrc/nf4_cpu.h and kernels/nf4.py: a double-quantized block constant is
// fp32(dyn[q] * nested_absmax) + nested_offset with two roundings -- written with __fmul_rn / __fadd_rn, which the
// compiler never contracts into an FMA, so the build does not need --fmad=false -- and a bf16/fp16
// nested state rounds the product and the sum to that dtype: T(T(p) + T(nested_offset)). Subnormal constants and
// products must survive: never build with -ftz=true or --use_fast_math (nvcc 13 defines no macro to check;
// test_ties_subnormal_and_zero_blocks in tests/csrc/test_cuda_ops.py fails if they are flushed).
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lowrank_ext {
namespace cuda {

constexpr int kNestedBlocksizeLog2 = 8;  // nested constants come in blocks of 256

// How the double-quantized block constants are reconstructed (kPlain: an fp32 absmax per block).
enum class NestedKind : int { kPlain, kFloat, kBFloat16, kHalf };

// The 16 code values of the quant type, passed by value (kernel parameter space).
struct CodeTable {
  float value[16];
};

// The signed 8-bit dynamic map of the nested quantization (1 KiB, also passed by value).
struct DynamicMap {
  float value[256];
};

// A 4-bit tensor on the device, by value: packed codes plus its block constants. The pointers are
// to contiguous device memory owned by the tensors the view was made from.
struct Nf4DeviceView {
  const uint8_t* packed = nullptr;   // [(numel + 1) / 2], first element in the high nibble
  const float* absmax = nullptr;     // fp32 [nb] (kPlain)
  const uint8_t* qabsmax = nullptr;  // uint8 [nb] nested codes (double quant)
  const float* nested_absmax = nullptr;  // fp32 [ceil(nb / 256)] (double quant)
  const float* nested_offset = nullptr;  // fp32 [1], not yet rounded to the nested dtype (double quant)
  int64_t numel = 0;
  int log2_blocksize = 6;
  NestedKind nested = NestedKind::kPlain;
};

// Host-side result of validating a 4-bit weight: the device view, its code table and the tensors
// (contiguous copies where the inputs were not) that must outlive every launch using the view.
struct Nf4DeviceWeight {
  Nf4DeviceView view;
  CodeTable code;
  std::vector<at::Tensor> keep;
};

// v rounded to the nested dtype (to nearest even) and widened back to fp32.
__device__ __forceinline__ float round_nested(NestedKind kind, float v) {
  if (kind == NestedKind::kBFloat16) return __bfloat162float(__float2bfloat16_rn(v));
  if (kind == NestedKind::kHalf) return __half2float(__float2half_rn(v));
  return v;
}

// The fp32 constant of block `block`. `dynamic_map` is the 256-entry map (in shared memory) and
// `nested_offset` the nested offset already rounded to the nested dtype; both are unused for a plain absmax.
__device__ __forceinline__ float block_scale(const Nf4DeviceView& w, int64_t block, const float* dynamic_map,
                                             float nested_offset) {
  if (w.nested == NestedKind::kPlain) return w.absmax[block];
  const float product = __fmul_rn(dynamic_map[w.qabsmax[block]], w.nested_absmax[block >> kNestedBlocksizeLog2]);
  if (w.nested == NestedKind::kFloat) return __fadd_rn(product, nested_offset);
  return round_nested(w.nested, __fadd_rn(round_nested(w.nested, product), nested_offset));
}

// Fills the shared code table (and, for a double-quantized weight, the shared dynamic map) and returns
// the nested offset rounded to the nested dtype (0 for a plain absmax). Every thread of the CTA must call it:
// it synchronises. Shared memory, not constant memory: a warp's lookups are data-dependent, and
// constant memory serialises a warp's distinct addresses.
__device__ __forceinline__ float stage_tables(const Nf4DeviceView& w, const CodeTable& code, const DynamicMap& dyn,
                                              float* code_s, float* dyn_s) {
  for (int i = threadIdx.x; i < 16; i += blockDim.x) code_s[i] = code.value[i];
  if (w.nested != NestedKind::kPlain) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) dyn_s[i] = dyn.value[i];
  }
  __syncthreads();
  return w.nested == NestedKind::kPlain ? 0.0f : round_nested(w.nested, *w.nested_offset);
}

// The dynamic map as a kernel argument.
DynamicMap dynamic_map();

// Validates the tensors of a 4-bit weight of `numel` elements (all on `device`, a CUDA device) and
// returns its device view. The messages name the bad value, as the CPU kernels' do.
Nf4DeviceWeight make_device_weight(const at::Tensor& packed, const at::Tensor& absmax,
                                   const std::optional<at::Tensor>& nested_absmax,
                                   const std::optional<at::Tensor>& nested_offset,
                                   int64_t numel, int64_t blocksize, const std::string& quant_type,
                                   at::ScalarType nested_dtype, const at::Device& device);

// Decodes the whole weight into `out` (numel elements of float32, float16 or bfloat16, contiguous, on the
// weight's device) on the current stream: out = dtype(code[q] * block_scale), one rounding.
void dequantize_into(const Nf4DeviceWeight& w, at::Tensor& out);

}  // namespace cuda
}  // namespace lowrank_ext
