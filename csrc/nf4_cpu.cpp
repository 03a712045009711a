// CPU kernels for blockwise NF4/FP4 quantization, dequantization and double quantization.
//
// Numerics (bit-identical to the references in kernels/nf4.py, see its docstring):
//   quantize:   absmax = max|x| per block; s = x * (1 / absmax) (IEEE reciprocal, then multiply; an
//               all-zero block scales by 1); code = #{fp32 thresholds t : t < s} (ties to the lower
//               code); two codes per byte, first element in the high nibble; odd n pads the code of 0.
//   dequantize: out = T(code[q] * absmax[block]), the product in fp32 and one round-to-nearest-even cast.
//   double quantization: offset = at::mean(absmax) (torch's own reduction, so the last bit matches
//               torch.mean); per 256-block of c = absmax - offset: absmax2 = max|c|, s = clamp(c / absmax2)
//               by reciprocal-multiply, code = exact-nearest entry of the dynamic map (ties to the lower
//               code); reconstruction fp32(dyn[q] * absmax2) + offset (this file is built with
//               -ffp-contract=off so no FMA fuses the two roundings).
//
// Layout and speed: work is split over whole quantization blocks with at::parallel_for. Dequantization
// builds, per block, the 16 possible outputs (code value times the block constant, already converted to
// the output dtype) and then only looks codes up; with AVX-512 (checked at run time, the build stays
// portable) a 16-entry table lookup of 32 outputs is one vpermw / two vpermps. Bytes moved per element
// (blocksize 64, double quant, bf16 out): 0.5 B codes + 1/64 B nested code + 2 B out = 2.52 B.
#include "nf4_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <immintrin.h>

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

bool cpu_has_avx512bw() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return has;
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

// Written once and compiled twice (baseline and AVX-512) so the loops auto-vectorise for both.
static inline __attribute__((always_inline)) void quantize_block_body(const float* x, int64_t len,
                                                                      const QuantTables& t, uint8_t* packed,
                                                                      float* absmax) {
  // max |x| on the bit patterns: for non-negative floats the integer order is the float order, and an
  // integer max reduction vectorises without -ffast-math.
  uint32_t max_bits = 0;
  for (int64_t i = 0; i < len; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    bits &= 0x7fffffffu;
    max_bits = bits > max_bits ? bits : max_bits;
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
    codes[i] = position;
  }
  if (t.sorted_code != nullptr) {
    for (int64_t i = 0; i < len; ++i) codes[i] = t.sorted_code[codes[i]];
  }
  if (len & 1) codes[len] = t.zero_code;
  const int64_t nbytes = (len + 1) / 2;
  for (int64_t j = 0; j < nbytes; ++j) packed[j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
  *absmax = amax;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void quantize_block_avx512(
    const float* x, int64_t len, const QuantTables& t, uint8_t* packed, float* absmax) {
  quantize_block_body(x, len, t, packed, absmax);
}

void quantize_block_baseline(const float* x, int64_t len, const QuantTables& t, uint8_t* packed, float* absmax) {
  quantize_block_body(x, len, t, packed, absmax);
}

template <typename T>
void quantize_typed(const T* x, int64_t n, int64_t blocksize, const QuantTables& tables, uint8_t* packed,
                    float* absmax) {
  const int64_t nb = num_blocks(n, blocksize);
  const bool avx512 = cpu_has_avx512bw();
  at::parallel_for(0, nb, std::max<int64_t>(1, kGrainElements / blocksize), [&](int64_t b0, int64_t b1) {
    alignas(64) float buffer[kMaxBlocksize];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const float* values;
      if constexpr (std::is_same_v<T, float>) {
        values = x + start;
      } else {
        for (int64_t i = 0; i < len; ++i) buffer[i] = static_cast<float>(x[start + i]);
        values = buffer;
      }
      uint8_t* out = packed + start / 2;
      if (avx512) {
        quantize_block_avx512(values, len, tables, out, absmax + b);
      } else {
        quantize_block_baseline(values, len, tables, out, absmax + b);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Dequantization: per block a 16-entry table of finished outputs, then lookups.
// ---------------------------------------------------------------------------------------------------

// 16-bit outputs (bf16/fp16 bit patterns), 32 elements (16 packed bytes) per step.
__attribute__((target("avx512f,avx512bw"))) void lookup16_avx512(const uint8_t* bytes, int64_t steps,
                                                                  const uint16_t* table16, uint16_t* out) {
  const __m512i table = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(table16)));
  const __m512i low_nibble = _mm512_set1_epi32(0xF);
  for (int64_t i = 0; i < steps; ++i) {
    const __m512i dwords = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * i)));
    // Each dword becomes two 16-bit indices [high nibble, low nibble]: element order 2i, 2i + 1.
    const __m512i index = _mm512_or_si512(_mm512_srli_epi32(dwords, 4),
                                          _mm512_slli_epi32(_mm512_and_si512(dwords, low_nibble), 16));
    _mm512_storeu_si512(out + 32 * i, _mm512_permutexvar_epi16(index, table));
  }
}

// fp32 outputs, 32 elements (16 packed bytes) per step.
__attribute__((target("avx512f,avx512bw"))) void lookup32_avx512(const uint8_t* bytes, int64_t steps,
                                                                  const float* table32, float* out) {
  const __m512 table = _mm512_loadu_ps(table32);
  const __m512i low_nibble = _mm512_set1_epi32(0xF);
  for (int64_t i = 0; i < steps; ++i) {
    const __m512i dwords = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * i)));
    const __m512i index = _mm512_or_si512(_mm512_srli_epi32(dwords, 4),
                                          _mm512_slli_epi32(_mm512_and_si512(dwords, low_nibble), 16));
    const __m512i first = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(index));
    const __m512i second = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(index, 1));
    _mm512_storeu_ps(out + 32 * i, _mm512_permutexvar_ps(first, table));
    _mm512_storeu_ps(out + 32 * i + 16, _mm512_permutexvar_ps(second, table));
  }
}

template <typename Bits>
void lookup_avx512(const uint8_t* bytes, int64_t steps, const Bits* table, Bits* out) {
  if constexpr (std::is_same_v<Bits, float>) {
    lookup32_avx512(bytes, steps, table, out);
  } else {
    lookup16_avx512(bytes, steps, table, out);
  }
}

// Bits: float for fp32 output, uint16_t holding the bf16/fp16 bit pattern otherwise.
template <typename Bits, typename Convert>
void decode_range_typed(const Nf4View& w, int64_t start, int64_t count, Bits* out, Convert convert) {
  const bool avx512 = cpu_has_avx512bw();
  const int64_t end = start + count;
  int64_t e = start;
  alignas(64) Bits table[32] = {};
  while (e < end) {
    const int64_t block = e / w.blocksize;
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
    if (avx512) {
      const int64_t steps = (block_end - e) / 32;
      if (steps > 0) {
        lookup_avx512<Bits>(w.packed + (e >> 1), steps, table, o);
        e += 32 * steps;
        o += 32 * steps;
      }
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
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quantize_cpu(const at::Tensor& absmax_in) {
  TORCH_CHECK(absmax_in.scalar_type() == at::kFloat && absmax_in.dim() == 1 && absmax_in.numel() > 0,
              "absmax must be a non-empty 1-D float32 tensor, got ", absmax_in.scalar_type(), " of shape ",
              absmax_in.sizes());
  TORCH_CHECK(absmax_in.device().is_cpu(), "double_quantize (ext, CPU) needs a CPU tensor, got ", absmax_in.device());
  const at::Tensor absmax = absmax_in.contiguous();
  const int64_t nb = absmax.numel();
  at::Tensor offset = absmax.mean();  // torch's reduction order decides the last bit; do not re-implement it
  const float off = offset.item<float>();
  const int64_t n2 = num_blocks(nb, kNestedBlocksize);
  at::Tensor qabsmax = at::empty({nb}, absmax.options().dtype(at::kByte));
  at::Tensor absmax2 = at::empty({n2}, absmax.options());
  const float* a = absmax.const_data_ptr<float>();
  uint8_t* q = qabsmax.data_ptr<uint8_t>();
  float* a2 = absmax2.data_ptr<float>();
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
      for (int64_t i = 0; i < len; ++i) {
        float s = centred[i] * inv;
        s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
        // exact nearest entry = number of midpoints strictly below s (ties go to the lower code)
        q[start + i] = static_cast<uint8_t>(std::lower_bound(kDynamicMidpoints, kDynamicMidpoints + 255, s) -
                                            kDynamicMidpoints);
      }
      a2[b] = amax;
    }
  });
  return {qabsmax, absmax2, offset};
}

void check_nested(const at::Tensor& qabsmax, const at::Tensor& absmax2, const at::Tensor& offset) {
  TORCH_CHECK(qabsmax.scalar_type() == at::kByte, "nested codes (absmax) must be uint8, got ", qabsmax.scalar_type());
  const int64_t n2 = num_blocks(qabsmax.numel(), kNestedBlocksize);
  TORCH_CHECK(absmax2.scalar_type() == at::kFloat && absmax2.numel() == n2, "absmax2 must be float32 with ", n2,
              " entries for ", qabsmax.numel(), " nested codes, got ", absmax2.scalar_type(), " with ",
              absmax2.numel());
  TORCH_CHECK(offset.numel() == 1, "offset must have exactly one element, got ", offset.numel());
  TORCH_CHECK(qabsmax.device().is_cpu() && absmax2.device().is_cpu() && offset.device().is_cpu(),
              "the ext CPU kernels need CPU tensors");
}

void check_nested_dtype(at::ScalarType nested_dtype) {
  TORCH_CHECK(nested_dtype == at::kFloat || nested_dtype == at::kHalf || nested_dtype == at::kBFloat16,
              "nested_dtype must be float32, float16 or bfloat16, got ", nested_dtype);
}

float rounded_offset(const at::Tensor& offset, at::ScalarType nested_dtype) {
  TORCH_CHECK(offset.scalar_type() == at::kFloat && offset.numel() == 1,
              "offset must be a one-element float32 tensor, got ", offset.scalar_type(), " with ", offset.numel(),
              " elements");
  return offset.to(nested_dtype).to(at::kFloat).item<float>();
}

at::Tensor double_dequantize_cpu(const at::Tensor& qabsmax_in, const at::Tensor& absmax2_in,
                                 const at::Tensor& offset, at::ScalarType nested_dtype) {
  check_nested(qabsmax_in, absmax2_in, offset);
  check_nested_dtype(nested_dtype);
  TORCH_CHECK(qabsmax_in.dim() == 1 && qabsmax_in.numel() > 0, "qabsmax must be a non-empty 1-D uint8 tensor, got shape ",
              qabsmax_in.sizes());
  const at::Tensor qabsmax = qabsmax_in.contiguous();
  const at::Tensor absmax2 = absmax2_in.contiguous();
  Nf4View w;
  w.qabsmax = qabsmax.const_data_ptr<uint8_t>();
  w.absmax2 = absmax2.const_data_ptr<float>();
  w.offset = rounded_offset(offset, nested_dtype);
  w.nested_dtype = nested_dtype;
  at::Tensor out = at::empty(qabsmax.sizes(), qabsmax.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, qabsmax.numel(), kGrainElements, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = w.block_scale(i);
  });
  return out;
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                               c10::IntArrayRef shape, at::ScalarType dtype, int64_t blocksize,
                               c10::string_view quant_type_view, at::ScalarType nested_dtype) {
  const std::string quant_type(quant_type_view);
  check_float_dtype(dtype, "dtype");
  int64_t n = 1;
  for (int64_t d : shape) {
    TORCH_CHECK(d >= 0, "shape must not have negative sizes, got ", shape);
    n *= d;
  }
  TORCH_CHECK(n > 0, "shape ", shape, " has no elements");
  std::vector<at::Tensor> keep;
  const Nf4View w = make_view(packed, absmax, absmax2, offset, n, blocksize, quant_type, nested_dtype, keep);
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype));
  void* out_ptr = out.data_ptr();
  const int64_t nb = num_blocks(n, blocksize);
  at::parallel_for(0, nb, std::max<int64_t>(1, kGrainElements / blocksize), [&](int64_t b0, int64_t b1) {
    const int64_t start = b0 * blocksize;
    const int64_t count = std::min(b1 * blocksize, n) - start;
    char* dst = static_cast<char*>(out_ptr) + start * out.element_size();
    decode_range(w, start, count, dst, dtype);
  });
  return out;
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

Nf4View make_view(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& absmax2,
                  const std::optional<at::Tensor>& offset, int64_t numel, int64_t blocksize,
                  const std::string& quant_type, at::ScalarType nested_dtype, std::vector<at::Tensor>& keep) {
  check_quant_args(blocksize, quant_type);
  check_nested_dtype(nested_dtype);
  TORCH_CHECK(packed.device().is_cpu() && absmax.device().is_cpu(), "the ext CPU kernels need CPU tensors, got ",
              packed.device(), " and ", absmax.device());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (numel + 1) / 2, "packed must be uint8 with ",
              (numel + 1) / 2, " bytes for ", numel, " elements, got ", packed.scalar_type(), " with ",
              packed.numel());
  const int64_t nb = num_blocks(numel, blocksize);
  TORCH_CHECK(absmax2.has_value() == offset.has_value(),
              "absmax2 and offset must be given together (double quantization) or not at all");
  Nf4View w;
  keep.push_back(packed.contiguous());
  w.packed = keep.back().const_data_ptr<uint8_t>();
  w.numel = numel;
  w.blocksize = blocksize;
  w.code = code_table(quant_type);
  if (absmax2.has_value()) {
    check_nested(absmax, *absmax2, *offset);
    TORCH_CHECK(absmax.numel() == nb, "absmax (nested codes) must have ", nb, " entries (blocksize ", blocksize,
                "), got ", absmax.numel());
    keep.push_back(absmax.contiguous());
    w.qabsmax = keep.back().const_data_ptr<uint8_t>();
    keep.push_back(absmax2->contiguous());
    w.absmax2 = keep.back().const_data_ptr<float>();
    w.offset = rounded_offset(*offset, nested_dtype);
    w.nested_dtype = nested_dtype;
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == nb, "absmax must be float32 with ", nb,
                " entries (blocksize ", blocksize, "), got ", absmax.scalar_type(), " with ", absmax.numel(),
                " (uint8 nested codes need absmax2 and offset)");
    keep.push_back(absmax.contiguous());
    w.absmax = keep.back().const_data_ptr<float>();
  }
  return w;
}

void decode_range(const Nf4View& w, int64_t start, int64_t count, void* out, at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      decode_range_typed<float>(w, start, count, static_cast<float*>(out), [](float v) { return v; });
      break;
    case at::kHalf:
      decode_range_typed<uint16_t>(w, start, count, static_cast<uint16_t*>(out),
                                   [](float v) { return c10::Half(v).x; });
      break;
    case at::kBFloat16:
      decode_range_typed<uint16_t>(w, start, count, static_cast<uint16_t*>(out),
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
}

}  // namespace lowrank_ext
