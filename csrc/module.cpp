// The lowrank._C extension module: operator schemas of the `lowrank_ext` namespace.
//
// Importing `lowrank._C` runs the static registrations below (schemas) and in nf4_cpu.cpp / lora_cpu.cpp
// (CPU kernels). Fake (meta) implementations are registered in Python by lowrank._ext, next to the
// wrappers that adapt these ops to the dispatch point's signatures.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(lowrank_ext, m) {
  // x: any shape, float32/float16/bfloat16 -> packed uint8 ((n + 1) // 2, 1), absmax float32 [ceil(n / blocksize)]
  m.def("quantize_4bit(Tensor x, int blocksize, str quant_type) -> (Tensor, Tensor)");
  // absmax float32 [nb] -> nested codes uint8 [nb], nested_absmax float32 [ceil(nb / 256)],
  // nested_offset float32 0-dim
  m.def("double_quantize(Tensor absmax) -> (Tensor, Tensor, Tensor)");
  // -> float32 [nb]: fp32(dyn[q] * nested_absmax[i // 256]) + nested_offset
  // (bf16/fp16 nested_dtype: T(T(p) + T(nested_offset)))
  m.def(
      "double_dequantize(Tensor qabsmax, Tensor nested_absmax, Tensor nested_offset, ScalarType nested_dtype) "
      "-> Tensor");
  // absmax is float32 [nb], or uint8 [nb] nested codes when nested_absmax/nested_offset are given -> `shape` in `dtype`
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_offset, int[] shape, "
      "ScalarType dtype, int blocksize, str quant_type, ScalarType nested_dtype) -> Tensor");
  // the same into `out` (contiguous, its shape and dtype are the request's), e.g. a buffer reused across calls
  m.def(
      "dequantize_4bit_out(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_offset, "
      "int blocksize, str quant_type, ScalarType nested_dtype, Tensor(a!) out) -> ()");
  // y = x W^T + scale (drop(x) A^T) B^T + bias, W (N, K) 4-bit (packed uint8 + constants) or dense when absmax
  // is None. x (M, K), A (r, K), B (N, r) -> y (M, N) in x.dtype, xa = (keep * x) A^T (M, r) float32.
  // drop(x) = keep * x / (1 - dropout), keep from (dropout_seed, m K + k) by csrc/dropout.h; dropout 0: none.
  m.def(
      "lora_forward(Tensor x, Tensor weight, Tensor? absmax, Tensor? nested_absmax, Tensor? nested_offset, "
      "int blocksize, str quant_type, ScalarType nested_dtype, Tensor A, Tensor B, float scale, Tensor? bias, "
      "float dropout, int dropout_seed) -> (Tensor, Tensor)");
  // dx = dy W + s' keep * ((dy B) A), dA = s' (dy B)^T (keep * x), dB = s' dy^T xa with s' = scale / (1 - dropout)
  // and the forward's mask regenerated from the seed; a gradient that is not needed comes back as an empty
  // (0-element) tensor.
  m.def(
      "lora_backward(Tensor dy, Tensor x, Tensor weight, Tensor? absmax, Tensor? nested_absmax, "
      "Tensor? nested_offset, int blocksize, str quant_type, ScalarType nested_dtype, Tensor A, Tensor B, "
      "float scale, Tensor xa, float dropout, int dropout_seed, bool need_dx, bool need_dA, bool need_dB) -> (Tensor, Tensor, Tensor)");
  // out uint8 (rows, cols) <- the dropout keep-bits of rows [row_offset, row_offset + rows) (csrc/dropout.h)
  m.def("dropout_mask_out(Tensor(a!) out, int row_offset, float p, int seed) -> ()");
}

static PyModuleDef lowrank_c_module = {PyModuleDef_HEAD_INIT, "lowrank._C",
                                       "lowrank's optional C++ kernels (torch.ops.lowrank_ext)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lowrank_c_module); }
