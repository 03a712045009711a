// See convert_cpu.h. Bytes moved per element: 2 B read + 4 B written (convert_to_float from 16-bit),
// 2 + 4 B read + 2 B written (add_float_rounded on a 16-bit out). torch's TensorIterator `copy_` / `add_`
// between mixed dtypes ran at ~1-2 G elements/s on this project's CPU; these loops run at memory speed.
#include "convert_cpu.h"

// GCC 12 flags the intrinsics' own _mm*_undefined_* pass-through operands as maybe-uninitialized once
// they are inlined into masked loads; the values are never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "cpu_features.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>

namespace lowrank_ext {
namespace {

#define LOWRANK_CONVERT_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

LOWRANK_CONVERT_AVX512 inline __m512 load16_as_float(const uint16_t* p, bool bf16, __mmask16 m) {
  const __m256i bits = _mm256_maskz_loadu_epi16(m, p);
  if (bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  return _mm512_cvtph_ps(bits);
}

// float32 -> bfloat16 bits, round to nearest even, NaN -> 0x7FC0 (c10::BFloat16's rule).
LOWRANK_CONVERT_AVX512 inline __m256i float_to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

LOWRANK_CONVERT_AVX512 inline void store16_from_float(uint16_t* p, __m512 v, bool bf16, __mmask16 m) {
  const __m256i bits = bf16 ? float_to_bf16(v) : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_mask_storeu_epi16(p, m, bits);
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

LOWRANK_CONVERT_AVX512 void convert16_avx512(const uint16_t* src, bool bf16, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    _mm512_mask_storeu_ps(dst + j, m, load16_as_float(src + j, bf16, m));
  }
}

LOWRANK_CONVERT_AVX512 void add16_avx512(uint16_t* out, bool bf16, const float* add, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 sum = _mm512_add_ps(load16_as_float(out + j, bf16, m), _mm512_maskz_loadu_ps(m, add + j));
    store16_from_float(out + j, sum, bf16, m);
  }
}

template <typename T>
void convert_portable(const T* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
void add_portable(T* out, const float* add, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(static_cast<float>(out[j]) + add[j]);
}

}  // namespace

void convert_to_float(const void* src, at::ScalarType src_dtype, float* dst, int64_t n) {
  switch (src_dtype) {
    case at::kFloat:
      std::copy_n(static_cast<const float*>(src), n, dst);
      return;
    case at::kBFloat16:
    case at::kHalf:
      if (cpu_has_avx512()) {
        convert16_avx512(static_cast<const uint16_t*>(src), src_dtype == at::kBFloat16, dst, n);
      } else if (src_dtype == at::kBFloat16) {
        convert_portable(static_cast<const c10::BFloat16*>(src), dst, n);
      } else {
        convert_portable(static_cast<const c10::Half*>(src), dst, n);
      }
      return;
    default:
      TORCH_CHECK(false, "convert_to_float: dtype must be float32, float16 or bfloat16, got ", src_dtype);
  }
}

void add_float_rounded(void* out, at::ScalarType dtype, const float* add, int64_t n) {
  switch (dtype) {
    case at::kFloat: {
      float* o = static_cast<float*>(out);
      for (int64_t j = 0; j < n; ++j) o[j] += add[j];
      return;
    }
    case at::kBFloat16:
    case at::kHalf:
      if (cpu_has_avx512()) {
        add16_avx512(static_cast<uint16_t*>(out), dtype == at::kBFloat16, add, n);
      } else if (dtype == at::kBFloat16) {
        add_portable(static_cast<c10::BFloat16*>(out), add, n);
      } else {
        add_portable(static_cast<c10::Half*>(out), add, n);
      }
      return;
    default:
      TORCH_CHECK(false, "add_float_rounded: dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

}  // namespace lowrank_ext
