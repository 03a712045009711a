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
recomputes it, cheap while few programs share a row tile) or precomputed once by the split shrink
(``lora_reduce.py``, also the home of the dA / dB reductions) and read in the epilogue.

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

Forward paths (``FORWARD_PATHS``; the caller names one, ``lowrank.ops.dispatch.choose_forward_path``
chooses for the ops layer): ``fused_small_m`` (weight streamed and decoded in registers, shrink in the K
loop), ``fused_tiled`` (each weight tile decoded once per program feeding tl.dot, shrink precomputed),
``dequant_matmul`` (one-launch dequant + torch.matmul, then the LoRA term added with one addmm).

Backward paths (``BACKWARD_PATHS``; ``lowrank.ops.dispatch.choose_backward_path`` chooses for the ops
layer): ``fused`` (the dX kernel above, W decoded tile by tile) and ``dequant`` (the forward's
``dequant_matmul`` helper with t = n: W dequantized once into a transient, dX = dy · W on cuBLAS, then
``dX += s · dS · A``). dS, dA and dB are computed the same way on both paths.

Operand validation of the checked entry points lives in ``lora_checks.py``.
"""

from __future__ import annotations

import torch
from lowrank.kernels import dropout as _dropout
from lowrank.kernels import nf4 as _nf4
from lowrank.kernels.lora_checks import _check_backward_operands, _check_operands, _check_path
from lowrank.kernels.lora_reduce import FUSED_RANK_MAX, _block_r, _dot_config, _drop_args, _grad, _shrink

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

if HAS_TRITON:
    from lowrank.kernels.lora_reduce import _lora_mma, _lora_round

# ----------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------

FORWARD_PATHS = ("fused_small_m", "fused_tiled", "dequant_matmul")
BACKWARD_PATHS = ("fused", "dequant")
#: Largest M whose fused dX (backward path ``fused``) runs the small-M tile configuration (the one of the
#: forward's ``fused_small_m``); above it, the tiled one. Equal to the forward's ``fused_small_m`` bound
#: (``lowrank.ops.dispatch.SMALL_M_MAX``); both are to be measured on GPU.
FUSED_DX_SMALL_M_MAX = 64
#: Largest row tile of the small-M kernel (see _tile_config).
SMALL_BLOCK_M_MAX = 32
#: Whether the small-M kernels accumulate the shrink (xa, dS) in their own loop (one launch; every
#: column tile recomputes it) instead of a split shrink launch before them. To be measured on GPU.
FUSE_SHRINK_SMALL_M = True


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
    def _lora_load_weight_tile(
        w_ptr,  # dense W, or uint8 packed codes of the flattened W
        absmax_ptr,  # fp32 [nb], or uint8 [nb] codes (DOUBLE_QUANT)
        nested_absmax_ptr,  # fp32 [ceil(nb / 256)] (DOUBLE_QUANT)
        nested_offset_ptr,  # fp32 [1] (DOUBLE_QUANT)
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
                nested_absmax_ptr,
                nested_offset_ptr,
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
        nested_absmax_ptr,
        nested_offset_ptr,
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
            nested_absmax_ptr,
            nested_offset_ptr,
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
        nested_absmax_ptr,
        nested_offset_ptr,
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
                            nested_absmax_ptr,
                            nested_offset_ptr,
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
                        nested_absmax_ptr,
                        nested_offset_ptr,
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
                    nested_absmax_ptr,
                    nested_offset_ptr,
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


# ----------------------------------------------------------------------------------------------------
# Launchers: validate (lora_checks.py), allocate, grid, launch.
# ----------------------------------------------------------------------------------------------------


def _is_quantized(weight) -> bool:
    return not isinstance(weight, torch.Tensor)


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


def lora_forward(x, weight, A, B, scale: float, bias=None, dropout=None, *, path: str):
    """``y = x · dequant(W)ᵀ + b + s · (x_lora · Aᵀ) · Bᵀ`` and ``xa = x_lora · Aᵀ``.

    x: (M, K); weight: dense (N, K) tensor or an :class:`~lowrank.nf4_format.NF4Weight`; A: (r, K);
    B: (N, r); bias: (N,) or None; dropout: a :class:`~lowrank.kernels.dropout.Dropout` or None (x_lora =
    keep ⊙ x, s = scale / (1 - p); else x_lora = x, s = scale). Returns y (M, N) in x.dtype and xa (M, r)
    fp32. ``path``: one of FORWARD_PATHS (required: the launchers do not choose; the ops layer asks
    ``lowrank.ops.dispatch.choose_forward_path``). Validates the operands, then runs
    :func:`lora_forward_unchecked`.
    """
    _check_operands(x, weight, A, B, scale, bias, dropout)
    _check_path(path, FORWARD_PATHS)
    return lora_forward_unchecked(x, weight, A, B, float(scale), bias, dropout, path=path)


def lora_forward_unchecked(x, weight, A, B, scale: float, bias=None, dropout=None, *, path: str):
    """:func:`lora_forward` for operands validated by the caller (the ops layer, once per public call)."""
    M, K = x.shape
    N, r = B.shape
    x = x.contiguous()
    scale = _dropout.lora_scale(scale, dropout)
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
    dy, x, weight, A, B, scale: float, xa, dropout=None, need_dx=True, need_dA=True, need_dB=True, *, path: str
):
    """Gradients of :func:`lora_forward` (bias gradient excluded: it is ``dy.sum(0)``).

    dy: (M, N) in x.dtype; xa: (M, r) fp32 from the forward. Returns (dx (M, K) x.dtype or None,
    dA (r, K) A.dtype or None, dB (N, r) B.dtype or None). ``dS = dy · B`` is computed once and reused for
    dA. ``path``: one of BACKWARD_PATHS (required; the ops layer asks
    ``lowrank.ops.dispatch.choose_backward_path``):

    * ``fused``: one kernel computes dX with W decoded tile by tile, never materialized (and dS in the
      same loop when M is small).
    * ``dequant``: W is dequantized into x.dtype, dX = dy · W on cuBLAS, then ``dX += s · dS · A``. The
      decoded W is transient but raises the peak memory by N·K·x.dtype.itemsize bytes (2·N·K in bf16,
      32 MiB for 4096 x 4096) while dX is computed. Nothing extra is saved by the forward.

    dA and dB are the same on both paths. Validates the operands, then runs :func:`lora_backward_unchecked`.
    """
    M, N, K, r = _check_operands(x, weight, A, B, scale, None, dropout)
    _check_backward_operands(dy, xa, M, N, r, x, need_dB)
    _check_path(path, BACKWARD_PATHS)
    return lora_backward_unchecked(dy, x, weight, A, B, float(scale), xa, dropout, need_dx, need_dA, need_dB, path=path)


def lora_backward_unchecked(
    dy, x, weight, A, B, scale: float, xa, dropout=None, need_dx=True, need_dA=True, need_dB=True, *, path: str
):
    """:func:`lora_backward` for operands validated by the caller (the ops layer, once per public call)."""
    M, K = x.shape
    N, r = B.shape
    x = x.contiguous()
    scale = _dropout.lora_scale(scale, dropout)
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
        small = M <= FUSED_DX_SMALL_M_MAX
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
