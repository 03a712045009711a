"""Fused low-rank matmul over a frozen (4-bit or dense) weight: forward and backward.

Math (PEFT LoRA, ``A``: r x K, ``B``: N x r, ``s`` = alpha / r or alpha / sqrt(r))
-------------------------------------------------------------------------------
forward   y  = x · dequant(W)ᵀ + b + s · (x_lora · Aᵀ) · Bᵀ        x, x_lora: M x K, W: N x K, y: M x N
          xa = x_lora · Aᵀ  (M x r, fp32, saved for dB)              x_lora = keep ⊙ x, or x itself
backward  dS = dy · B       (M x r, fp32, computed once, used by dX and dA)
          dX = dy · dequant(W) + s · keep ⊙ (dS · A)                 M x K, in x.dtype
          dA = s · dSᵀ · x_lora                                      r x K, in A.dtype
          dB = s · dyᵀ · xa                                          N x r, in B.dtype

Dropout (``dropout=Dropout(p, seed)``, see ``dropout.py``): ``keep`` is the 0/1 counter-based mask of
element (m, k) and ``s = scale / (1 - p)`` (without dropout keep = 1, s = scale). The bits are generated
in registers where a kernel reads x for the shrink (forward, dA) and where the dX epilogue adds the
low-rank term; no mask and no x_lora exists in memory.

The forward main GEMM and dX are the same pattern, ``out[m, c] = Σ_t in[m, t] · Wop[t, c] +
s · Σ_j (Σ_t lin[m, t] · P[t, j]) · Q[j, c]``: forward t = k, c = n, P = Aᵀ, Q = Bᵀ; dX t = n, c = k,
P = B, Q = A. One kernel (``_lora_matmul_kernel``) serves both through strides. The low-rank
"shrink" ``lin · P`` is either accumulated in the same t loop (one kernel; every column tile
recomputes it, cheap while few programs share a row tile) or precomputed once by
``_lora_shrink_kernel`` and read in the epilogue.

Weight layout: dense W is read through its strides. 4-bit W is bitsandbytes' layout (see ``nf4.py``):
the row-major flattened W cut into ``blocksize`` runs (a run may span two rows when K is not a multiple
of blocksize), element e = n·K + k in byte e // 2, high nibble first. Each tile is decoded in registers
to ``dtype(table[code] · absmax[e // blocksize])`` -- bit-identical to ``dequantize_4bit`` -- and the
full decoded W never exists in memory (except on the forward's ``dequant_matmul`` path, by choice).

Precision: the main products run on x.dtype operands with fp32 accumulation (fp32 inputs use IEEE fp32
dots, never TF32). The adapter products also run in x.dtype operands (A, B, xa, dS are rounded to
x.dtype as dot operands, like PyTorch autocast) with fp32 accumulation; xa and dS are kept in fp32.
Under the Triton interpreter bf16 dot operands are upcast to fp32 (triton 3.9's interpreter returns
garbage for bf16 ``tl.dot``); the values are the same bf16 numbers, so only accumulation order changes.

Bytes moved, small-M forward (blocksize 64, double quant, bf16 x, fp32 A/B, r = 16): the 4-bit weight
0.516 B/param from HBM once; x (M·K·2 B) and A (r·K·4 B) re-read from L2 by every column tile;
y M·N·2 B written. 4096 x 4096 at M = 16: 8.65 MB + 0.13 MB + 0.13 MB ≈ 2.7 µs at 3.35 TB/s.
Backward dX pass reads dy once per column tile (from L2) and the 4-bit weight once from HBM; dB reads
dy and xa once more; dA reads dS and x_lora once.

Forward paths (``choose_forward_path`` is the one place that picks): ``fused_small_m`` (weight streamed
and decoded in registers, shrink in the K loop), ``fused_tiled`` (each weight tile decoded once per
program feeding tl.dot, shrink precomputed), ``dequant_matmul`` (one-launch dequant + torch.matmul,
then the LoRA term added with one addmm). The M thresholds are to be measured on GPU.

Backward paths (``choose_backward_path`` picks; ``path=`` forces): ``fused`` (the dX
kernel above, W decoded tile by tile) and ``dequant`` (the forward's ``dequant_matmul`` helper with
t = n: W dequantized once into a transient, dX = dy · W on cuBLAS, then ``dX += s · dS · A``). dS, dA and
dB are computed the same way on both paths.
"""

from __future__ import annotations

import math
import numbers

import torch
from lowrank.kernels import dropout as _dropout
from lowrank.kernels import nf4 as _nf4

from lowrank.nf4_format import NF4Weight

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# ----------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------

FORWARD_PATHS = ("fused_small_m", "fused_tiled", "dequant_matmul")
#: Largest M served by the weight-streaming kernel (4-bit GEMM is memory-bound below M ~ 68 on H100).
#: To be measured on GPU.
SMALL_M_MAX = 64
#: Largest M served by the tile-decoding fused GEMM; above it, dequant + cuBLAS. To be measured on GPU
#: (a guess from the roofline: up to two 128-row tiles re-decode each weight tile at most twice).
TILED_M_MAX = 256
BACKWARD_PATHS = ("fused", "dequant")
#: Largest M whose dX runs the fused kernel; above it, dequantize + cuBLAS. A guess: on one H100 (bf16,
#: 4096 x 4096, r = 16, forward + backward of one layer) the fused backward won at M = 16 (1.99 ms vs 3.31
#: for pure torch) and was 3x slower than dequantize + matmul at M = 8192 (13.5 vs 4.40 ms). The crossover
#: is not measured; bench/gpu/run.sh records the backward path of each case so that it can be.
FUSED_BACKWARD_M_MAX = 256
#: Largest row tile of the small-M kernel (see _tile_config).
SMALL_BLOCK_M_MAX = 32
#: Largest rank whose shrink is accumulated inside the main loop (its accumulator lives in registers).
FUSED_RANK_MAX = 64
#: Smallest reduction length one program of the split shrink (x·Aᵀ, dy·B) handles.
SHRINK_MIN_T_PER_SPLIT = 256
#: Whether the small-M kernels accumulate the shrink (xa, dS) in their own loop (one launch; every
#: column tile recomputes it) instead of a split shrink launch before them. To be measured on GPU.
FUSE_SHRINK_SMALL_M = True


def _interpreting(device: torch.device) -> bool:
    # Triton runs CPU tensors only in its interpreter (the dispatch point checks that it is on), so the
    # device says which numerics apply; nothing here reads the environment.
    return device.type == "cpu"


# ----------------------------------------------------------------------------------------------------
# Pure-torch references (fp32 accumulation; a dense weight is first rounded to x.dtype).
# ----------------------------------------------------------------------------------------------------


def lora_matmul_ref(x, weight_dense, A, B, scale, bias=None, dropout=None) -> torch.Tensor:
    """``x · W'ᵀ + b + s · (x_lora · Aᵀ) · Bᵀ`` in fp32 with W' = W rounded to x.dtype; returns x.dtype.

    x: (M, K); weight_dense: (N, K); A: (r, K); B: (N, r); bias: (N,) or None; dropout: a
    :class:`~lowrank.kernels.dropout.Dropout` or None (x_lora = keep ⊙ x and s = scale / (1 - p)).
    """
    x_lora = x if dropout is None else _dropout.masked_rows_ref(x, dropout)
    scale = _dropout.lora_scale(scale, dropout)
    w = weight_dense.to(x.dtype).float()
    y = x.float() @ w.T + scale * ((x_lora.float() @ A.float().T) @ B.float().T)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def lora_backward_ref(dy, x, weight_dense, A, B, scale, dropout=None):
    """fp32 reference of ``(dx, dA, dB)``: dx (M, K) in x.dtype, dA (r, K) in A.dtype, dB (N, r) in B.dtype."""
    x_lora = x if dropout is None else _dropout.masked_rows_ref(x, dropout)
    scale = _dropout.lora_scale(scale, dropout)
    dyf, w = dy.float(), weight_dense.to(x.dtype).float()
    ds = dyf @ B.float()
    low = ds @ A.float()
    if dropout is not None:
        low = _dropout.masked_rows_ref(low, dropout)
    dx = dyf @ w + scale * low
    da = scale * (ds.T @ x_lora.float())
    db = scale * (dyf.T @ (x_lora.float() @ A.float().T))
    return dx.to(x.dtype), da.to(A.dtype), db.to(B.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _lora_mma(a, b, acc, DOT_FP32: tl.constexpr):
        # fp32 operands: IEEE products, never TF32 (the tolerance rule compares with fp32 torch).
        # One return per jit function: triton 3.6 type-checks returns in dead constexpr branches.
        if DOT_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _lora_round(v, DTYPE: tl.constexpr, ROUND_BY_BITS: tl.constexpr):
        # v rounded to nearest-even in DTYPE. The interpreter's fp32 -> bf16 cast truncates, so there
        # (ROUND_BY_BITS) bf16 is rounded on the bits first and the cast is then exact.
        if ROUND_BY_BITS and DTYPE == tl.bfloat16:
            v = _nf4._round_to_bf16(v.to(tl.float32))
        return v.to(DTYPE)

    @triton.jit
    def _lora_load_weight_tile(
        w_ptr,  # dense W, or uint8 packed codes of the flattened W
        absmax_ptr,  # fp32 [nb], or uint8 [nb] codes (DOUBLE_QUANT)
        absmax2_ptr,  # fp32 [ceil(nb / 256)] (DOUBLE_QUANT)
        offset_ptr,  # fp32 [1] (DOUBLE_QUANT)
        dynamic_map_ptr,  # fp32 [256] (DOUBLE_QUANT)
        table_ptr,  # fp32 [16] code values
        offs_t,  # int64 [BLOCK_T] reduction-axis indices
        offs_c,  # int64 [BLOCK_C] output-column indices
        T,
        C,
        stride_w_t,  # element stride of W along t (for 4-bit: the logical row-major stride)
        stride_w_c,
        COMPUTE_DTYPE: tl.constexpr,  # the decoded value is rounded to this dtype (= dequantize_4bit's)
        W_QUANT: tl.constexpr,
        BLOCKSIZE: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        NESTED_KIND: tl.constexpr,  # see nf4._block_constant
        ROUND_BY_BITS: tl.constexpr,
    ):
        mask = (offs_t[:, None] < T) & (offs_c[None, :] < C)
        element = offs_t[:, None] * stride_w_t + offs_c[None, :] * stride_w_c
        if W_QUANT:
            byte = tl.load(w_ptr + (element >> 1), mask=mask, other=0).to(tl.int32)
            # element 2i sits in the high nibble of byte i
            code = (byte >> ((1 - (element & 1)) * 4).to(tl.int32)) & 0xF
            constant = _nf4._block_constant(
                element // BLOCKSIZE,
                mask,
                absmax_ptr,
                absmax2_ptr,
                offset_ptr,
                dynamic_map_ptr,
                DOUBLE_QUANT,
                NESTED_KIND,
            )
            value = tl.where(mask, tl.load(table_ptr + code) * constant, 0.0)
        else:
            value = tl.load(w_ptr + element, mask=mask, other=0.0)
        return _lora_round(value, COMPUTE_DTYPE, ROUND_BY_BITS)

    @triton.jit
    def _lora_load_4bit_rows(
        packed_ptr,  # uint8 packed codes of the flattened (N, K) weight
        absmax_ptr,
        absmax2_ptr,
        offset_ptr,
        dynamic_map_ptr,
        table_ptr,
        offs_n,  # int64 [ROWS] weight rows
        k0,  # first column; a multiple of DECODE_SUB
        N,
        K,  # a multiple of BLOCKSIZE (so K is even and no run of DECODE_SUB columns crosses a block)
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
        DECODE_SUB: tl.constexpr,  # min(BLOCKSIZE, COLS): columns sharing one block constant
        BLOCKSIZE: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        NESTED_KIND: tl.constexpr,
    ):
        # [ROWS, COLS] fp32 tile W[n, k0:k0+COLS]: contiguous byte loads, one block constant per
        # DECODE_SUB columns, hi/lo nibbles interleaved back into element order (as nf4's dequant kernel).
        NB: tl.constexpr = COLS // DECODE_SUB
        pair = tl.arange(0, COLS // 2)
        row_ok = offs_n[:, None] < N
        byte = tl.load(
            packed_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + pair)[None, :],
            mask=row_ok & ((k0 + 2 * pair)[None, :] < K),
            other=0,
        ).to(tl.int32)
        sub = tl.arange(0, NB)
        constant = _nf4._block_constant(
            (offs_n[:, None] * K + k0) // BLOCKSIZE + sub[None, :],
            row_ok & ((k0 + sub * DECODE_SUB)[None, :] < K),
            absmax_ptr,
            absmax2_ptr,
            offset_ptr,
            dynamic_map_ptr,
            DOUBLE_QUANT,
            NESTED_KIND,
        )
        hi = tl.reshape(tl.load(table_ptr + (byte >> 4)), (ROWS, NB, DECODE_SUB // 2)) * constant[:, :, None]
        lo = tl.reshape(tl.load(table_ptr + (byte & 0xF)), (ROWS, NB, DECODE_SUB // 2)) * constant[:, :, None]
        values = tl.interleave(tl.reshape(hi, (ROWS, COLS // 2)), tl.reshape(lo, (ROWS, COLS // 2)))
        return tl.where(row_ok & ((k0 + tl.arange(0, COLS))[None, :] < K), values, 0.0)

    @triton.jit
    def _lora_matmul_kernel(
        in_ptr,  # [M, T]: x (forward) or dy (dX); also the input of the shrink (FUSE_LOW)
        w_ptr,  # dense W or packed 4-bit codes
        absmax_ptr,
        absmax2_ptr,
        offset_ptr,
        dynamic_map_ptr,
        table_ptr,
        p_ptr,  # [T, R] shrink factor (Aᵀ forward, B for dX)
        q_ptr,  # [R, C] expand factor (Bᵀ forward, A for dX)
        low_ptr,  # fp32 [M, R]: written when FUSE_LOW (xa or dS), else read
        bias_ptr,  # [C] (HAS_BIAS)
        out_ptr,  # [M, C]
        M,
        C,
        T,
        R,
        scale,  # fp32 low-rank scale s
        stride_in_m,
        stride_in_t,
        drop_key0,  # dropout key / threshold (int32 bit patterns, DROPOUT), see dropout.dropout_keep
        drop_key1,
        drop_threshold,
        stride_w_t,
        stride_w_c,
        stride_p_t,
        stride_p_r,
        stride_q_r,
        stride_q_c,
        stride_low_m,
        stride_low_r,
        stride_out_m,
        stride_out_c,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_R: tl.constexpr,  # >= R when FUSE_LOW, else the chunk of R per epilogue step
        GROUP_M: tl.constexpr,  # row tiles per L2-friendly group
        W_QUANT: tl.constexpr,
        BLOCKSIZE: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        FUSE_LOW: tl.constexpr,
        DROPOUT: tl.constexpr,  # forward (T_IS_K, FUSE_LOW): mask the shrink input x; dX: mask the low-rank term
        HAS_BIAS: tl.constexpr,
        NESTED_KIND: tl.constexpr,
        FAST_DECODE: tl.constexpr,  # 4-bit W with K % BLOCKSIZE == 0: _lora_load_4bit_rows
        T_IS_K: tl.constexpr,  # forward (t = k, c = n); else dX (t = n, c = k)
        DECODE_SUB: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        DOT_FP32: tl.constexpr,
        ROUND_BY_BITS: tl.constexpr,  # interpreter: round to bf16 on the bits (its cast truncates)
    ):
        compute_dtype = in_ptr.dtype.element_ty
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_c = tl.cdiv(C, BLOCK_C)
        group = GROUP_M * num_c
        first_m = (pid // group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % group_rows
        pid_c = (pid % group) // group_rows

        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
        row_ok = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            t_ok = offs_t < T
            a = tl.load(
                in_ptr + offs_m[:, None] * stride_in_m + offs_t[None, :] * stride_in_t,
                mask=row_ok[:, None] & t_ok[None, :],
                other=0.0,
            ).to(DOT_DTYPE)
            if FAST_DECODE:
                if T_IS_K:
                    w = tl.trans(
                        _lora_load_4bit_rows(
                            w_ptr,
                            absmax_ptr,
                            absmax2_ptr,
                            offset_ptr,
                            dynamic_map_ptr,
                            table_ptr,
                            offs_c,
                            t0,
                            C,
                            T,
                            BLOCK_C,
                            BLOCK_T,
                            DECODE_SUB,
                            BLOCKSIZE,
                            DOUBLE_QUANT,
                            NESTED_KIND,
                        )
                    )
                else:
                    w = _lora_load_4bit_rows(
                        w_ptr,
                        absmax_ptr,
                        absmax2_ptr,
                        offset_ptr,
                        dynamic_map_ptr,
                        table_ptr,
                        offs_t,
                        pid_c * BLOCK_C,
                        T,
                        C,
                        BLOCK_T,
                        BLOCK_C,
                        DECODE_SUB,
                        BLOCKSIZE,
                        DOUBLE_QUANT,
                        NESTED_KIND,
                    )
                w = _lora_round(w, compute_dtype, ROUND_BY_BITS).to(DOT_DTYPE)
            else:
                w = _lora_load_weight_tile(
                    w_ptr,
                    absmax_ptr,
                    absmax2_ptr,
                    offset_ptr,
                    dynamic_map_ptr,
                    table_ptr,
                    offs_t,
                    offs_c,
                    T,
                    C,
                    stride_w_t,
                    stride_w_c,
                    compute_dtype,
                    W_QUANT,
                    BLOCKSIZE,
                    DOUBLE_QUANT,
                    NESTED_KIND,
                    ROUND_BY_BITS,
                ).to(DOT_DTYPE)
            acc = _lora_mma(a, w, acc, DOT_FP32)
            if FUSE_LOW:
                if DROPOUT:
                    if T_IS_K:  # x_lora = keep ⊙ x, element (m, k) at index m·K + k
                        keep = _dropout.dropout_keep(
                            offs_m[:, None] * T + offs_t[None, :], drop_key0, drop_key1, drop_threshold
                        )
                        a = tl.where(keep, a, tl.zeros_like(a))
                p = tl.load(
                    p_ptr + offs_t[:, None] * stride_p_t + offs_r[None, :] * stride_p_r,
                    mask=t_ok[:, None] & (offs_r[None, :] < R),
                    other=0.0,
                )
                p = _lora_round(p, compute_dtype, ROUND_BY_BITS).to(DOT_DTYPE)
                low = _lora_mma(a, p, low, DOT_FP32)

        lora = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        low_ptrs = low_ptr + offs_m[:, None] * stride_low_m + offs_r[None, :] * stride_low_r
        if FUSE_LOW:
            # One column tile writes the shrink result (xa / dS) for the caller.
            if pid_c == 0:
                tl.store(low_ptrs, low, mask=row_ok[:, None] & (offs_r[None, :] < R))
            q = tl.load(
                q_ptr + offs_r[:, None] * stride_q_r + offs_c[None, :] * stride_q_c,
                mask=(offs_r[:, None] < R) & (offs_c[None, :] < C),
                other=0.0,
            )
            q = _lora_round(q, compute_dtype, ROUND_BY_BITS).to(DOT_DTYPE)
            lora = _lora_mma(_lora_round(low, compute_dtype, ROUND_BY_BITS).to(DOT_DTYPE), q, lora, DOT_FP32)
        else:
            for r0 in range(0, R, BLOCK_R):
                r_ok = (r0 + offs_r) < R
                low_chunk = tl.load(low_ptrs + r0 * stride_low_r, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                q = tl.load(
                    q_ptr + (r0 + offs_r)[:, None] * stride_q_r + offs_c[None, :] * stride_q_c,
                    mask=r_ok[:, None] & (offs_c[None, :] < C),
                    other=0.0,
                )
                q = _lora_round(q, compute_dtype, ROUND_BY_BITS).to(DOT_DTYPE)
                low_chunk = _lora_round(low_chunk, compute_dtype, ROUND_BY_BITS).to(DOT_DTYPE)
                lora = _lora_mma(low_chunk, q, lora, DOT_FP32)
        if DROPOUT:
            if not T_IS_K:  # dX: keep ⊙ (dS · A), element (m, k) at index m·K + k
                keep = _dropout.dropout_keep(
                    offs_m[:, None] * C + offs_c[None, :], drop_key0, drop_key1, drop_threshold
                )
                lora = tl.where(keep, lora, tl.zeros_like(lora))
        out = acc + scale * lora
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + offs_m[:, None] * stride_out_m + offs_c[None, :] * stride_out_c,
            _lora_round(out, out_ptr.dtype.element_ty, ROUND_BY_BITS),
            mask=row_ok[:, None] & (offs_c[None, :] < C),
        )

    @triton.jit
    def _lora_shrink_kernel(
        lin_ptr,  # [M, T] (x.dtype)
        p_ptr,  # [T, R]
        low_ptr,  # fp32 [SPLIT, M, R] partial sums over T chunks (SPLIT = grid axis 2)
        M,
        T,
        R,
        t_per_split,  # a multiple of BLOCK_T
        drop_key0,  # dropout of lin = x (DROPOUT): element (m, t) at index m·T + t
        drop_key1,
        drop_threshold,
        stride_lin_m,
        stride_lin_t,
        stride_p_t,
        stride_p_r,
        stride_low_split,
        stride_low_m,
        stride_low_r,
        BLOCK_M: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_R: tl.constexpr,
        DROPOUT: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        DOT_FP32: tl.constexpr,
        ROUND_BY_BITS: tl.constexpr,
    ):
        compute_dtype = lin_ptr.dtype.element_ty
        offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_r = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        t_start = tl.program_id(2) * t_per_split
        t_end = tl.minimum(t_start + t_per_split, T)
        for t0 in range(t_start, t_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            a = tl.load(
                lin_ptr + offs_m[:, None] * stride_lin_m + offs_t[None, :] * stride_lin_t,
                mask=(offs_m[:, None] < M) & (offs_t[None, :] < T),
                other=0.0,
            ).to(DOT_DTYPE)
            if DROPOUT:
                keep = _dropout.dropout_keep(
                    offs_m[:, None] * T + offs_t[None, :], drop_key0, drop_key1, drop_threshold
                )
                a = tl.where(keep, a, tl.zeros_like(a))
            p = tl.load(
                p_ptr + offs_t[:, None] * stride_p_t + offs_r[None, :] * stride_p_r,
                mask=(offs_t[:, None] < T) & (offs_r[None, :] < R),
                other=0.0,
            )
            acc = _lora_mma(a, _lora_round(p, compute_dtype, ROUND_BY_BITS).to(DOT_DTYPE), acc, DOT_FP32)
        tl.store(
            low_ptr
            + tl.program_id(2) * stride_low_split
            + offs_m[:, None] * stride_low_m
            + offs_r[None, :] * stride_low_r,
            acc,
            mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
        )

    @triton.jit
    def _lora_grad_kernel(
        u_ptr,  # [M, P]
        v_ptr,  # [M, Q]
        out_ptr,  # [SPLIT, P, Q] fp32 partials, or [P, Q] in the gradient's dtype when SPLIT == 1
        M,
        P,
        Q,
        rows_per_split,  # rows of M reduced by one program (a multiple of BLOCK_M)
        scale,
        drop_key0,  # dropout of v = x (DROPOUT, dA): element (m, q) at index m·Q + q
        drop_key1,
        drop_threshold,
        stride_u_m,
        stride_u_p,
        stride_v_m,
        stride_v_q,
        stride_out_split,
        stride_out_p,
        stride_out_q,
        COMPUTE_DTYPE: tl.constexpr,  # both operands are rounded to this dtype (fp32: no rounding)
        BLOCK_P: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_M: tl.constexpr,
        DROPOUT: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        DOT_FP32: tl.constexpr,
        ROUND_BY_BITS: tl.constexpr,
    ):
        # out[p, q] = s · Σ_m u[m, p] · v[m, q]: dB = s·dyᵀ·xa and dA = s·dSᵀ·x_lora.
        offs_p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        offs_q = (tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
        split = tl.program_id(2)
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        m_start = split * rows_per_split
        m_end = tl.minimum(m_start + rows_per_split, M)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            m_ok = offs_m < m_end
            u_t = tl.load(
                u_ptr + offs_m[None, :] * stride_u_m + offs_p[:, None] * stride_u_p,
                mask=m_ok[None, :] & (offs_p[:, None] < P),
                other=0.0,
            )
            v = tl.load(
                v_ptr + offs_m[:, None] * stride_v_m + offs_q[None, :] * stride_v_q,
                mask=m_ok[:, None] & (offs_q[None, :] < Q),
                other=0.0,
            )
            if DROPOUT:
                keep = _dropout.dropout_keep(
                    offs_m[:, None] * Q + offs_q[None, :], drop_key0, drop_key1, drop_threshold
                )
                v = tl.where(keep, v, tl.zeros_like(v))
            u_t = _lora_round(u_t, COMPUTE_DTYPE, ROUND_BY_BITS).to(DOT_DTYPE)
            v = _lora_round(v, COMPUTE_DTYPE, ROUND_BY_BITS).to(DOT_DTYPE)
            acc = _lora_mma(u_t, v, acc, DOT_FP32)
        tl.store(
            out_ptr + split * stride_out_split + offs_p[:, None] * stride_out_p + offs_q[None, :] * stride_out_q,
            _lora_round(scale * acc, out_ptr.dtype.element_ty, ROUND_BY_BITS),
            mask=(offs_p[:, None] < P) & (offs_q[None, :] < Q),
        )


# ----------------------------------------------------------------------------------------------------
# Launchers: validate, allocate, grid, launch.
# ----------------------------------------------------------------------------------------------------


def choose_forward_path(M: int, N: int, K: int, device: torch.device | str) -> str:
    """The forward path for an (M, K) x (N, K)ᵀ product: the ONE place this choice is made.

    ``fused_small_m`` for M <= SMALL_M_MAX (memory-bound: stream and decode the 4-bit weight once),
    ``fused_tiled`` up to TILED_M_MAX, ``dequant_matmul`` above (cuBLAS wins once the GEMM is
    compute-bound). The thresholds are to be measured on GPU; N, K and device are accepted so that a
    measured table can use them.
    """
    if M <= SMALL_M_MAX:
        return "fused_small_m"
    if M <= TILED_M_MAX:
        return "fused_tiled"
    return "dequant_matmul"


def choose_backward_path(M: int, N: int, K: int, r: int, device: torch.device | str) -> str:
    """The backward path (one of BACKWARD_PATHS) by shape: the ONE place this choice is made.

    ``fused`` for M <= FUSED_BACKWARD_M_MAX (dX decodes W tile by tile), ``dequant`` above (W dequantized
    once, dX on cuBLAS). A caller forces a path with ``lora_backward(..., path=)`` (the ops layer does so
    for ``LOWRANK_LORA_BACKWARD_PATH``, read by ``lowrank.ops.dispatch``). N, K, r and device are accepted
    so that a measured table can use them.
    """
    return "fused" if M <= FUSED_BACKWARD_M_MAX else "dequant"


def _is_quantized(weight) -> bool:
    return not isinstance(weight, torch.Tensor)


def _weight_shape(weight) -> tuple[int, int]:
    if isinstance(weight, torch.Tensor):
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
        if weight.dtype not in _nf4.FLOAT_DTYPES:
            raise TypeError(f"a dense weight must be float32/float16/bfloat16, got {weight.dtype}")
        return tuple(weight.shape)
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be a dense tensor or an NF4Weight, got {type(weight).__name__}")
    shape = tuple(weight.shape)  # an NF4Weight was validated where it was built
    if len(shape) != 2:
        raise ValueError(f"a 4-bit weight must have a 2-D shape (N, K), got {shape}")
    return shape


def _check_path(path: str | None, paths: tuple[str, ...]) -> None:
    if path is not None and path not in paths:
        raise ValueError(f"path must be one of {paths} or None, got {path!r}")


def _weight_device(weight) -> torch.device:
    return weight.device if isinstance(weight, torch.Tensor) else weight.packed.device


def _check_device(device: torch.device) -> None:
    if not HAS_TRITON:
        raise RuntimeError("the lora_matmul kernels need triton, which is not installed")
    if device.type in ("cuda", "cpu"):  # CPU tensors run in the Triton interpreter (TRITON_INTERPRET=1)
        return
    raise RuntimeError(f"the lora_matmul kernels need CUDA tensors (or CPU tensors in the interpreter), got {device}")


def _check_operands(x, weight, A, B, scale, bias=None, dropout=None):
    """Validate the forward operands (direct callers of the launchers); returns (M, N, K, r)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D (M, K) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _nf4.FLOAT_DTYPES:
        raise TypeError(f"x must be float32/float16/bfloat16, got {x.dtype}")
    N, K = _weight_shape(weight)
    M = x.shape[0]
    if x.shape[1] != K:
        raise ValueError(f"x has K = {x.shape[1]} columns but the weight is (N, K) = ({N}, {K})")
    for name, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in _nf4.FLOAT_DTYPES:
            raise TypeError(f"{name} must be a 2-D float32/float16/bfloat16 tensor, got {getattr(t, 'dtype', type(t))}")
    r = A.shape[0]
    if A.shape[1] != K:
        raise ValueError(f"A must be (r, K) = (r, {K}), got {tuple(A.shape)}")
    if tuple(B.shape) != (N, r):
        raise ValueError(f"B must be (N, r) = ({N}, {r}), got {tuple(B.shape)}")
    if not 1 <= r <= min(N, K):
        raise ValueError(f"rank r = {r} must be in [1, min(N, K) = {min(N, K)}]")
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,) or bias.dtype not in _nf4.FLOAT_DTYPES:
            raise ValueError(f"bias must be a float tensor of shape ({N},), got {getattr(bias, 'shape', bias)}")
    if dropout is not None and not isinstance(dropout, _dropout.Dropout):
        raise TypeError(f"dropout must be a lowrank.kernels.dropout.Dropout or None, got {type(dropout).__name__}")
    device = x.device
    tensors = {"weight": _weight_device(weight), "A": A.device, "B": B.device}
    if bias is not None:
        tensors["bias"] = bias.device
    wrong = {name: str(d) for name, d in tensors.items() if d != device}
    if wrong:
        raise ValueError(f"all operands must be on x's device {device}; got {wrong}")
    _check_device(device)
    return M, N, K, r


_TL_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _dot_config(dtype: torch.dtype, device: torch.device) -> dict:
    """DOT_DTYPE / DOT_FP32 for inputs of ``dtype`` (bf16 is upcast under the interpreter)."""
    interpreting = _interpreting(device)
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting):
        return {"DOT_DTYPE": tl.float32, "DOT_FP32": True, "ROUND_BY_BITS": interpreting}
    return {"DOT_DTYPE": getattr(tl, _TL_DTYPES[dtype]), "DOT_FP32": False, "ROUND_BY_BITS": interpreting}


def _weight_args(weight, compute_dtype: torch.dtype) -> tuple[list, dict]:
    """Kernel pointer args and constexprs for W; the strides are (along n, along k)."""
    if not _is_quantized(weight):
        args = [weight, weight, weight, weight, weight, weight]
        meta = {"W_QUANT": False, "BLOCKSIZE": 64, "DOUBLE_QUANT": False, "NESTED_KIND": 0}
        return args, {**meta, "strides": weight.stride()}
    device = weight.packed.device
    double_quant = weight.nested_absmax is not None
    absmax = weight.absmax.contiguous()
    args = [
        weight.packed.contiguous(),
        absmax,
        weight.nested_absmax.contiguous() if double_quant else absmax,
        weight.nested_offset.reshape(1).float() if double_quant else absmax,
        _nf4._device_table("dynamic", device),
        _nf4._device_table(weight.quant_type, device),
    ]
    K = weight.shape[1]
    nested_kind = _nf4._NESTED_KIND[weight.nested_dtype]
    meta = {"W_QUANT": True, "BLOCKSIZE": weight.blocksize, "DOUBLE_QUANT": double_quant, "NESTED_KIND": nested_kind}
    return args, {**meta, "strides": (K, 1)}


def _block_r(r: int) -> int:
    return max(16, min(triton.next_power_of_2(r), FUSED_RANK_MAX))


def _tile_config(M: int, small: bool) -> dict:
    if small:
        # Row tiles of at most 32 (mma.sync on Hopper). On an H100 (triton 3.6) the M = 64 backward with a
        # 64-row tile (the wgmma path) raised an illegal memory access whose cause is not established;
        # 16- and 32-row tiles passed the GPU tests.
        block_m = max(16, min(triton.next_power_of_2(M), SMALL_BLOCK_M_MAX))
        config = {"BLOCK_M": block_m, "BLOCK_C": 32 if block_m <= 32 else 64, "BLOCK_T": 128, "GROUP_M": 1}
        config.update(num_warps=4, num_stages=2)
        return config
    return {"BLOCK_M": 128, "BLOCK_C": 128, "BLOCK_T": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _shrink(lin: torch.Tensor, p: torch.Tensor, r: int, dropout=None) -> torch.Tensor:
    """``(keep ⊙ lin) · p`` for lin (M, T) in x.dtype and p a (T, r) view; fp32 (M, r). keep = 1 without dropout."""
    M, T = lin.shape
    block_r, block_t = _block_r(r), 64
    block_m = 64 if M > 32 else max(16, triton.next_power_of_2(M))
    tiles = triton.cdiv(M, block_m) * triton.cdiv(r, block_r)
    # Split the long T reduction (deterministically: fp32 partials, then one sum) until ~2 waves of
    # programs run on a 132-SM GPU, each over at least SHRINK_MIN_T_PER_SPLIT columns.
    split = max(1, min(triton.cdiv(2 * 132, tiles), T // SHRINK_MIN_T_PER_SPLIT))
    t_per_split = triton.cdiv(triton.cdiv(T, split), block_t) * block_t
    split = triton.cdiv(T, t_per_split)
    low = torch.empty((split, M, r), dtype=torch.float32, device=lin.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(r, block_r), split)
    with _nf4._device_context(lin.device):
        _lora_shrink_kernel[grid](
            lin,
            p,
            low,
            M,
            T,
            r,
            t_per_split,
            *_drop_args(dropout),
            *lin.stride(),
            *p.stride(),
            *low.stride(),
            BLOCK_M=block_m,
            BLOCK_T=block_t,
            BLOCK_R=block_r,
            DROPOUT=dropout is not None,
            **_dot_config(lin.dtype, lin.device),
        )
    return low[0] if split == 1 else low.sum(0)


def _drop_args(dropout) -> tuple[int, int, int]:
    return (0, 0, 0) if dropout is None else dropout.kernel_args()


def _matmul(inp, weight, transpose_weight, p, q, low, fuse_low, bias, out, scale, small, dropout=None):
    """Launch ``_lora_matmul_kernel``: out = inp · Wop + s · low · q (+ bias), low = inp · p if fuse_low.

    With ``dropout``: forward (transpose_weight) masks inp in the fused shrink (an unfused xa is already
    masked); dX masks the low-rank term ``low · q``.
    """
    M, T = inp.shape
    C = out.shape[1]
    R = p.shape[1]
    w_args, w_meta = _weight_args(weight, inp.dtype)
    stride_n, stride_k = w_meta.pop("strides")
    # forward: t = k, c = n; dX: t = n, c = k
    stride_w_t, stride_w_c = (stride_k, stride_n) if transpose_weight else (stride_n, stride_k)
    config = _tile_config(M, small)
    block_r = triton.next_power_of_2(max(R, 16)) if fuse_low else _block_r(R)
    # Aligned 4-bit rows decode with contiguous byte loads and one constant per run (see _lora_load_4bit_rows).
    k_cols = config["BLOCK_T"] if transpose_weight else config["BLOCK_C"]
    fast = w_meta["W_QUANT"] and weight.shape[1] % weight.blocksize == 0
    decode = {"FAST_DECODE": fast, "T_IS_K": transpose_weight, "DECODE_SUB": min(w_meta["BLOCKSIZE"], k_cols)}
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(C, config["BLOCK_C"]),)
    with _nf4._device_context(inp.device):
        _lora_matmul_kernel[grid](
            inp,
            *w_args,
            p,
            q,
            low,
            bias if bias is not None else out,
            out,
            M,
            C,
            T,
            R,
            scale,
            *inp.stride(),
            *_drop_args(dropout),
            stride_w_t,
            stride_w_c,
            *p.stride(),
            *q.stride(),
            *low.stride(),
            *out.stride(),
            BLOCK_R=block_r,
            FUSE_LOW=fuse_low,
            DROPOUT=dropout is not None and (fuse_low or not transpose_weight),
            HAS_BIAS=bias is not None,
            **config,
            **w_meta,
            **decode,
            **_dot_config(inp.dtype, inp.device),
            **_nf4._launch_options(inp.device),
        )
    return out


def _dequantize(weight, dtype: torch.dtype) -> torch.Tensor:
    if not _is_quantized(weight):
        return weight.to(dtype)
    return _nf4.dequantize_4bit(
        weight.packed,
        weight.absmax,
        weight.nested_absmax,
        weight.nested_offset,
        tuple(weight.shape),
        dtype,
        weight.blocksize,
        weight.quant_type,
        weight.nested_dtype,
    )


def _dequant_matmul(inp, weight, transpose_weight, low, q, scale, bias=None, dropout=None):
    """``inp · Wop + bias + s · low · q`` on cuBLAS through a transient dequantized W (forward and dX).

    inp: (M, T) in the compute dtype; Wop = Wᵀ (forward: T = K, C = N) or W (dX: T = N, C = K); low: (M, r)
    fp32, or None for no low-rank term; q: (r, C); bias: (C,) or None. Returns (M, C) in inp.dtype.
    The decoded W (N·K·inp.dtype.itemsize bytes, the only full copy) lives until the main product is done.
    The low-rank term is one in-place addmm on inp.dtype operands with fp32 accumulation, as in the fused
    kernels' epilogue (except that the main product is rounded to inp.dtype once before it is added).
    With ``dropout`` (dX only) the low-rank term is a transient (M, C) product whose dropped elements are
    zeroed by ``dropout.apply_dropout_`` before it is added.
    """
    w = _dequantize(weight, inp.dtype)
    w_op = w.T if transpose_weight else w
    out = torch.addmm(bias.to(inp.dtype), inp, w_op) if bias is not None else inp @ w_op
    del w, w_op  # release the transient before the low-rank term
    # scale 0 (the ops layer's base-only dX under dropout) skips the term instead of multiplying it by 0.
    if low is not None and scale != 0.0:
        if dropout is None:
            out.addmm_(low.to(inp.dtype), q.to(inp.dtype), alpha=scale)
        else:
            term = _dropout.apply_dropout_(low.to(inp.dtype) @ q.to(inp.dtype), dropout)
            out.add_(term, alpha=scale)
    return out


def lora_forward(x, weight, A, B, scale: float, bias=None, dropout=None, *, path: str | None = None):
    """``y = x · dequant(W)ᵀ + b + s · (x_lora · Aᵀ) · Bᵀ`` and ``xa = x_lora · Aᵀ``.

    x: (M, K); weight: dense (N, K) tensor or an :class:`~lowrank.nf4_format.NF4Weight`; A: (r, K);
    B: (N, r); bias: (N,) or None; dropout: a :class:`~lowrank.kernels.dropout.Dropout` or None (x_lora =
    keep ⊙ x, s = scale / (1 - p); else x_lora = x, s = scale). Returns y (M, N) in x.dtype and xa (M, r)
    fp32. ``path`` forces one of FORWARD_PATHS (default: :func:`choose_forward_path`). Validates the
    operands, then runs :func:`lora_forward_unchecked`.
    """
    _check_operands(x, weight, A, B, scale, bias, dropout)
    _check_path(path, FORWARD_PATHS)
    return lora_forward_unchecked(x, weight, A, B, float(scale), bias, dropout, path=path)


def lora_forward_unchecked(x, weight, A, B, scale: float, bias=None, dropout=None, *, path: str | None = None):
    """:func:`lora_forward` for operands validated by the caller (the ops layer, once per public call)."""
    M, K = x.shape
    N, r = B.shape
    x = x.contiguous()
    scale = _dropout.lora_scale(scale, dropout)
    if path is None:
        path = choose_forward_path(M, N, K, x.device)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    xa = torch.empty((M, r), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, xa
    if path == "dequant_matmul":
        xa = _shrink(x, A.T, r, dropout)
        return _dequant_matmul(x, weight, True, xa, B.T, scale, bias), xa
    fuse_low = path == "fused_small_m" and r <= FUSED_RANK_MAX and FUSE_SHRINK_SMALL_M
    if not fuse_low:
        xa = _shrink(x, A.T, r, dropout)
    _matmul(x, weight, True, A.T, B.T, xa, fuse_low, bias, y, scale, path == "fused_small_m", dropout)
    return y, xa


def lora_backward(
    dy, x, weight, A, B, scale: float, xa, dropout=None, need_dx=True, need_dA=True, need_dB=True, *, path=None
):
    """Gradients of :func:`lora_forward` (bias gradient excluded: it is ``dy.sum(0)``).

    dy: (M, N) in x.dtype; xa: (M, r) fp32 from the forward. Returns (dx (M, K) x.dtype or None,
    dA (r, K) A.dtype or None, dB (N, r) B.dtype or None). ``dS = dy · B`` is computed once and reused for
    dA. ``path`` forces one of BACKWARD_PATHS (default: :func:`choose_backward_path`):

    * ``fused``: one kernel computes dX with W decoded tile by tile, never materialized (and dS in the
      same loop when M is small).
    * ``dequant``: W is dequantized into x.dtype, dX = dy · W on cuBLAS, then ``dX += s · dS · A``. The
      decoded W is transient but raises the peak memory by N·K·x.dtype.itemsize bytes (2·N·K in bf16,
      32 MiB for 4096 x 4096) while dX is computed. Nothing extra is saved by the forward.

    dA and dB are the same on both paths. Validates the operands, then runs :func:`lora_backward_unchecked`.
    """
    M, N, K, r = _check_operands(x, weight, A, B, scale, None, dropout)
    if not isinstance(dy, torch.Tensor) or tuple(dy.shape) != (M, N) or dy.dtype != x.dtype:
        raise ValueError(
            f"dy must be ({M}, {N}) in {x.dtype}, got {getattr(dy, 'shape', dy)} {getattr(dy, 'dtype', '')}"
        )
    if need_dB and (not isinstance(xa, torch.Tensor) or tuple(xa.shape) != (M, r) or xa.dtype != torch.float32):
        raise ValueError(f"xa must be the forward's fp32 ({M}, {r}) tensor, got {getattr(xa, 'shape', xa)}")
    for name, t in (("dy", dy), ("xa", xa)):
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    _check_path(path, BACKWARD_PATHS)
    return lora_backward_unchecked(dy, x, weight, A, B, float(scale), xa, dropout, need_dx, need_dA, need_dB, path=path)


def lora_backward_unchecked(
    dy, x, weight, A, B, scale: float, xa, dropout=None, need_dx=True, need_dA=True, need_dB=True, *, path=None
):
    """:func:`lora_backward` for operands validated by the caller (the ops layer, once per public call)."""
    M, K = x.shape
    N, r = B.shape
    x = x.contiguous()
    scale = _dropout.lora_scale(scale, dropout)
    if path is None:
        path = choose_backward_path(M, N, K, r, x.device)
    dy = dy.contiguous()
    dx = dA = dB = None
    if M == 0:
        return (
            torch.empty_like(x) if need_dx else None,
            torch.zeros_like(A) if need_dA else None,
            torch.zeros_like(B) if need_dB else None,
        )
    ds = None
    if need_dx and path == "dequant":
        if need_dA or scale != 0.0:
            ds = _shrink(dy, B, r)
        dx = _dequant_matmul(dy, weight, False, ds, A, scale, dropout=dropout)
    elif need_dx:
        small = choose_forward_path(M, N, K, x.device) == "fused_small_m"
        dx = torch.empty_like(x)
        fuse = small and r <= FUSED_RANK_MAX and FUSE_SHRINK_SMALL_M
        ds = torch.empty((M, r), dtype=torch.float32, device=x.device) if fuse else _shrink(dy, B, r)
        _matmul(dy, weight, False, B, A, ds, fuse, None, dx, scale, small, dropout)
    elif need_dA:
        ds = _shrink(dy, B, r)
    # The adapter gradients reduce over all M rows with fp32 operands (IEEE dots), as PEFT's fp32 LoRA
    # branch does: rounding dS / xa to bf16 put the bf16 dA outside the 2x-PyTorch-error bound on an H100
    # (M = 67 and 512). They cost ~2·r/N of the dX GEMM, so the precision is cheap.
    if need_dA:
        dA = _grad(ds, x, scale, A.dtype, torch.float32, dropout)
    if need_dB:
        dB = _grad(dy, xa, scale, B.dtype, torch.float32)
    return dx, dA, dB


def _grad(
    u: torch.Tensor, v: torch.Tensor, scale: float, out_dtype: torch.dtype, compute_dtype: torch.dtype, dropout=None
):
    """``s · uᵀ · (keep ⊙ v)`` for u (M, P), v (M, Q), reduced over M (split over programs when M is large)."""
    M, P = u.shape
    Q = v.shape[1]
    block_p = 64 if P > 32 else max(16, triton.next_power_of_2(P))
    block_q = 64 if Q > 32 else max(16, triton.next_power_of_2(Q))
    block_m = 64
    tiles = triton.cdiv(P, block_p) * triton.cdiv(Q, block_q)
    # Enough programs to fill a GPU (~2 waves of 132 SMs), each reducing at least 512 rows.
    split = 1 if u.device.type == "cpu" else max(1, min(triton.cdiv(264, tiles), M // 512))
    rows_per_split = triton.cdiv(triton.cdiv(M, split), block_m) * block_m
    split = triton.cdiv(M, rows_per_split)
    if split == 1:
        out = torch.empty((P, Q), dtype=out_dtype, device=u.device)
        strides = (0, *out.stride())
    else:
        out = torch.empty((split, P, Q), dtype=torch.float32, device=u.device)
        strides = out.stride()
    grid = (triton.cdiv(P, block_p), triton.cdiv(Q, block_q), split)
    tl_compute = getattr(tl, _TL_DTYPES[compute_dtype])
    with _nf4._device_context(u.device):
        _lora_grad_kernel[grid](
            u,
            v,
            out,
            M,
            P,
            Q,
            rows_per_split,
            scale,
            *_drop_args(dropout),
            *u.stride(),
            *v.stride(),
            *strides,
            COMPUTE_DTYPE=tl_compute,
            BLOCK_P=block_p,
            BLOCK_Q=block_q,
            BLOCK_M=block_m,
            DROPOUT=dropout is not None,
            **_dot_config(compute_dtype, u.device),
        )
    return out if split == 1 else out.sum(0).to(out_dtype)
