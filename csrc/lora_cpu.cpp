// CPU forward and backward of a LoRA linear layer on a frozen 4-bit (or dense) base weight.
//
//   forward:  y  = x W^T + s * (x_lora A^T) B^T + bias        x (M, K), W (N, K), A (r, K), B (N, r)
//             xa = x_lora A^T (float32, saved for the backward)
//   backward: dx = dy W + s * keep . ((dy B) A)
//             dA = s * (dy B)^T x_lora,  dB = s * dy^T xa
// With dropout p: x_lora = keep . x (0/1 bits from (seed, m K + k), csrc/dropout.h) and s = scale / (1 - p);
// without, x_lora = x and s = scale. The bits are generated where x is converted to float32 for the rank-r
// products (forward xa, backward dA) and where the low-rank update of dx is staged: no mask or x_lora is
// ever stored beyond one cached row chunk.
//
// Strategy: never materialise the whole dequantized W. The forward decodes a panel of rows of W (a
// contiguous range of the flattened tensor) into a buffer in x's dtype that stays in the last-level
// cache and hands it to torch's GEMM (oneDNN/MKL; bf16 uses the AVX512-BF16/AMX kernels where the CPU
// has them), writing straight into the matching columns of y. The backward does the same with slabs of
// columns of W, so every dx column block is one GEMM with no cross-panel accumulation. The rank-r terms
// are thin GEMMs in float32. The low-rank update of a panel (plus the bias) is made after the panel's
// GEMM, in float32 row chunks small enough to stay in the core's L2, and each chunk is added to the GEMM
// output and rounded once while it is hot: y = dtype(dtype(x W_panel^T) + (scale xa B_panel^T + bias)),
// the arithmetic of the torch composite (and of PEFT), bit for bit on a dense base.
// (Folding the update into the GEMM as its C operand, addmm with beta = 1, measured ~3 ms slower per
// 512 x 4096 x 4096 bf16 GEMM than mm plus the separate add on this CPU; the 16-bit <-> float32 row
// conversions are the extension's own, convert_cpu.h: torch's mixed-dtype copy_/add_ ran at 1-2 G
// elements/s, ~8 ms of a 70 ms step.)
// Scratch: the panel, the float32 staging of the low-rank update and the float32 row chunks of x / dy
// live in per-thread buffers reused across calls (see scratch()), about 21 MiB per calling thread; the
// outputs are fresh tensors.
#include "convert_cpu.h"
#include "dropout.h"
#include "nf4_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>

namespace lowrank_ext {
namespace {

// A positive byte count from the environment, else `fallback`.
int64_t bytes_from_env(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  const long long bytes = value != nullptr ? std::atoll(value) : 0;
  return bytes > 0 ? bytes : fallback;
}

// Bytes of one decoded panel/slab of W: big enough that the GEMM runs at full speed and that there are
// few parallel regions (each is a barrier, and on a loaded machine a barrier can cost a time slice),
// small enough to stay in the last-level cache and far below a dequantized copy of a large W. 16 MiB
// measured 5 % faster than 8 MiB for a 4096 -> 14336 layer (backward slabs of 585 instead of 292 columns)
// and the same at 4096 x 4096 (2 cores, 32 MiB L3).
// LOWRANK_EXT_PANEL_BYTES / LOWRANK_EXT_CHUNK_BYTES override both sizes (read once), so that the tests'
// small problems cross panel, slab and row-chunk boundaries.
int64_t panel_bytes() {
  static const int64_t bytes = bytes_from_env("LOWRANK_EXT_PANEL_BYTES", 16 << 20);
  return bytes;
}
// An explicit LOWRANK_EXT_PANEL_BYTES is taken as is (no widening of backward slabs, see lora_backward_cpu).
bool panel_bytes_fixed() {
  static const bool fixed = bytes_from_env("LOWRANK_EXT_PANEL_BYTES", 0) > 0;
  return fixed;
}
// Bytes of one float32 row chunk (of x, dy, or of a panel's low-rank update): the thin rank-r GEMMs and
// the dtype conversions work on chunks this size, so their temporaries stay in the core's own cache
// (1 MiB: half of this machine's 2 MiB L2) between being written and being read.
int64_t chunk_bytes() {
  static const int64_t bytes = bytes_from_env("LOWRANK_EXT_CHUNK_BYTES", 1 << 20);
  return bytes;
}

int64_t rows_per_chunk(int64_t cols) { return std::max<int64_t>(1, chunk_bytes() / (4 * std::max<int64_t>(1, cols))); }

// Row chunks of the reductions over M (dA = g^T x_lora, dB = dy^T xa) round the running float32 sum once
// per chunk: at least 256 rows per chunk keeps that to what a BLAS's own K-blocking does (measured: chunks
// of 4 rows tripled the dA error of a single sgemm at M = 67).
constexpr int64_t kMinReductionRows = 256;

int64_t rows_per_reduction_chunk(int64_t cols) { return std::max(kMinReductionRows, rows_per_chunk(cols)); }

// Rows (forward) or columns (backward) of W per panel: `other` is the panel's other dimension. A
// multiple of 256 (of 64 for small panels): column slabs then start on a quantization block (blocksize
// <= 256), so every row segment takes the vectorised whole-block decode, and the GEMM sees an aligned
// width.
int64_t panel_extent(int64_t other, int64_t element_size, int64_t total) {
  int64_t extent = std::max<int64_t>(64, panel_bytes() / std::max<int64_t>(1, other * element_size));
  extent -= extent % (extent >= 256 ? 256 : 64);
  return std::min(extent, total);
}

// Per-thread scratch buffers, reused across calls. A fresh multi-megabyte buffer faults its pages in on
// first touch, one per 4 KiB: in a VM that cost ~2 ms for an 8 MiB panel, a tenth of the layer's time.
// Grow-only; each slot holds one live tensor view at a time, so a slot is never used twice in one
// expression. Thread-local, so concurrent calls from different threads never share a buffer.
enum ScratchSlot { kPanelSlot, kStageSlot, kConvertSlot, kNumSlots };

at::Tensor scratch(ScratchSlot slot, c10::IntArrayRef shape, at::ScalarType dtype) {
  thread_local at::Tensor buffers[kNumSlots];
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const int64_t nbytes = std::max<int64_t>(1, numel) * static_cast<int64_t>(c10::elementSize(dtype));
  at::Tensor& buffer = buffers[slot];
  if (!buffer.defined() || buffer.numel() < nbytes) buffer = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte));
  return buffer.narrow(0, 0, nbytes).view(dtype).narrow(0, 0, numel).view(shape);
}

constexpr int64_t kDecodeGrain = 1 << 15;  // elements per parallel decode task
constexpr int64_t kMinSlabColumnsPerThread = 512;

// The validated dropout state of one call (p in [0, 1); p == 0: inactive).
DropoutKey checked_dropout(double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout must be a probability in [0, 1), got ", p);
  return make_dropout_key(p, seed);
}

// Zero the dropped elements of `block` (contiguous float32 rows, each `block.size(1)` wide), whose row i
// starts at mask index e0 + i * row_stride.
void zero_dropped_rows(at::Tensor& block, int64_t e0, int64_t row_stride, const DropoutKey& key) {
  const int64_t rows = block.size(0), cols = block.size(1);
  float* data = block.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kDecodeGrain / std::max<int64_t>(1, cols)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dropout_zero_dropped(key, e0 + r * row_stride, data + r * cols, cols);
  });
}

// The frozen base weight: a 4-bit view, or a dense (N, K) tensor converted to the compute dtype.
struct BaseWeight {
  bool quantized = false;
  Nf4View view;
  at::Tensor dense;
  std::vector<at::Tensor> keep;
};

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the ext CPU kernels, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", dt);
}

BaseWeight make_base(const at::Tensor& weight, const std::optional<at::Tensor>& absmax,
                     const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_offset,
                     int64_t blocksize, const std::string& quant_type, at::ScalarType nested_dtype, int64_t N,
                     int64_t K, at::ScalarType dtype) {
  BaseWeight base;
  if (absmax.has_value()) {
    base.quantized = true;
    base.view = make_view(weight, *absmax, nested_absmax, nested_offset, N * K, blocksize, quant_type, nested_dtype,
                          base.keep);
  } else {
    check_float(weight, "weight");
    TORCH_CHECK(weight.dim() == 2 && weight.size(0) == N && weight.size(1) == K, "dense weight must have shape (",
                N, ", ", K, ") = (B.shape[0], x.shape[1]), got ", weight.sizes());
    TORCH_CHECK(!nested_absmax.has_value() && !nested_offset.has_value(),
                "nested_absmax/nested_offset given for a dense weight");
    base.dense = weight.to(dtype);
  }
  return base;
}

// Rows [n0, n0 + rows) of W (N, K) as a contiguous (rows, K) tensor in `dtype` (the panel scratch slot).
at::Tensor decode_rows(const BaseWeight& w, int64_t n0, int64_t rows, int64_t K, at::ScalarType dtype) {
  at::Tensor panel = scratch(kPanelSlot, {rows, K}, dtype);
  char* dst = static_cast<char*>(panel.data_ptr());
  const int64_t esize = panel.element_size();
  at::parallel_for(0, rows, std::max<int64_t>(1, kDecodeGrain / K), [&](int64_t r0, int64_t r1) {
    decode_range(w.view, (n0 + r0) * K, (r1 - r0) * K, dst + r0 * K * esize, dtype);
  });
  return panel;
}

// A column slab reads a short run of codes (and block constants) from every row of W, one row apart:
// no stream the hardware prefetcher follows, so each run waited on memory latency (4096 -> 14336: the
// backward took 25 ms longer than on a dense weight). Asking for the runs a few rows ahead overlaps them.
// always_inline: GCC counts a function holding only prefetches as side-effect free and drops its calls.
constexpr int64_t kPrefetchRows = 8;

__attribute__((always_inline)) inline void prefetch_range(const void* data, int64_t bytes) {
  const char* p = static_cast<const char*>(data);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

// Hint the cache to fetch the codes and block constants of elements [start, start + count).
__attribute__((always_inline)) inline void prefetch_elements(const Nf4View& v, int64_t start, int64_t count) {
  prefetch_range(v.packed + start / 2, (count + 1) / 2);
  const int64_t b0 = start / v.blocksize, nb = (start + count - 1) / v.blocksize - b0 + 1;
  if (v.absmax != nullptr) {
    prefetch_range(v.absmax + b0, nb * 4);
  } else {
    prefetch_range(v.qabsmax + b0, nb);
  }
}

// Columns [k0, k0 + cols) of W (N, K) as a contiguous (N, cols) tensor in `dtype` (the panel scratch slot).
at::Tensor decode_columns(const BaseWeight& w, int64_t k0, int64_t cols, int64_t N, int64_t K, at::ScalarType dtype) {
  at::Tensor slab = scratch(kPanelSlot, {N, cols}, dtype);
  char* dst = static_cast<char*>(slab.data_ptr());
  const int64_t esize = slab.element_size();
  at::parallel_for(0, N, std::max<int64_t>(1, kDecodeGrain / cols), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (n + kPrefetchRows < N) prefetch_elements(w.view, (n + kPrefetchRows) * K + k0, cols);
      decode_range(w.view, n * K + k0, cols, dst + n * cols * esize, dtype);
    }
  });
  return slab;
}

// Rows [m0, m0 + rows) of `t` (2-D (M, K), contiguous) in float32, with the dropped elements zeroed
// when `key` is active: a view when t is float32 and nothing is dropped, else a copy in the convert
// scratch slot. Each row is converted and masked while it is in the first-level cache.
at::Tensor rows_as_float_kept(const at::Tensor& t, int64_t m0, int64_t rows, const DropoutKey& key) {
  const at::Tensor part = t.narrow(0, m0, rows);
  if (t.scalar_type() == at::kFloat && !key.active) return part;
  const int64_t K = t.size(1);
  at::Tensor out = scratch(kConvertSlot, {rows, K}, at::kFloat);
  const char* src = static_cast<const char*>(part.data_ptr());
  const int64_t src_row_bytes = K * static_cast<int64_t>(t.element_size());
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kDecodeGrain / K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      convert_to_float(src + r * src_row_bytes, t.scalar_type(), dst + r * K, K);
      if (key.active) dropout_zero_dropped(key, (m0 + r) * K, dst + r * K, K);
    }
  });
  return out;
}

at::Tensor rows_as_float(const at::Tensor& t, int64_t m0, int64_t rows) {
  return rows_as_float_kept(t, m0, rows, DropoutKey{});
}

// out (a strided 2-D view in `dtype`, unit column stride) = dtype(dtype(a @ b) + update) with one
// rounding of the sum: torch's GEMM writes out first; then `make_update(r0, rows, stage)` fills a float32
// (rows, cols) chunk of the low-rank update for out's rows [r0, r0 + rows), which is added to those rows
// at once, while the chunk is still in cache (made before the GEMM it would be evicted by it).
template <typename MakeUpdate>
void gemm_then_add_update(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, MakeUpdate make_update) {
  at::mm_out(out, a, b);
  const int64_t rows = out.size(0), cols = out.size(1);
  char* base = static_cast<char*>(out.data_ptr());
  const int64_t row_bytes = out.stride(0) * static_cast<int64_t>(out.element_size());
  const int64_t chunk = rows_per_chunk(cols);
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    at::Tensor stage = scratch(kStageSlot, {n, cols}, at::kFloat);
    make_update(r0, n, stage);
    const float* add = stage.data_ptr<float>();
    at::parallel_for(0, n, std::max<int64_t>(1, kDecodeGrain / cols), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        add_float_rounded(base + (r0 + i) * row_bytes, out.scalar_type(), add + i * cols, cols);
    });
  }
}

struct Shapes {
  int64_t M, K, N, r;
};

Shapes check_lora_args(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B) {
  check_float(x, "x");
  check_float(A, "A");
  check_float(B, "B");
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(1) == x.size(1), "A must have shape (r, K) with K = ", x.size(1),
              ", got ", A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(1) == A.size(0), "B must have shape (N, r) with r = ", A.size(0), ", got ",
              B.sizes());
  TORCH_CHECK(x.size(1) > 0 && B.size(0) > 0, "K and N must be positive, got K = ", x.size(1), ", N = ", B.size(0));
  return {x.size(0), x.size(1), B.size(0), A.size(0)};
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& absmax,
                                                    const std::optional<at::Tensor>& nested_absmax,
                                                    const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                                                    c10::string_view quant_type, at::ScalarType nested_dtype,
                                                    const at::Tensor& A,
                                                    const at::Tensor& B, double scale,
                                                    const std::optional<at::Tensor>& bias, double dropout,
                                                    int64_t dropout_seed) {
  const Shapes s = check_lora_args(x_in, A, B);
  const DropoutKey drop = checked_dropout(dropout, dropout_seed);
  if (drop.active) scale /= (1.0 - dropout);
  const auto dtype = x_in.scalar_type();
  if (bias.has_value()) {
    check_float(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.N, "bias must have shape (", s.N, "), got ", bias->sizes());
  }
  BaseWeight w = make_base(weight, absmax, nested_absmax, nested_offset, blocksize, std::string(quant_type), nested_dtype, s.N, s.K, dtype);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor A32 = A.to(at::kFloat);
  const at::Tensor B32 = B.to(at::kFloat);
  const std::optional<at::Tensor> bias32 =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt;

  at::Tensor xa = at::empty({s.M, s.r}, x.options().dtype(at::kFloat));
  const int64_t x_chunk = rows_per_chunk(s.K);
  for (int64_t m0 = 0; m0 < s.M; m0 += x_chunk) {
    const int64_t rows = std::min(x_chunk, s.M - m0);
    at::Tensor xa_rows = xa.narrow(0, m0, rows);
    at::mm_out(xa_rows, rows_as_float_kept(x, m0, rows, drop), A32.t());
  }
  const at::Tensor xa_scaled = xa * scale;

  at::Tensor y = at::empty({s.M, s.N}, x.options());
  // A dense base takes the same panels (as views): torch's GEMM ran ~10 % faster on them than on all of W.
  const int64_t panel_rows = panel_extent(s.K, x.element_size(), s.N);
  for (int64_t n0 = 0; n0 < s.N; n0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, s.N - n0);
    const at::Tensor panel = w.quantized ? decode_rows(w, n0, rows, s.K, dtype) : w.dense.narrow(0, n0, rows);
    const at::Tensor B_panel = B32.narrow(0, n0, rows);
    at::Tensor y_panel = y.narrow(1, n0, rows);  // strided: the GEMM writes in place
    gemm_then_add_update(y_panel, x, panel.t(), [&](int64_t m0, int64_t m_rows, at::Tensor& update) {
      at::mm_out(update, xa_scaled.narrow(0, m0, m_rows), B_panel.t());
      if (bias32.has_value()) update.add_(bias32->narrow(0, n0, rows));
    });
  }
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
    c10::string_view quant_type, at::ScalarType nested_dtype, const at::Tensor& A, const at::Tensor& B, double scale,
    const at::Tensor& xa, double dropout, int64_t dropout_seed, bool need_dx, bool need_dA, bool need_dB) {
  const Shapes s = check_lora_args(x, A, B);
  const DropoutKey drop = checked_dropout(dropout, dropout_seed);
  if (drop.active) scale /= (1.0 - dropout);
  check_float(dy_in, "dy");
  TORCH_CHECK(dy_in.dim() == 2 && dy_in.size(0) == s.M && dy_in.size(1) == s.N, "dy must have shape (", s.M, ", ",
              s.N, "), got ", dy_in.sizes());
  TORCH_CHECK(xa.scalar_type() == at::kFloat && xa.dim() == 2 && xa.size(0) == s.M && xa.size(1) == s.r,
              "xa must be float32 of shape (", s.M, ", ", s.r, ") (the forward's second output), got ",
              xa.scalar_type(), " ", xa.sizes());
  const auto dtype = x.scalar_type();
  const at::Tensor dy = dy_in.to(dtype).contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor A32 = A.to(at::kFloat);
  const at::Tensor B32 = B.to(at::kFloat);
  const at::Tensor empty = at::empty({0}, x.options());

  // Rank-r terms over row chunks: g = dy B (M, r); dA += g^T x_lora; dB += dy^T xa (all float32).
  const bool need_g = need_dx || need_dA;
  at::Tensor g = need_g ? at::empty({s.M, s.r}, x.options().dtype(at::kFloat)) : empty;
  at::Tensor dA32 = need_dA ? at::zeros({s.r, s.K}, x.options().dtype(at::kFloat)) : empty;
  at::Tensor dB32 = need_dB ? at::zeros({s.N, s.r}, x.options().dtype(at::kFloat)) : empty;
  if (need_g || need_dB) {
    const int64_t dy_chunk = rows_per_reduction_chunk(std::max(s.N, s.K));
    for (int64_t m0 = 0; m0 < s.M; m0 += dy_chunk) {
      const int64_t rows = std::min(dy_chunk, s.M - m0);
      at::Tensor g_rows = need_g ? g.narrow(0, m0, rows) : empty;
      {
        const at::Tensor dy32 = rows_as_float(dy, m0, rows);  // holds the convert slot until the block ends
        if (need_g) at::mm_out(g_rows, dy32, B32);
        if (need_dB) dB32.addmm_(dy32.t(), xa.narrow(0, m0, rows));
      }
      if (need_dA) dA32.addmm_(g_rows.t(), rows_as_float_kept(xc, m0, rows, drop));
    }
  }
  const at::Tensor dA = need_dA ? (dA32 * scale).to(A.scalar_type()) : empty;
  const at::Tensor dB = need_dB ? (dB32 * scale).to(B.scalar_type()) : empty;

  at::Tensor dx = empty;
  if (need_dx) {
    BaseWeight w = make_base(weight, absmax, nested_absmax, nested_offset, blocksize, std::string(quant_type), nested_dtype, s.N, s.K, dtype);
    const at::Tensor g_scaled = g * scale;
    dx = at::empty({s.M, s.K}, x.options());
    // At least 512 columns per thread: torch's bf16 GEMM (oneDNN) ran dy (512 x 14336) times a 512-column
    // slab on one of 2 threads (100 ms; 1024 columns: 50 ms), so a slab that is narrow because N is large
    // is widened, at the cost of a larger panel buffer (N x 1024 bf16 = 28 MiB for N = 14336, 2 threads).
    const int64_t min_cols =
        panel_bytes_fixed() ? 0 : std::min<int64_t>(s.K, kMinSlabColumnsPerThread * at::get_num_threads());
    const int64_t slab_cols = std::max(panel_extent(s.N, x.element_size(), s.K), min_cols);
    for (int64_t k0 = 0; k0 < s.K; k0 += slab_cols) {
      const int64_t cols = std::min(slab_cols, s.K - k0);
      const at::Tensor slab = w.quantized ? decode_columns(w, k0, cols, s.N, s.K, dtype) : w.dense.narrow(1, k0, cols);
      const at::Tensor A_slab = A32.narrow(1, k0, cols);
      at::Tensor dx_slab = dx.narrow(1, k0, cols);
      gemm_then_add_update(dx_slab, dy, slab, [&](int64_t m0, int64_t m_rows, at::Tensor& update) {
        at::mm_out(update, g_scaled.narrow(0, m0, m_rows), A_slab);
        if (drop.active) zero_dropped_rows(update, m0 * s.K + k0, s.K, drop);
      });
    }
  }
  return {dx, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("lora_forward", &lora_forward_cpu);
  m.impl("lora_backward", &lora_backward_cpu);
}

}  // namespace lowrank_ext
