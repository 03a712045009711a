// CUDA forward and backward of a LoRA linear layer on a frozen 4-bit (or dense) base weight.
//
//   forward:  y  = x W^T + scale * (x_lora A^T) B^T + bias        x (M, K), W (N, K), A (r, K), B (N, r)
//             xa = x_lora A^T (float32, saved for the backward)
//   backward: dx = dy W + scale * (dy B) A
//             dA = scale * (dy B)^T x_lora,  dB = scale * dy^T xa
//
// Small M (1 <= M <= kMaxFusedRows, decoding and small batches) on a 4-bit W with K % 16 == 0 runs one
// GEMV-style kernel that streams W once and never writes it back: each warp owns kRowsPerWarp rows of W;
// per K-tile of 512 the CTA stages x[:, tile] in shared memory as fp32, and every lane reads 8 packed bytes
// (16 elements, one 64-bit load) of each of its rows, decodes them in registers (fp32 code * block
// constant, the dequantization's value before its output cast) and accumulates with the M rows of x in
// fp32. After a warp reduction, lane m finishes y[m, n] = acc + scale * xa[m] . B[n] + bias[n] with one
// rounding to x's dtype. xa comes first from at::mm (fp32, (M, r)).
// Every other case (larger M, K % 16 != 0, a packed tensor that is not 8-byte aligned, a dense W) and the
// backward dequantize W with the kernel of nf4_cuda.cu into x's dtype and call at::mm, as the torch
// backend does: at M > 16 the GEMM is compute-bound and cuBLAS is the right tool.
// Bytes moved by the fused kernel: 0.5 B of W per element plus its constants, x and y (M (K + N) elements).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "nf4_cuda.cuh"

namespace lowrank_ext {
namespace cuda {
namespace {

constexpr int64_t kMaxFusedRows = 16;  // the largest M the fused kernel takes
constexpr int kGemvWarps = 8;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerCta = kGemvWarps * kRowsPerWarp;
constexpr int kLaneElements = 16;                 // elements of one row a lane decodes per tile (8 bytes)
constexpr int kTileK = 32 * kLaneElements;        // 512 columns per tile
// Shared layout of one row of the x tile: element kk = 16 lane + j sits at j * kTileStride + lane. Lanes
// then read consecutive words (no bank conflict), and the padding to 33 keeps the transposing writes of
// the tile load to at most 2 threads per bank.
constexpr int kTileStride = 33;
constexpr int kTileRowFloats = kLaneElements * kTileStride;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int delta = 16; delta > 0; delta /= 2) v += __shfl_xor_sync(0xffffffffu, v, delta);
  return v;
}

// T: float, c10::Half or c10::BFloat16 (x and y). MAX_M >= M bounds the accumulators per thread.
template <typename T, int MAX_M>
__global__ void __launch_bounds__(kGemvWarps * 32)
    lora_gemv_kernel(const T* __restrict__ x_ptr, int M, int64_t N, int64_t K, Nf4DeviceView w, CodeTable code,
                     DynamicMap dyn, const float* __restrict__ xa_ptr, const float* __restrict__ b_ptr, int64_t rank,
                     float scale, const float* __restrict__ bias_ptr, T* __restrict__ y_ptr) {
  extern __shared__ float x_tile[];  // [M][kLaneElements][kTileStride]
  __shared__ float code_s[16];
  __shared__ float dyn_s[256];
  const float offset = stage_tables(w, code, dyn, code_s, dyn_s);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + warp * kRowsPerWarp;

  float acc[kRowsPerWarp][MAX_M];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) acc[r][m] = 0.0f;
  }

  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    __syncthreads();  // every warp is done with the previous tile
    for (int i = threadIdx.x; i < M * kTileK; i += blockDim.x) {
      const int m = i / kTileK;
      const int kk = i % kTileK;
      const int64_t k = k0 + kk;
      x_tile[m * kTileRowFloats + (kk % kLaneElements) * kTileStride + kk / kLaneElements] =
          k < K ? static_cast<float>(x_ptr[m * K + k]) : 0.0f;
    }
    __syncthreads();
    const int64_t k = k0 + lane * kLaneElements;
    if (k >= K) continue;  // K % 16 == 0: the lane's 16 elements lie wholly inside or outside the row
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t n = row0 + r;
      if (n >= N) break;
      // n K + k is a multiple of 16: 8-byte aligned bytes, and 16 elements inside one quantization block.
      const int64_t e = n * K + k;
      const uint2 bytes = __ldg(reinterpret_cast<const uint2*>(w.packed + (e >> 1)));
      const float s = block_scale(w, e >> w.log2_blocksize, dyn_s, offset);
      const uint32_t words[2] = {bytes.x, bytes.y};
      float weight[kLaneElements];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {  // little endian: byte b of word i is packed byte 4 i + b
          const uint32_t byte = (words[i] >> (8 * b)) & 0xFF;
          weight[8 * i + 2 * b] = __fmul_rn(code_s[byte >> 4], s);
          weight[8 * i + 2 * b + 1] = __fmul_rn(code_s[byte & 0xF], s);
        }
      }
#pragma unroll
      for (int m = 0; m < MAX_M; ++m) {
        if (m < M) {
          const float* xs = x_tile + m * kTileRowFloats + lane;
          float sum = acc[r][m];
#pragma unroll
          for (int j = 0; j < kLaneElements; ++j) sum = fmaf(weight[j], xs[j * kTileStride], sum);
          acc[r][m] = sum;
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t n = row0 + r;
    if (n >= N) break;  // uniform across the warp, so the shuffles below see every lane
    float base = 0.0f;
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
      if (m < M) {
        const float total = warp_sum(acc[r][m]);
        if (lane == m) base = total;
      }
    }
    if (lane < M) {
      float low_rank = 0.0f;
      for (int64_t j = 0; j < rank; ++j) low_rank = fmaf(xa_ptr[lane * rank + j], b_ptr[n * rank + j], low_rank);
      float out = base + scale * low_rank;
      if (bias_ptr != nullptr) out += bias_ptr[n];
      y_ptr[lane * N + n] = T(out);
    }
  }
}

template <typename T>
void launch_lora_gemv(const at::Tensor& x, const Nf4DeviceWeight& w, const at::Tensor& xa, const at::Tensor& b32,
                      float scale, const std::optional<at::Tensor>& bias32, at::Tensor& y) {
  const int M = static_cast<int>(x.size(0));
  const int64_t K = x.size(1);
  const int64_t N = y.size(1);
  const size_t shared_bytes = static_cast<size_t>(M) * kTileRowFloats * sizeof(float);
  const dim3 grid(static_cast<unsigned int>((N + kRowsPerCta - 1) / kRowsPerCta));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const float* bias_ptr = bias32.has_value() ? bias32->const_data_ptr<float>() : nullptr;
  const auto launch = [&](auto kernel) {
    kernel<<<grid, kGemvWarps * 32, shared_bytes, stream>>>(x.const_data_ptr<T>(), M, N, K, w.view, w.code,
                                                            dynamic_map(), xa.const_data_ptr<float>(),
                                                            b32.const_data_ptr<float>(), xa.size(1), scale, bias_ptr,
                                                            y.data_ptr<T>());
  };
  if (M == 1) {
    launch(lora_gemv_kernel<T, 1>);
  } else if (M <= 4) {
    launch(lora_gemv_kernel<T, 4>);
  } else {
    launch(lora_gemv_kernel<T, kMaxFusedRows>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------
// Validation (same wording as the CPU kernels).
// ---------------------------------------------------------------------------------------------------

void check_float(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the ext CUDA kernels, got ", t.device());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " (the device of x), got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", dt);
}

struct Shapes {
  int64_t M, K, N, r;
};

Shapes check_lora_args(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                       const std::optional<at::Tensor>& x_lora) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the ext CUDA kernels, got ", x.device());
  check_float(x, "x", x.device());
  check_float(A, "A", x.device());
  check_float(B, "B", x.device());
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(1) == x.size(1), "A must have shape (r, K) with K = ", x.size(1), ", got ",
              A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(1) == A.size(0), "B must have shape (N, r) with r = ", A.size(0), ", got ",
              B.sizes());
  TORCH_CHECK(x.size(1) > 0 && B.size(0) > 0, "K and N must be positive, got K = ", x.size(1), ", N = ", B.size(0));
  if (x_lora.has_value()) {
    check_float(*x_lora, "x_lora", x.device());
    TORCH_CHECK(x_lora->sizes() == x.sizes(), "x_lora must have the shape of x ", x.sizes(), ", got ",
                x_lora->sizes());
  }
  return {x.size(0), x.size(1), B.size(0), A.size(0)};
}

// W (N, K) in `dtype`: the 4-bit weight decoded by the dequantization kernel, or the dense weight converted.
at::Tensor dense_weight(const at::Tensor& weight, const std::optional<Nf4DeviceWeight>& quantized, int64_t N,
                        int64_t K, at::ScalarType dtype) {
  if (quantized.has_value()) {
    at::Tensor decoded = at::empty({N, K}, weight.options().dtype(dtype));
    dequantize_into(*quantized, decoded);
    return decoded;
  }
  return weight.to(dtype);
}

std::optional<Nf4DeviceWeight> make_base(const at::Tensor& weight, const std::optional<at::Tensor>& absmax,
                                         const std::optional<at::Tensor>& absmax2,
                                         const std::optional<at::Tensor>& offset, int64_t blocksize,
                                         c10::string_view quant_type, at::ScalarType nested_dtype, int64_t N,
                                         int64_t K, const at::Device& device) {
  if (absmax.has_value()) {
    return make_device_weight(weight, *absmax, absmax2, offset, N * K, blocksize, std::string(quant_type),
                              nested_dtype, device);
  }
  check_float(weight, "weight", device);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == N && weight.size(1) == K, "dense weight must have shape (", N,
              ", ", K, ") = (B.shape[0], x.shape[1]), got ", weight.sizes());
  TORCH_CHECK(!absmax2.has_value() && !offset.has_value(), "absmax2/offset given for a dense weight");
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------------
// Operators.
// ---------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> lora_forward_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& absmax,
                                                     const std::optional<at::Tensor>& absmax2,
                                                     const std::optional<at::Tensor>& offset, int64_t blocksize,
                                                     c10::string_view quant_type, at::ScalarType nested_dtype,
                                                     const at::Tensor& A, const at::Tensor& B, double scale,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& x_lora) {
  const Shapes s = check_lora_args(x_in, A, B, x_lora);
  const at::Device device = x_in.device();
  const auto dtype = x_in.scalar_type();
  if (bias.has_value()) {
    check_float(*bias, "bias", device);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.N, "bias must have shape (", s.N, "), got ", bias->sizes());
  }
  const c10::cuda::CUDAGuard guard(device);
  const std::optional<Nf4DeviceWeight> w =
      make_base(weight, absmax, absmax2, offset, blocksize, quant_type, nested_dtype, s.N, s.K, device);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor xl = x_lora.has_value() ? x_lora->contiguous() : x;
  const at::Tensor xa = at::mm(xl.to(at::kFloat), A.to(at::kFloat).t()).contiguous();
  const at::Tensor b32 = B.to(at::kFloat).contiguous();
  const std::optional<at::Tensor> bias32 =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : std::nullopt;

  const bool fused = w.has_value() && s.M >= 1 && s.M <= kMaxFusedRows && s.K % kLaneElements == 0 &&
                     reinterpret_cast<uintptr_t>(w->view.packed) % 8 == 0;
  if (fused) {
    at::Tensor y = at::empty({s.M, s.N}, x.options());
    switch (dtype) {
      case at::kFloat:
        launch_lora_gemv<float>(x, *w, xa, b32, static_cast<float>(scale), bias32, y);
        break;
      case at::kHalf:
        launch_lora_gemv<c10::Half>(x, *w, xa, b32, static_cast<float>(scale), bias32, y);
        break;
      default:
        launch_lora_gemv<c10::BFloat16>(x, *w, xa, b32, static_cast<float>(scale), bias32, y);
        break;
    }
    return {y, xa};
  }
  // As the torch backend: the base product in x's dtype, the rest in fp32, one final rounding.
  const at::Tensor W = dense_weight(weight, w, s.N, s.K, dtype);
  at::Tensor y32 = at::mm(x, W.t()).to(at::kFloat);
  y32.add_(at::mm(xa, b32.t()), scale);
  if (bias32.has_value()) y32.add_(*bias32);
  return {y32.to(dtype), xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& absmax,
    const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset, int64_t blocksize,
    c10::string_view quant_type, at::ScalarType nested_dtype, const at::Tensor& A, const at::Tensor& B, double scale,
    const at::Tensor& xa, const std::optional<at::Tensor>& x_lora, bool need_dx, bool need_dA, bool need_dB) {
  const Shapes s = check_lora_args(x, A, B, x_lora);
  const at::Device device = x.device();
  check_float(dy_in, "dy", device);
  TORCH_CHECK(dy_in.dim() == 2 && dy_in.size(0) == s.M && dy_in.size(1) == s.N, "dy must have shape (", s.M, ", ",
              s.N, "), got ", dy_in.sizes());
  TORCH_CHECK(xa.is_cuda() && xa.device() == device, "xa must be on ", device, " (the device of x), got ",
              xa.device());
  TORCH_CHECK(xa.scalar_type() == at::kFloat && xa.dim() == 2 && xa.size(0) == s.M && xa.size(1) == s.r,
              "xa must be float32 of shape (", s.M, ", ", s.r, ") (the forward's second output), got ",
              xa.scalar_type(), " ", xa.sizes());
  const c10::cuda::CUDAGuard guard(device);
  const auto dtype = x.scalar_type();
  const at::Tensor dy = dy_in.to(dtype).contiguous();
  const at::Tensor dy32 = dy_in.to(at::kFloat);
  const at::Tensor xl = x_lora.has_value() ? *x_lora : x;
  const at::Tensor A32 = A.to(at::kFloat);
  const at::Tensor B32 = B.to(at::kFloat);
  const at::Tensor empty = at::empty({0}, x.options());

  // g = scale * dy B (M, r), fp32
  const at::Tensor g = (need_dx || need_dA) ? at::mm(dy32, B32).mul_(scale) : empty;
  const at::Tensor dA = need_dA ? at::mm(g.t(), xl.to(at::kFloat)).to(A.scalar_type()) : empty;
  const at::Tensor dB = need_dB ? at::mm(dy32.t(), xa).mul_(scale).to(B.scalar_type()) : empty;
  at::Tensor dx = empty;
  if (need_dx) {
    const std::optional<Nf4DeviceWeight> w =
        make_base(weight, absmax, absmax2, offset, blocksize, quant_type, nested_dtype, s.N, s.K, device);
    const at::Tensor W = dense_weight(weight, w, s.N, s.K, dtype);
    dx = at::mm(dy, W).to(at::kFloat).add_(at::mm(g, A32)).to(dtype);
  }
  return {dx, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("lora_forward", &lora_forward_cuda);
  m.impl("lora_backward", &lora_backward_cuda);
}

}  // namespace cuda
}  // namespace lowrank_ext
