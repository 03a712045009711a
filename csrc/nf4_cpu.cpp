// CPU kernels for blockwise NF4/FP4 quantization, dequantization and double quantization.
//
// Numerics (bit-identical to the references in kernels/nf4.py, see its docstring):
//   quantize:   absmax = max|x| per block; s = x * (1 / absmax) (IEEE reciprocal, then multiply; an
//               all-zero block scales by 1); code = #{fp32 thresholds t : t < s} (ties to the lower
//               code); two codes per byte, first element in the high nibble; odd n pads the code of 0.
//   dequantize: out = T(code[q] * absmax[block]), the product in fp32 and one round-to-nearest-even cast.
//   double quantization: nested_offset = at::mean(absmax) (torch's own reduction, so the last bit matches
//               torch.mean); per 256-block of c = absmax - nested_offset: nested_absmax = max|c|,
//               s = clamp(c / nested_absmax) by reciprocal-multiply, code = exact-nearest entry of the dynamic
//               map (ties to the lower code); reconstruction fp32(dyn[q] * nested_absmax) + nested_offset
//               (this file is built with -ffp-contract=off so no FMA fuses the two roundings).
//
// Layout and speed: work is split over whole quantization blocks with at::parallel_for. Dequantization
// builds, per block, the 16 possible outputs (code value times the block constant, already converted to
// the output dtype) and then only looks codes up; with AVX-512 (checked at run time, the build stays
// portable) a 16-entry table lookup of 32 outputs is one vpermw / two vpermps. Bytes moved per element
// (blocksize 64, double quant, bf16 out): 0.5 B codes + 1/64 B nested code + 2 B out = 2.52 B.
#include "nf4_cpu.h"
#include "cpu_features.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <immintrin.h>
#include <sys/mman.h>
#include <unistd.h>

namespace lowrank_ext {
namespace {

constexpr int64_t kBlocksizes[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};
constexpr int64_t kMaxBlocksize = 4096;
// Smallest divisor of a block's reciprocal: 1e-38 in fp32 (9.99999935e-39), as in the reference.
constexpr float kReciprocalFloor = 1e-38f;
// Same for the nested 256-blocks: the smallest normal fp32.
constexpr float kNestedReciprocalFloor = std::numeric_limits<float>::min();
// Elements per parallel task: large enough that the thread hand-off is noise.
constexpr int64_t kGrainElements = 1 << 16;

// A fresh multi-megabyte output is a new mapping whose 4 KiB pages fault in one by one as the kernel
// writes them; in a VM that costs more than the decode. Asking for transparent huge pages on the
// 2 MiB-aligned interior turns ~500 faults per MiB into one. Advisory only: errors are ignored.
constexpr int64_t kHugePage = 2 << 20;

void advise_huge_pages(void* data, int64_t nbytes) {
  if (nbytes < 4 * kHugePage) return;
  const auto begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~static_cast<uintptr_t>(kHugePage - 1);
  const auto end = (reinterpret_cast<uintptr_t>(data) + nbytes) & ~static_cast<uintptr_t>(kHugePage - 1);
  if (end <= begin) return;
  // Memory the allocator reuses (glibc serves large blocks from its heap once its mmap threshold has grown)
  // is already faulted in: then the advice only costs time (measured ~0.3 ms for 32 MiB). mincore on the
  // first and last page tells.
  unsigned char first = 0, last = 0;
  const long page = sysconf(_SC_PAGESIZE);
  if (mincore(reinterpret_cast<void*>(begin), 1, &first) == 0 &&
      mincore(reinterpret_cast<void*>(end - page), 1, &last) == 0 && (first & 1) && (last & 1)) {
    return;
  }
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  // Fault the huge pages in from this one thread: when several threads fault huge pages of one mapping at
  // once (THP defrag=madvise) they stall each other -- measured 33 ms instead of 3 ms for a 32 MiB output
  // on 2 threads. One write per 2 MiB page; the decode overwrites it.
  for (auto page = begin; page < end; page += kHugePage) *reinterpret_cast<volatile char*>(page) = 0;
}

bool is_nf4(const std::string& quant_type) { return quant_type == "nf4"; }

const float* code_table(const std::string& quant_type) { return is_nf4(quant_type) ? kNF4Code : kFP4Code; }

int64_t num_blocks(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

// ---------------------------------------------------------------------------------------------------
// Quantization of one block (already converted to fp32).
// ---------------------------------------------------------------------------------------------------

struct QuantTables {
  const float* thresholds;    // 15 sorted fp32 midpoints
  const uint8_t* sorted_code;  // code of each sorted position, or nullptr when the table is sorted (NF4)
  uint8_t zero_code;          // pad nibble of an odd element count
};

// Scalar (and auto-vectorised) quantization of one block of `len` values: partial last blocks, and
// every block on CPUs without AVX-512.
void quantize_block_scalar(const float* x, int64_t len, const QuantTables& t, uint8_t* packed, float* absmax) {
  // max |x| on the bit patterns: for non-negative floats the integer order is the float order, and NaN
  // and inf (the largest patterns) propagate, so the caller can reject a non-finite block.
  uint32_t max_bits = 0;
  for (int64_t i = 0; i < len; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    max_bits = std::max(max_bits, bits & 0x7fffffffu);
  }
  float amax;
  std::memcpy(&amax, &max_bits, sizeof(amax));
  // bitsandbytes' clamp keeps the reciprocal finite: an all-zero block scales 0 by 1e38 (code of 0.0).
  const float inv = 1.0f / (amax > kReciprocalFloor ? amax : kReciprocalFloor);
  alignas(64) uint8_t codes[kMaxBlocksize + 1];
  for (int64_t i = 0; i < len; ++i) {
    float s = x[i] * inv;
    s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
    uint8_t position = 0;
    for (int k = 0; k < 15; ++k) position += t.thresholds[k] < s ? 1 : 0;
    codes[i] = t.sorted_code != nullptr ? t.sorted_code[position] : position;
  }
  if (len & 1) codes[len] = t.zero_code;
  const int64_t nbytes = (len + 1) / 2;
  for (int64_t j = 0; j < nbytes; ++j) packed[j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
  *absmax = amax;
}

#define LOWRANK_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq")))

template <typename T>
LOWRANK_AVX512 inline __m512 load16_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {  // bf16: the high half of an fp32
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}

// Whole blocks [b0, b1), AVX-512: 16 values per step; the code is a 4-step branchless binary search over
// the 15 thresholds held in one register (vpermps), so it counts #{t < s} exactly like the scalar path.
template <typename T>
LOWRANK_AVX512 void quantize_blocks_avx512(const T* x, int64_t b0, int64_t b1, int64_t blocksize,
                                           const QuantTables& t, uint8_t* packed, float* absmax) {
  alignas(64) float thresholds16[16];
  alignas(64) int32_t sorted16[16];
  for (int k = 0; k < 15; ++k) thresholds16[k] = t.thresholds[k];
  thresholds16[15] = std::numeric_limits<float>::infinity();  // never read: the search tops out at 14
  for (int k = 0; k < 16; ++k) sorted16[k] = t.sorted_code != nullptr ? t.sorted_code[k] : k;
  const __m512 thresholds = _mm512_load_ps(thresholds16);
  const __m512i sorted = _mm512_load_si512(sorted16);
  const __m512 minus_one = _mm512_set1_ps(-1.0f);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512i high_nibble = _mm512_set1_epi64(0xF0);
  for (int64_t b = b0; b < b1; ++b) {
    const T* xb = x + b * blocksize;
    // integer max of the |x| bit patterns: exact for finite values, and NaN/inf propagate (see scalar path)
    __m512i running_max = _mm512_setzero_si512();
    for (int64_t i = 0; i < blocksize; i += 16) {
      const __m512i magnitude = _mm512_and_si512(_mm512_castps_si512(load16_as_float(xb + i)), _mm512_set1_epi32(0x7fffffff));
      running_max = _mm512_max_epu32(running_max, magnitude);
    }
    const uint32_t max_bits = _mm512_reduce_max_epu32(running_max);
    float amax;
    std::memcpy(&amax, &max_bits, sizeof(amax));
    const __m512 inv = _mm512_set1_ps(1.0f / (amax > kReciprocalFloor ? amax : kReciprocalFloor));
    for (int64_t i = 0; i < blocksize; i += 16) {
      const __m512 s = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(load16_as_float(xb + i), inv), minus_one), one);
      __m512i position = _mm512_setzero_si512();
      for (int step = 8; step >= 1; step /= 2) {
        const __m512 probe = _mm512_permutexvar_ps(_mm512_add_epi32(position, _mm512_set1_epi32(step - 1)), thresholds);
        const __mmask16 below = _mm512_cmp_ps_mask(probe, s, _CMP_LT_OQ);
        position = _mm512_mask_add_epi32(position, below, position, _mm512_set1_epi32(step));
      }
      const __m512i code = _mm512_permutexvar_epi32(position, sorted);
      // qword j holds codes (2j, 2j + 1) in its two dwords: byte = code[2j] << 4 | code[2j + 1]
      const __m512i pair = _mm512_or_si512(_mm512_and_si512(_mm512_slli_epi64(code, 4), high_nibble),
                                           _mm512_srli_epi64(code, 32));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(packed + (b * blocksize + i) / 2), _mm512_cvtepi64_epi8(pair));
    }
    absmax[b] = amax;
  }
}

template <typename T>
void quantize_typed(const T* x, int64_t n, int64_t blocksize, const QuantTables& tables, uint8_t* packed,
                    float* absmax) {
  const int64_t nb = num_blocks(n, blocksize);
  const int64_t full_blocks = n / blocksize;
  const bool avx512 = cpu_has_avx512();
  at::parallel_for(0, nb, std::max<int64_t>(1, kGrainElements / blocksize), [&](int64_t b0, int64_t b1) {
    int64_t b = b0;
    if (avx512) {
      const int64_t end = std::min(b1, full_blocks);
      if (end > b) quantize_blocks_avx512(x, b, end, blocksize, tables, packed, absmax);
      b = std::max(b, end);
    }
    alignas(64) float buffer[kMaxBlocksize];
    for (; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      for (int64_t i = 0; i < len; ++i) buffer[i] = static_cast<float>(x[start + i]);
      quantize_block_scalar(buffer, len, tables, packed + start / 2, absmax + b);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Dequantization: per block a 16-entry table of finished outputs, then lookups.
// ---------------------------------------------------------------------------------------------------

enum class OutKind { kFloat, kBFloat16, kHalf };

// Whole blocks [b0, b1) -> out, AVX-512. Per block the 16 possible outputs (code value times the block
// constant, rounded to the output dtype) are built in one register; then every 16 packed bytes become
// 32 outputs by one table permute (vpermw for 16-bit outputs, two vpermps for fp32).
template <OutKind KIND>
__attribute__((target("avx512f,avx512bw"))) void decode_blocks_avx512(const Nf4View& w, int64_t b0, int64_t b1,
                                                                       void* out) {
  const __m512 code = _mm512_loadu_ps(w.code);
  const __m512i low_nibble = _mm512_set1_epi32(0xF);
  const int64_t steps = w.blocksize / 32;  // 16 packed bytes (32 elements) per step; blocksize >= 32
  const uint8_t* src = w.packed + b0 * (w.blocksize / 2);
  for (int64_t b = b0; b < b1; ++b) {
    // The reference's fp32 product, one IEEE multiply per code (no FMA in intrinsics).
    const __m512 values = _mm512_mul_ps(code, _mm512_set1_ps(w.block_scale(b)));
    __m512i table16;
    if constexpr (KIND == OutKind::kBFloat16) {
      // round to nearest even on the bits, as c10::BFloat16 does for finite values
      const __m512i u = _mm512_castps_si512(values);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
      table16 = _mm512_zextsi256_si512(_mm512_cvtepi32_epi16(rounded));
    } else if constexpr (KIND == OutKind::kHalf) {
      table16 = _mm512_zextsi256_si512(_mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (int64_t i = 0; i < steps; ++i, src += 16) {
      const __m512i dwords = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      // Each dword becomes two 16-bit indices [high nibble, low nibble]: elements 2j, 2j + 1.
      const __m512i index = _mm512_or_si512(_mm512_srli_epi32(dwords, 4),
                                            _mm512_slli_epi32(_mm512_and_si512(dwords, low_nibble), 16));
      const int64_t element = (b - b0) * w.blocksize + 32 * i;
      if constexpr (KIND == OutKind::kFloat) {
        float* o = static_cast<float*>(out) + element;
        _mm512_storeu_ps(o, _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(index)), values));
        _mm512_storeu_ps(o + 16,
                         _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(index, 1)), values));
      } else {
        uint16_t* o = static_cast<uint16_t*>(out) + element;
        _mm512_storeu_si512(o, _mm512_permutexvar_epi16(index, table16));
      }
    }
  }
}

template <typename Bits>
void decode_blocks_fast(const Nf4View& w, int64_t b0, int64_t b1, Bits* out, at::ScalarType dtype) {
  if (dtype == at::kFloat) {
    decode_blocks_avx512<OutKind::kFloat>(w, b0, b1, out);
  } else if (dtype == at::kBFloat16) {
    decode_blocks_avx512<OutKind::kBFloat16>(w, b0, b1, out);
  } else {
    decode_blocks_avx512<OutKind::kHalf>(w, b0, b1, out);
  }
}

// Bits: float for fp32 output, uint16_t holding the bf16/fp16 bit pattern otherwise. Whole blocks take
// the AVX-512 path when the CPU has it; partial blocks at either end of the range (and CPUs without
// AVX-512) use a 16-entry table per block and scalar lookups.
template <typename Bits, typename Convert>
void decode_range_typed(const Nf4View& w, int64_t start, int64_t count, Bits* out, at::ScalarType dtype,
                        Convert convert) {
  const bool avx512 = cpu_has_avx512();
  const int64_t end = start + count;
  int64_t e = start;
  Bits table[16];
  while (e < end) {
    const int64_t block = e / w.blocksize;
    if (avx512 && e == block * w.blocksize) {
      const int64_t whole_end = end / w.blocksize;  // blocks [block, whole_end) lie inside the range
      if (whole_end > block) {
        decode_blocks_fast<Bits>(w, block, whole_end, out + (e - start), dtype);
        e = whole_end * w.blocksize;
        continue;
      }
    }
    const int64_t block_end = std::min((block + 1) * w.blocksize, end);
    const float scale = w.block_scale(block);
    for (int c = 0; c < 16; ++c) {
      const float product = w.code[c] * scale;  // the fp32 product of the reference, rounded once
      table[c] = convert(product);
    }
    Bits* o = out + (e - start);
    if (e & 1) {  // a range may start on a low nibble
      *o++ = table[w.packed[e >> 1] & 0xF];
      ++e;
    }
    for (; e + 1 < block_end; e += 2) {
      const uint8_t byte = w.packed[e >> 1];
      o[0] = table[byte >> 4];
      o[1] = table[byte & 0xF];
      o += 2;
    }
    if (e < block_end) {
      *o = table[w.packed[e >> 1] >> 4];
      ++e;
    }
  }
}

void check_float_dtype(at::ScalarType dtype, const char* what) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, what,
              " must be float32, float16 or bfloat16, got ", dtype);
}

// ---------------------------------------------------------------------------------------------------
// Operators.
// ---------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& x, int64_t blocksize,
                                                     c10::string_view quant_type_view) {
  const std::string quant_type(quant_type_view);
  check_quant_args(blocksize, quant_type);
  check_float_dtype(x.scalar_type(), "input dtype");
  TORCH_CHECK(x.numel() > 0, "input is empty (shape ", x.sizes(), "); there is nothing to quantize");
  TORCH_CHECK(x.device().is_cpu(), "quantize_4bit (ext, CPU) needs a CPU tensor, got ", x.device());
  const at::Tensor flat = x.contiguous();  // logical (row-major) order, like reshape(-1) in the reference
  const int64_t n = flat.numel();
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({num_blocks(n, blocksize)}, x.options().dtype(at::kFloat));
  const QuantTables tables{is_nf4(quant_type) ? kNF4Thresholds : kFP4Thresholds,
                           is_nf4(quant_type) ? nullptr : kFP4SortedCode,
                           static_cast<uint8_t>(is_nf4(quant_type) ? 7 : 0)};
  uint8_t* packed_ptr = packed.data_ptr<uint8_t>();
  float* absmax_ptr = absmax.data_ptr<float>();
  switch (flat.scalar_type()) {
    case at::kFloat:
      quantize_typed(flat.const_data_ptr<float>(), n, blocksize, tables, packed_ptr, absmax_ptr);
      break;
    case at::kHalf:
      quantize_typed(flat.const_data_ptr<c10::Half>(), n, blocksize, tables, packed_ptr, absmax_ptr);
      break;
    default:
      quantize_typed(flat.const_data_ptr<c10::BFloat16>(), n, blocksize, tables, packed_ptr, absmax_ptr);
      break;
  }
  // A NaN or inf makes its block's absmax non-finite (the max above propagates them): refuse rather than
  // return codes that mean nothing.
  const int64_t nb = absmax.numel();
  for (int64_t b = 0; b < nb; ++b) {
    TORCH_CHECK(std::isfinite(absmax_ptr[b]), "input has non-finite values (NaN or inf) in elements [", b * blocksize,
                ", ", std::min((b + 1) * blocksize, n), ") (flattened); cannot quantize");
  }
  return {packed, absmax};
}

// Nested codes of the first len - len % 16 centred values, 16 lanes at a time: the same branchless
// binary search as the scalar loop, each probe a gather. Returns how many values it coded.
LOWRANK_AVX512 int64_t nested_codes_avx512(const float* centred, int64_t len, float inv, const float* midpoints,
                                           uint8_t* q) {
  const __m512 scale = _mm512_set1_ps(inv);
  const int64_t whole = len - len % 16;
  for (int64_t i = 0; i < whole; i += 16) {
    const __m512 s = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(centred + i), scale),
                                                 _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f));
    __m512i position = _mm512_setzero_si512();
    for (int step = 128; step >= 1; step /= 2) {
      const __m512 probe = _mm512_i32gather_ps(_mm512_add_epi32(position, _mm512_set1_epi32(step - 1)), midpoints, 4);
      position = _mm512_mask_add_epi32(position, _mm512_cmp_ps_mask(probe, s, _CMP_LT_OQ), position,
                                       _mm512_set1_epi32(step));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(position));
  }
  return whole;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quantize_cpu(const at::Tensor& absmax_in) {
  TORCH_CHECK(absmax_in.scalar_type() == at::kFloat && absmax_in.dim() == 1 && absmax_in.numel() > 0,
              "absmax must be a non-empty 1-D float32 tensor, got ", absmax_in.scalar_type(), " of shape ",
              absmax_in.sizes());
  TORCH_CHECK(absmax_in.device().is_cpu(), "double_quantize (ext, CPU) needs a CPU tensor, got ", absmax_in.device());
  const at::Tensor absmax = absmax_in.contiguous();
  const int64_t nb = absmax.numel();
  at::Tensor nested_offset = absmax.mean();  // torch's reduction order decides the last bit; do not re-implement it
  const float off = nested_offset.item<float>();
  const int64_t n2 = num_blocks(nb, kNestedBlocksize);
  at::Tensor qabsmax = at::empty({nb}, absmax.options().dtype(at::kByte));
  at::Tensor nested_absmax = at::empty({n2}, absmax.options());
  const float* a = absmax.const_data_ptr<float>();
  uint8_t* q = qabsmax.data_ptr<uint8_t>();
  float* a2 = nested_absmax.data_ptr<float>();
  // the 255 midpoints padded with +inf, so the search may probe index 255 (it never counts it)
  float midpoints[256];
  std::copy(kDynamicMidpoints, kDynamicMidpoints + 255, midpoints);
  midpoints[255] = std::numeric_limits<float>::infinity();
  const bool avx512 = cpu_has_avx512();
  at::parallel_for(0, n2, 64, [&](int64_t b0, int64_t b1) {
    float centred[kNestedBlocksize];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * kNestedBlocksize;
      const int64_t len = std::min(kNestedBlocksize, nb - start);
      float amax = 0.0f;
      for (int64_t i = 0; i < len; ++i) {
        centred[i] = a[start + i] - off;
        amax = std::max(amax, std::fabs(centred[i]));
      }
      const float inv = 1.0f / std::max(amax, kNestedReciprocalFloor);
      int64_t i = 0;
      if (avx512) i = nested_codes_avx512(centred, len, inv, midpoints, q + start);
      for (; i < len; ++i) {
        float s = centred[i] * inv;
        s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
        // exact nearest entry = number of midpoints strictly below s (ties go to the lower code), by a
        // branchless binary search (the branchy std::lower_bound mispredicts on every step)
        int position = 0;
        for (int step = 128; step >= 1; step /= 2) position += midpoints[position + step - 1] < s ? step : 0;
        q[start + i] = static_cast<uint8_t>(position);
      }
      a2[b] = amax;
    }
  });
  return {qabsmax, nested_absmax, nested_offset};
}

void check_nested(const at::Tensor& qabsmax, const at::Tensor& nested_absmax, const at::Tensor& nested_offset) {
  TORCH_CHECK(qabsmax.scalar_type() == at::kByte, "nested codes (absmax) must be uint8, got ", qabsmax.scalar_type());
  const int64_t n2 = num_blocks(qabsmax.numel(), kNestedBlocksize);
  TORCH_CHECK(nested_absmax.scalar_type() == at::kFloat && nested_absmax.numel() == n2,
              "nested_absmax must be float32 with ", n2, " entries for ", qabsmax.numel(), " nested codes, got ",
              nested_absmax.scalar_type(), " with ", nested_absmax.numel());
  TORCH_CHECK(nested_offset.numel() == 1, "nested_offset must have exactly one element, got ", nested_offset.numel());
  TORCH_CHECK(qabsmax.device().is_cpu() && nested_absmax.device().is_cpu() && nested_offset.device().is_cpu(),
              "the ext CPU kernels need CPU tensors");
}

void check_nested_dtype(at::ScalarType nested_dtype) {
  TORCH_CHECK(nested_dtype == at::kFloat || nested_dtype == at::kHalf || nested_dtype == at::kBFloat16,
              "nested_dtype must be float32, float16 or bfloat16, got ", nested_dtype);
}

float rounded_nested_offset(const at::Tensor& nested_offset, at::ScalarType nested_dtype) {
  TORCH_CHECK(nested_offset.scalar_type() == at::kFloat && nested_offset.numel() == 1,
              "nested_offset must be a one-element float32 tensor, got ", nested_offset.scalar_type(), " with ",
              nested_offset.numel(), " elements");
  return nested_offset.to(nested_dtype).to(at::kFloat).item<float>();
}

at::Tensor double_dequantize_cpu(const at::Tensor& qabsmax_in, const at::Tensor& nested_absmax_in,
                                 const at::Tensor& nested_offset, at::ScalarType nested_dtype) {
  check_nested(qabsmax_in, nested_absmax_in, nested_offset);
  check_nested_dtype(nested_dtype);
  TORCH_CHECK(qabsmax_in.dim() == 1 && qabsmax_in.numel() > 0, "qabsmax must be a non-empty 1-D uint8 tensor, got shape ",
              qabsmax_in.sizes());
  const at::Tensor qabsmax = qabsmax_in.contiguous();
  const at::Tensor nested_absmax = nested_absmax_in.contiguous();
  Nf4View w;
  w.qabsmax = qabsmax.const_data_ptr<uint8_t>();
  w.nested_absmax = nested_absmax.const_data_ptr<float>();
  w.nested_offset = rounded_nested_offset(nested_offset, nested_dtype);
  w.nested_dtype = nested_dtype;
  at::Tensor out = at::empty(qabsmax.sizes(), qabsmax.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, qabsmax.numel(), kGrainElements, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = w.block_scale(i);
  });
  return out;
}

int64_t checked_numel(c10::IntArrayRef shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    TORCH_CHECK(d >= 0, "shape must not have negative sizes, got ", shape);
    n *= d;
  }
  TORCH_CHECK(n > 0, "shape ", shape, " has no elements");
  return n;
}

// Decodes all n elements of `w` into out (contiguous CPU, n elements of a float dtype), over all threads.
void decode_all(const Nf4View& w, int64_t n, at::Tensor& out) {
  void* out_ptr = out.data_ptr();
  const auto dtype = out.scalar_type();
  const int64_t esize = out.element_size();
  const int64_t nb = num_blocks(n, w.blocksize);
  at::parallel_for(0, nb, std::max<int64_t>(1, kGrainElements / w.blocksize), [&](int64_t b0, int64_t b1) {
    const int64_t start = b0 * w.blocksize;
    const int64_t count = std::min(b1 * w.blocksize, n) - start;
    decode_range(w, start, count, static_cast<char*>(out_ptr) + start * esize, dtype);
  });
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_offset,
                               c10::IntArrayRef shape, at::ScalarType dtype, int64_t blocksize,
                               c10::string_view quant_type_view, at::ScalarType nested_dtype) {
  const std::string quant_type(quant_type_view);
  check_float_dtype(dtype, "dtype");
  const int64_t n = checked_numel(shape);
  std::vector<at::Tensor> keep;
  const Nf4View w =
      make_view(packed, absmax, nested_absmax, nested_offset, n, blocksize, quant_type, nested_dtype, keep);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  advise_huge_pages(out.data_ptr(), out.nbytes());
  decode_all(w, n, out);
  return out;
}

// The same decode into a caller's buffer: a buffer reused across calls skips the page faults of a fresh
// output, which cost several times the decode itself (measured: 2.4 ms fresh vs ~0.3 ms reused, 4096^2 bf16).
void dequantize_4bit_out_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& nested_absmax,
                             const std::optional<at::Tensor>& nested_offset,
                             int64_t blocksize, c10::string_view quant_type_view, at::ScalarType nested_dtype,
                             at::Tensor& out) {
  const std::string quant_type(quant_type_view);
  check_float_dtype(out.scalar_type(), "out dtype");
  TORCH_CHECK(out.device().is_cpu(), "out must be a CPU tensor for the ext CPU kernels, got ", out.device());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous, got strides ", out.strides(), " for shape ", out.sizes());
  const int64_t n = checked_numel(out.sizes());
  std::vector<at::Tensor> keep;
  const Nf4View w =
      make_view(packed, absmax, nested_absmax, nested_offset, n, blocksize, quant_type, nested_dtype, keep);
  decode_all(w, n, out);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Shared helpers (declared in nf4_cpu.h).
// ---------------------------------------------------------------------------------------------------

void check_quant_args(int64_t blocksize, const std::string& quant_type) {
  TORCH_CHECK(quant_type == "nf4" || quant_type == "fp4", "quant_type must be 'nf4' or 'fp4', got '", quant_type,
              "'");
  TORCH_CHECK(std::find(std::begin(kBlocksizes), std::end(kBlocksizes), blocksize) != std::end(kBlocksizes),
              "blocksize must be one of (32, 64, 128, 256, 512, 1024, 2048, 4096), got ", blocksize);
}

Nf4View make_view(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                  const std::optional<at::Tensor>& nested_offset, int64_t numel, int64_t blocksize,
                  const std::string& quant_type, at::ScalarType nested_dtype, std::vector<at::Tensor>& keep) {
  check_quant_args(blocksize, quant_type);
  check_nested_dtype(nested_dtype);
  TORCH_CHECK(packed.device().is_cpu() && absmax.device().is_cpu(), "the ext CPU kernels need CPU tensors, got ",
              packed.device(), " and ", absmax.device());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (numel + 1) / 2, "packed must be uint8 with ",
              (numel + 1) / 2, " bytes for ", numel, " elements, got ", packed.scalar_type(), " with ",
              packed.numel());
  const int64_t nb = num_blocks(numel, blocksize);
  TORCH_CHECK(nested_absmax.has_value() == nested_offset.has_value(),
              "nested_absmax and nested_offset must be given together (double quantization) or not at all");
  Nf4View w;
  keep.push_back(packed.contiguous());
  w.packed = keep.back().const_data_ptr<uint8_t>();
  w.numel = numel;
  w.blocksize = blocksize;
  w.code = code_table(quant_type);
  if (nested_absmax.has_value()) {
    check_nested(absmax, *nested_absmax, *nested_offset);
    TORCH_CHECK(absmax.numel() == nb, "absmax (nested codes) must have ", nb, " entries (blocksize ", blocksize,
                "), got ", absmax.numel());
    keep.push_back(absmax.contiguous());
    w.qabsmax = keep.back().const_data_ptr<uint8_t>();
    keep.push_back(nested_absmax->contiguous());
    w.nested_absmax = keep.back().const_data_ptr<float>();
    w.nested_offset = rounded_nested_offset(*nested_offset, nested_dtype);
    w.nested_dtype = nested_dtype;
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == nb, "absmax must be float32 with ", nb,
                " entries (blocksize ", blocksize, "), got ", absmax.scalar_type(), " with ", absmax.numel(),
                " (uint8 nested codes need nested_absmax and nested_offset)");
    keep.push_back(absmax.contiguous());
    w.absmax = keep.back().const_data_ptr<float>();
  }
  return w;
}

void decode_range(const Nf4View& w, int64_t start, int64_t count, void* out, at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      decode_range_typed<float>(w, start, count, static_cast<float*>(out), dtype, [](float v) { return v; });
      break;
    case at::kHalf:
      decode_range_typed<uint16_t>(w, start, count, static_cast<uint16_t*>(out), dtype,
                                   [](float v) { return c10::Half(v).x; });
      break;
    case at::kBFloat16:
      decode_range_typed<uint16_t>(w, start, count, static_cast<uint16_t*>(out), dtype,
                                   [](float v) { return c10::BFloat16(v).x; });
      break;
    default:
      TORCH_CHECK(false, "dequantization dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("double_quantize", &double_quantize_cpu);
  m.impl("double_dequantize", &double_dequantize_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("dequantize_4bit_out", &dequantize_4bit_out_cpu);
}

}  // namespace lowrank_ext
