// Counter-based dropout keep-bits shared by the CPU (lora_cpu.cpp, dropout_cpu.cpp) and CUDA
// (cuda/lora_cuda.cu) kernels: the same bits as kernels/dropout.py (torch reference and Triton).
//
//   fmix32(h)  = MurmurHash3's 32-bit finalizer (a bijection of uint32)
//   key0       = fmix32(s_lo ^ 0x243F6A88),  key1 = fmix32(s_hi ^ 0x85A308D3 ^ key0)   (s: the seed mod 2^64)
//   keep(e)    = fmix32(fmix32(e_lo ^ key0) ^ e_hi ^ key1) >= floor(p * 2^32)            (e: int64 element index)
//
// Element (m, k) of the (M, K) LoRA input has index e = m * K + k. Kept elements are scaled by 1 / (1 - p)
// (the kernels fold that factor into the LoRA scale and multiply by the 0/1 bit, exact in every dtype).
// docs/lora_kernels.md ("Dropout") explains the choice.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LOWRANK_DROPOUT_FN __host__ __device__ __forceinline__
#else
#define LOWRANK_DROPOUT_FN inline
#endif

namespace lowrank_ext {

constexpr uint32_t kFmixC1 = 0x85EBCA6Bu;
constexpr uint32_t kFmixC2 = 0xC2B2AE35u;
constexpr uint32_t kKeySalt0 = 0x243F6A88u;
constexpr uint32_t kKeySalt1 = 0x85A308D3u;

LOWRANK_DROPOUT_FN uint32_t dropout_fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= kFmixC1;
  h ^= h >> 13;
  h *= kFmixC2;
  h ^= h >> 16;
  return h;
}

// The per-call state: derived once from (p, seed). `active` is false for p == 0 (nothing dropped).
struct DropoutKey {
  uint32_t key0 = 0;
  uint32_t key1 = 0;
  uint32_t threshold = 0;
  bool active = false;
  float scale = 1.0f;  // 1 / (1 - p), for reference; the kernels fold it into the LoRA scale
};

// p must already be validated to lie in [0, 1) (floor(p * 2^32) is then below 2^32, exactly).
LOWRANK_DROPOUT_FN DropoutKey make_dropout_key(double p, int64_t seed) {
  DropoutKey k;
  if (!(p > 0.0)) return k;
  const uint64_t s = static_cast<uint64_t>(seed);
  k.key0 = dropout_fmix32(static_cast<uint32_t>(s) ^ kKeySalt0);
  k.key1 = dropout_fmix32(static_cast<uint32_t>(s >> 32) ^ kKeySalt1 ^ k.key0);
  k.threshold = static_cast<uint32_t>(p * 4294967296.0);
  k.active = true;
  k.scale = static_cast<float>(1.0 / (1.0 - p));
  return k;
}

LOWRANK_DROPOUT_FN bool dropout_keep(const DropoutKey& k, int64_t index) {
  const uint64_t e = static_cast<uint64_t>(index);
  const uint32_t h = dropout_fmix32(dropout_fmix32(static_cast<uint32_t>(e) ^ k.key0) ^
                                    static_cast<uint32_t>(e >> 32) ^ k.key1);
  return h >= k.threshold;
}

#if !defined(__CUDACC__)
// CPU: v[j] = keep(e0 + j) ? v[j] : 0 for j in [0, n), single-threaded (AVX-512 when the CPU has it).
void dropout_zero_dropped(const DropoutKey& k, int64_t e0, float* v, int64_t n);
// CPU: the keep-bits of indices e0 .. e0 + n - 1 as 0/1 bytes.
void dropout_keep_bytes(const DropoutKey& k, int64_t e0, uint8_t* out, int64_t n);
#endif

}  // namespace lowrank_ext
