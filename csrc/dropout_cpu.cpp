// CPU dropout keep-bits (see dropout.h for the generator): the row helpers used by lora_cpu.cpp, AVX-512
// when the CPU has it (16 indices per step, the same keep_x16 for both helpers), and the `dropout_mask_out`
// operator the tests compare with the torch reference and the Triton kernel.
#include "dropout.h"
#include "cpu_features.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

namespace lowrank_ext {
namespace {

#define LOWRANK_DROPOUT_AVX512 __attribute__((target("avx512f")))

LOWRANK_DROPOUT_AVX512 inline __m512i fmix32_x16(__m512i h) {
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(kFmixC1)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(kFmixC2)));
  return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}

// Keep-bits of the 16 indices e, e + 1, ..., e + 15 (the high word carries where the low word wraps).
LOWRANK_DROPOUT_AVX512 inline __mmask16 keep_x16(const DropoutKey& k, uint64_t e) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(e)));
  const __m512i lo = _mm512_add_epi32(base_lo, lane);
  const __mmask16 wrapped = _mm512_cmplt_epu32_mask(lo, base_lo);
  const __m512i base_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(e >> 32) ^ k.key1));
  // hi ^ key1, with hi + 1 in the wrapped lanes
  const __m512i hi_key = _mm512_mask_mov_epi32(
      base_hi, wrapped,
      _mm512_set1_epi32(static_cast<int>((static_cast<uint32_t>(e >> 32) + 1u) ^ k.key1)));
  __m512i h = fmix32_x16(_mm512_xor_si512(lo, _mm512_set1_epi32(static_cast<int>(k.key0))));
  h = fmix32_x16(_mm512_xor_si512(h, hi_key));
  return _mm512_cmpge_epu32_mask(h, _mm512_set1_epi32(static_cast<int>(k.threshold)));
}

LOWRANK_DROPOUT_AVX512 void zero_dropped_avx512(const DropoutKey& k, int64_t e0, float* v, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __mmask16 keep = keep_x16(k, static_cast<uint64_t>(e0 + j));
    _mm512_storeu_ps(v + j, _mm512_maskz_loadu_ps(keep, v + j));
  }
  if (j < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __mmask16 keep = keep_x16(k, static_cast<uint64_t>(e0 + j)) & tail;
    _mm512_mask_storeu_ps(v + j, tail, _mm512_maskz_loadu_ps(keep, v + j));
  }
}

LOWRANK_DROPOUT_AVX512 void keep_bytes_avx512(const DropoutKey& k, int64_t e0, uint8_t* out, int64_t n) {
  const __m512i one = _mm512_set1_epi32(1);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __mmask16 keep = keep_x16(k, static_cast<uint64_t>(e0 + j));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(keep, one)));
  }
  for (; j < n; ++j) out[j] = dropout_keep(k, e0 + j) ? 1 : 0;
}

}  // namespace

void dropout_zero_dropped(const DropoutKey& k, int64_t e0, float* v, int64_t n) {
  if (!k.active || n <= 0) return;
  if (cpu_has_avx512()) {
    zero_dropped_avx512(k, e0, v, n);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    if (!dropout_keep(k, e0 + j)) v[j] = 0.0f;
  }
}

void dropout_keep_bytes(const DropoutKey& k, int64_t e0, uint8_t* out, int64_t n) {
  if (!k.active) {
    std::fill(out, out + n, static_cast<uint8_t>(1));
    return;
  }
  if (cpu_has_avx512()) {
    keep_bytes_avx512(k, e0, out, n);
    return;
  }
  for (int64_t j = 0; j < n; ++j) out[j] = dropout_keep(k, e0 + j) ? 1 : 0;
}

namespace {

// out: uint8 (rows, cols), contiguous -> the keep-bits of rows [row_offset, row_offset + rows).
void dropout_mask_out_cpu(const at::Tensor& out, int64_t row_offset, double p, int64_t seed) {
  TORCH_CHECK(out.device().is_cpu(), "out must be a CPU tensor, got ", out.device());
  TORCH_CHECK(out.scalar_type() == at::kByte && out.dim() == 2 && out.is_contiguous(),
              "out must be a contiguous 2-D uint8 tensor, got ", out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout must be a probability in [0, 1), got ", p);
  TORCH_CHECK(row_offset >= 0, "row_offset must be >= 0, got ", row_offset);
  const DropoutKey k = make_dropout_key(p, seed);
  const int64_t rows = out.size(0), cols = out.size(1);
  uint8_t* data = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dropout_keep_bytes(k, (row_offset + r) * cols, data + r * cols, cols);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) { m.impl("dropout_mask_out", &dropout_mask_out_cpu); }

}  // namespace lowrank_ext
