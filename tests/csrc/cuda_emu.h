// Host emulation of the CUDA built-ins that csrc/cuda/ uses, so its kernels run on a CPU
// (tests/csrc/test_cuda_emulated.py rewrites the sources: `__shared__` becomes `static`, a launch
// `kernel<<<grid, block, shared, stream>>>(args)` becomes `emu::Launch(grid, block, shared, stream)(kernel, args)`).
//
// A launch runs its CTAs one after another; the threads of a CTA are real threads (from a pool), so
// __syncthreads is a barrier and a warp shuffle is a 32-thread exchange. Every barrier times out: a thread that
// misses __syncthreads or a full-warp shuffle would hang a GPU or return garbage; here it aborts with a message.
// Dynamic shared memory is a fresh heap buffer per CTA filled with NaN bytes, so reading an element that was
// never written shows up in the results. Launch limits (grid, block, shared memory, parameter space) and the
// alignment of __ldg vector loads are checked. The *_rn intrinsics are single IEEE operations: the file that
// includes this one must be compiled with -ffp-contract=off.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(30), [&] { return generation_ != generation; })) {
      fail("barrier timed out: not every thread reached __syncthreads / a full-warp shuffle");
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

struct Cta {
  std::unique_ptr<Barrier> block_barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<float> warp_exchange;  // [warps][32]
  std::vector<unsigned char> dynamic_shared;
};

inline thread_local Cta* current_cta = nullptr;

}  // namespace emu

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline void __syncthreads() { emu::current_cta->block_barrier->wait(); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync: only full-warp masks are emulated");
  emu::Cta& cta = *emu::current_cta;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* exchange = cta.warp_exchange.data() + 32 * warp;
  exchange[lane] = v;
  cta.warp_barriers[warp]->wait();
  const float other = exchange[lane ^ lane_mask];
  cta.warp_barriers[warp]->wait();
  return other;
}

template <typename T>
inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    std::fprintf(stderr, "cuda_emu: __ldg of a %zu-byte type at %p, not %zu-byte aligned\n", sizeof(T),
                 static_cast<const void*>(p), alignof(T));
    std::abort();
  }
  return *p;
}

// The *_rn intrinsics: one IEEE operation each (this code is compiled with -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

namespace emu {

// Threads reused across CTAs and launches (starting 256 threads per CTA costs more than the kernels).
class Pool {
 public:
  template <typename Job>
  void run(unsigned count, Job&& job) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (threads_.size() < count) {
      const unsigned index = threads_.size();
      threads_.emplace_back([this, index] { work(index); });
      threads_.back().detach();
    }
    job_ = std::forward<Job>(job);
    count_ = count;
    remaining_ = count;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
  }

 private:
  void work(unsigned index) {
    uint64_t seen = 0;
    for (;;) {
      std::function<void(unsigned)> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return generation_ != seen && index < count_; });
        seen = generation_;
        job = job_;
      }
      job(index);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--remaining_ == 0) done_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::vector<std::thread> threads_;
  std::function<void(unsigned)> job_;
  unsigned count_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
};

inline Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: its threads outlive static destruction
  return *instance;
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(current_cta->dynamic_shared.data());
}

// Room for the kernels' static shared arrays (1088 bytes at most, ptxas -v) within the 48 KiB a launch may
// use without opting in to more.
constexpr size_t kStaticSharedReserve = 2048;

struct Launch {
  dim3 grid, block;
  size_t shared_bytes;
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), shared_bytes(s) {}

  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), A&&... args) const {
    static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
    if (grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535)
      fail("grid dimensions out of range");
    const unsigned threads = block.x * block.y * block.z;
    if (block.y != 1 || block.z != 1 || threads < 32 || threads > 1024 || threads % 32 != 0)
      fail("only 1-D blocks of whole warps (32..1024 threads) are emulated");
    if (shared_bytes + kStaticSharedReserve > 48 * 1024) fail("dynamic + static shared memory over 48 KiB");
    if ((sizeof(P) + ... + 0) > 4096) fail("kernel parameters over 4 KiB");
    const std::tuple<P...> params(std::forward<A>(args)...);
    for (unsigned bz = 0; bz < grid.z; ++bz) {
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          Cta cta;
          cta.block_barrier = std::make_unique<Barrier>(threads);
          for (unsigned w = 0; w < threads / 32; ++w) cta.warp_barriers.push_back(std::make_unique<Barrier>(32));
          cta.warp_exchange.assign(threads, 0.0f);
          cta.dynamic_shared.assign(shared_bytes, 0xFF);  // NaN in every float
          pool().run(threads, [&](unsigned t) {
            current_cta = &cta;
            threadIdx = {t, 0, 0};
            blockIdx = {bx, by, bz};
            blockDim = block;
            gridDim = grid;
            std::tuple<P...> copy = params;
            std::apply(kernel, copy);
          });
        }
      }
    }
  }
};

}  // namespace emu

// c10/cuda shims: one device, the default stream.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
namespace c10::cuda {
struct EmuStream {
  operator cudaStream_t() const { return nullptr; }
};
inline EmuStream getCurrentCUDAStream(int = -1) { return {}; }
struct CUDAGuard {
  explicit CUDAGuard(const at::Device&) {}
};
}  // namespace c10::cuda
