// CUDA kernels for NF4/FP4 dequantization and for reconstructing double-quantized block constants.
//
// Numerics (bit-identical to dequantize_4bit_ref / double_dequantize_ref in kernels/nf4.py):
//   constant:   plain fp32 absmax, or fp32(dyn[q] * nested_absmax[b / 256]) + nested_offset with two roundings
//               (bf16/fp16 nested_dtype: T(T(product) + T(nested_offset))); see block_scale in nf4_cuda.cuh.
//   dequantize: out = T(code[q] * constant), the product in fp32 and one round-to-nearest-even cast.
//
// Layout: one thread decodes 32 consecutive elements (16 packed bytes, one 128-bit load). A block holds
// 32..4096 elements, a power of two, so 32 elements aligned on 32 share one constant. The outputs leave
// as 16-byte stores (8 for fp32, 4 for bf16/fp16). The code table (and the dynamic map of a
// double-quantized weight) sit in shared memory, where the data-dependent lookups of a warp do not
// serialise as they would in constant memory. A packed tensor that is not 16-byte aligned (a view at an
// odd offset) and the last partial chunk take a byte-by-byte path with the same arithmetic.
// Bytes moved per element (blocksize 64, double quant, bf16 out): 0.5 + 1/64 + 2 = 2.52 B.
#include "nf4_cuda.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "nf4_cpu.h"

namespace lowrank_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 32;  // elements per thread: 16 packed bytes

enum class OutKind { kFloat, kHalf, kBFloat16 };

// Bits: how an output element is stored (fp32 as float, bf16/fp16 as their 16-bit pattern).
template <OutKind KIND>
struct OutTraits {
  using Bits = uint16_t;
};
template <>
struct OutTraits<OutKind::kFloat> {
  using Bits = float;
};

template <OutKind KIND>
__device__ __forceinline__ typename OutTraits<KIND>::Bits to_bits(float v) {
  if constexpr (KIND == OutKind::kFloat) {
    return v;
  } else if constexpr (KIND == OutKind::kBFloat16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

// One thread per 32-element chunk, grid-stride. VECTORIZED: packed is 16-byte aligned (the output
// always is: a fresh allocation, and chunk c starts at byte 32 * c * sizeof(out)).
template <OutKind KIND, bool VECTORIZED>
__global__ void __launch_bounds__(kThreads)
    nf4_dequantize_kernel(Nf4DeviceView w, CodeTable code, DynamicMap dyn, void* __restrict__ out_ptr) {
  using Bits = typename OutTraits<KIND>::Bits;
  __shared__ float code_s[16];
  __shared__ float dyn_s[256];
  const float nested_offset = stage_tables(w, code, dyn, code_s, dyn_s);
  Bits* out = static_cast<Bits*>(out_ptr);
  const int64_t chunks = (w.numel + kChunk - 1) / kChunk;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; chunk < chunks;
       chunk += stride) {
    const int64_t start = chunk * kChunk;
    const float scale = block_scale(w, start >> w.log2_blocksize, dyn_s, nested_offset);
    if (VECTORIZED && start + kChunk <= w.numel) {
      const uint4 bytes = __ldg(reinterpret_cast<const uint4*>(w.packed) + chunk);
      const uint32_t words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
      constexpr int kStores = kChunk * sizeof(Bits) / 16;
      union {
        Bits value[kChunk];
        uint4 store[kStores];
      } result;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {  // little endian: byte b of word i is packed byte 4 i + b
          const uint32_t byte = (words[i] >> (8 * b)) & 0xFF;
          result.value[8 * i + 2 * b] = to_bits<KIND>(__fmul_rn(code_s[byte >> 4], scale));
          result.value[8 * i + 2 * b + 1] = to_bits<KIND>(__fmul_rn(code_s[byte & 0xF], scale));
        }
      }
      uint4* dst = reinterpret_cast<uint4*>(out + start);
#pragma unroll
      for (int s = 0; s < kStores; ++s) dst[s] = result.store[s];
    } else {
      const int64_t end = start + kChunk < w.numel ? start + kChunk : w.numel;
      for (int64_t e = start; e < end; ++e) {
        const uint8_t byte = w.packed[e >> 1];
        const int q = (e & 1) ? (byte & 0xF) : (byte >> 4);
        out[e] = to_bits<KIND>(__fmul_rn(code_s[q], scale));
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    double_dequantize_kernel(Nf4DeviceView w, DynamicMap dyn, int64_t count, float* __restrict__ out) {
  __shared__ float dyn_s[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) dyn_s[i] = dyn.value[i];
  __syncthreads();
  const float nested_offset = round_nested(w.nested, *w.nested_offset);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    out[i] = block_scale(w, i, dyn_s, nested_offset);
  }
}

// Enough CTAs for one item per thread, capped (the kernels stride over the rest).
unsigned int grid_for(int64_t items) {
  const int64_t ctas = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(ctas, int64_t{1} << 30)));
}

template <OutKind KIND>
void launch_dequantize(const Nf4DeviceWeight& w, void* out, cudaStream_t stream) {
  const int64_t chunks = (w.view.numel + kChunk - 1) / kChunk;
  const bool aligned = reinterpret_cast<uintptr_t>(w.view.packed) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (aligned) {
    nf4_dequantize_kernel<KIND, true><<<grid_for(chunks), kThreads, 0, stream>>>(w.view, w.code, dynamic_map(), out);
  } else {
    nf4_dequantize_kernel<KIND, false><<<grid_for(chunks), kThreads, 0, stream>>>(w.view, w.code, dynamic_map(), out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

NestedKind nested_kind(at::ScalarType nested_dtype) {
  switch (nested_dtype) {
    case at::kFloat:
      return NestedKind::kFloat;
    case at::kBFloat16:
      return NestedKind::kBFloat16;
    case at::kHalf:
      return NestedKind::kHalf;
    default:
      break;
  }
  TORCH_CHECK(false, "nested_dtype must be float32, float16 or bfloat16, got ", nested_dtype);
}

int log2_of(int64_t blocksize) {
  int log2 = 0;
  while ((int64_t{1} << log2) < blocksize) ++log2;
  return log2;
}

void check_on_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the ext CUDA kernels, got ", t.device());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " with the other inputs, got ", t.device());
}

void check_output_dtype(at::ScalarType dtype, const char* what) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, what,
              " must be float32, float16 or bfloat16, got ", dtype);
}

// ---------------------------------------------------------------------------------------------------
// Operators.
// ---------------------------------------------------------------------------------------------------

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_offset,
                                c10::IntArrayRef shape, at::ScalarType dtype, int64_t blocksize,
                                c10::string_view quant_type, at::ScalarType nested_dtype) {
  check_output_dtype(dtype, "dtype");
  int64_t n = 1;
  for (int64_t d : shape) {
    TORCH_CHECK(d >= 0, "shape must not have negative sizes, got ", shape);
    n *= d;
  }
  TORCH_CHECK(n > 0, "shape ", shape, " has no elements");
  TORCH_CHECK(packed.is_cuda(), "packed must be a CUDA tensor for the ext CUDA kernels, got ", packed.device());
  const c10::cuda::CUDAGuard guard(packed.device());
  const Nf4DeviceWeight w = make_device_weight(packed, absmax, nested_absmax, nested_offset, n, blocksize,
                                               std::string(quant_type), nested_dtype, packed.device());
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  dequantize_into(w, out);
  return out;
}

// The same decode into a caller's contiguous buffer (its shape and dtype are the request's).
void dequantize_4bit_out_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_offset,
                              int64_t blocksize, c10::string_view quant_type, at::ScalarType nested_dtype,
                              at::Tensor& out) {
  check_output_dtype(out.scalar_type(), "out dtype");
  TORCH_CHECK(out.is_cuda(), "out must be a CUDA tensor for the ext CUDA kernels, got ", out.device());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous, got strides ", out.strides(), " for shape ", out.sizes());
  TORCH_CHECK(out.numel() > 0, "out (shape ", out.sizes(), ") has no elements");
  const c10::cuda::CUDAGuard guard(out.device());
  const Nf4DeviceWeight w = make_device_weight(packed, absmax, nested_absmax, nested_offset, out.numel(), blocksize,
                                               std::string(quant_type), nested_dtype, out.device());
  dequantize_into(w, out);
}

at::Tensor double_dequantize_cuda(const at::Tensor& qabsmax_in, const at::Tensor& nested_absmax_in,
                                  const at::Tensor& nested_offset_in, at::ScalarType nested_dtype) {
  TORCH_CHECK(qabsmax_in.scalar_type() == at::kByte && qabsmax_in.dim() == 1 && qabsmax_in.numel() > 0,
              "qabsmax must be a non-empty 1-D uint8 tensor, got ", qabsmax_in.scalar_type(), " of shape ",
              qabsmax_in.sizes());
  const at::Device device = qabsmax_in.device();
  check_on_device(qabsmax_in, "qabsmax", device);
  check_on_device(nested_absmax_in, "nested_absmax", device);
  check_on_device(nested_offset_in, "nested_offset", device);
  const int64_t nb = qabsmax_in.numel();
  const int64_t n2 = (nb + 255) / 256;
  TORCH_CHECK(nested_absmax_in.scalar_type() == at::kFloat && nested_absmax_in.numel() == n2,
              "nested_absmax must be float32 with ", n2, " entries for ", nb, " nested codes, got ",
              nested_absmax_in.scalar_type(), " with ", nested_absmax_in.numel());
  TORCH_CHECK(nested_offset_in.scalar_type() == at::kFloat && nested_offset_in.numel() == 1,
              "nested_offset must be a one-element float32 tensor, got ", nested_offset_in.scalar_type(), " with ",
              nested_offset_in.numel(), " elements");
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor qabsmax = qabsmax_in.contiguous();
  const at::Tensor nested_absmax = nested_absmax_in.contiguous();
  const at::Tensor nested_offset = nested_offset_in.contiguous();
  Nf4DeviceView view;
  view.qabsmax = qabsmax.const_data_ptr<uint8_t>();
  view.nested_absmax = nested_absmax.const_data_ptr<float>();
  view.nested_offset = nested_offset.const_data_ptr<float>();
  view.nested = nested_kind(nested_dtype);
  at::Tensor out = at::empty({nb}, qabsmax.options().dtype(at::kFloat));
  double_dequantize_kernel<<<grid_for(nb), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      view, dynamic_map(), nb, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Shared helpers (declared in nf4_cuda.cuh).
// ---------------------------------------------------------------------------------------------------

DynamicMap dynamic_map() {
  DynamicMap map;
  std::copy(kDynamicMap, kDynamicMap + 256, map.value);
  return map;
}

Nf4DeviceWeight make_device_weight(const at::Tensor& packed, const at::Tensor& absmax,
                                   const std::optional<at::Tensor>& nested_absmax,
                                   const std::optional<at::Tensor>& nested_offset,
                                   int64_t numel, int64_t blocksize, const std::string& quant_type,
                                   at::ScalarType nested_dtype, const at::Device& device) {
  check_quant_args(blocksize, quant_type);
  const NestedKind kind = nested_kind(nested_dtype);  // checked for a plain absmax too, as the CPU kernels do
  check_on_device(packed, "packed", device);
  check_on_device(absmax, "absmax", device);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (numel + 1) / 2, "packed must be uint8 with ",
              (numel + 1) / 2, " bytes for ", numel, " elements, got ", packed.scalar_type(), " with ",
              packed.numel());
  TORCH_CHECK(nested_absmax.has_value() == nested_offset.has_value(),
              "nested_absmax and nested_offset must be given together (double quantization) or not at all");
  const int64_t nb = (numel + blocksize - 1) / blocksize;
  Nf4DeviceWeight w;
  w.keep.push_back(packed.contiguous());
  w.view.packed = w.keep.back().const_data_ptr<uint8_t>();
  w.view.numel = numel;
  w.view.log2_blocksize = log2_of(blocksize);
  const float* code = quant_type == "nf4" ? kNF4Code : kFP4Code;
  std::copy(code, code + 16, w.code.value);
  if (nested_absmax.has_value()) {
    check_on_device(*nested_absmax, "nested_absmax", device);
    check_on_device(*nested_offset, "nested_offset", device);
    TORCH_CHECK(absmax.scalar_type() == at::kByte && absmax.numel() == nb, "absmax (nested codes) must be uint8 with ",
                nb, " entries (blocksize ", blocksize, "), got ", absmax.scalar_type(), " with ", absmax.numel());
    const int64_t n2 = (nb + 255) / 256;
    TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat && nested_absmax->numel() == n2,
                "nested_absmax must be float32 with ", n2, " entries for ", nb, " nested codes, got ",
                nested_absmax->scalar_type(), " with ", nested_absmax->numel());
    TORCH_CHECK(nested_offset->scalar_type() == at::kFloat && nested_offset->numel() == 1,
                "nested_offset must be a one-element float32 tensor, got ", nested_offset->scalar_type(), " with ",
                nested_offset->numel(), " elements");
    w.keep.push_back(absmax.contiguous());
    w.view.qabsmax = w.keep.back().const_data_ptr<uint8_t>();
    w.keep.push_back(nested_absmax->contiguous());
    w.view.nested_absmax = w.keep.back().const_data_ptr<float>();
    w.keep.push_back(nested_offset->contiguous());
    w.view.nested_offset = w.keep.back().const_data_ptr<float>();
    w.view.nested = kind;
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == nb, "absmax must be float32 with ", nb,
                " entries (blocksize ", blocksize, "), got ", absmax.scalar_type(), " with ", absmax.numel(),
                " (uint8 nested codes need nested_absmax and nested_offset)");
    w.keep.push_back(absmax.contiguous());
    w.view.absmax = w.keep.back().const_data_ptr<float>();
  }
  return w;
}

void dequantize_into(const Nf4DeviceWeight& w, at::Tensor& out) {
  TORCH_CHECK(out.is_contiguous() && out.numel() == w.view.numel, "dequantize_into: out must be contiguous with ",
              w.view.numel, " elements, got ", out.sizes());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index());
  switch (out.scalar_type()) {
    case at::kFloat:
      launch_dequantize<OutKind::kFloat>(w, out.data_ptr(), stream);
      break;
    case at::kHalf:
      launch_dequantize<OutKind::kHalf>(w, out.data_ptr(), stream);
      break;
    case at::kBFloat16:
      launch_dequantize<OutKind::kBFloat16>(w, out.data_ptr(), stream);
      break;
    default:
      TORCH_CHECK(false, "dequantization dtype must be float32, float16 or bfloat16, got ", out.scalar_type());
  }
}

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("dequantize_4bit_out", &dequantize_4bit_out_cuda);
  m.impl("double_dequantize", &double_dequantize_cuda);
}

}  // namespace cuda
}  // namespace lowrank_ext
