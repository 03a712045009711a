"""Rank-r reductions of the LoRA matmul: the split shrink and the adapter gradients.

Math (``A``: r x K, ``B``: N x r, ``s`` the LoRA scale, ``keep`` the dropout mask of ``dropout.py``)
------------------------------------------------------------------------------------------------------
shrink    low = (keep ⊙ lin) · P     lin: M x T in x.dtype, P: T x r, low: M x r fp32
          forward: lin = x, P = Aᵀ (low = xa); backward: lin = dy, P = B, no mask (low = dS)
grad      out = s · uᵀ · (keep ⊙ v)  u: M x P, v: M x Q, out: P x Q, reduced over the M rows
          dA = s · dSᵀ · x_lora (u = dS, v = x, masked); dB = s · dyᵀ · xa (u = dy, v = xa)

Both reductions are split over programs where one reduction axis is long (T for the shrink, M for the
gradients) so that about two waves of programs run on a 132-SM GPU: each program writes an fp32 partial
sum and one ``sum(0)`` adds them afterwards, in a fixed order (deterministic). The dropout bits are
generated in registers where a kernel reads x; no mask exists in memory.

Precision: the shrink runs on x.dtype operands (P rounded to x.dtype as a dot operand) with fp32
accumulation. The gradient kernel rounds both operands to ``compute_dtype`` (the backward passes fp32:
IEEE fp32 dots, never TF32) and accumulates in fp32; the result is rounded once to the gradient's dtype.
Under the Triton interpreter bf16 dot operands are upcast to fp32 (triton 3.9's interpreter returns
garbage for bf16 ``tl.dot``) and bf16 rounding is done on the bits (its fp32 -> bf16 cast truncates).

The helpers ``_lora_mma``, ``_lora_round`` and ``_dot_config`` are shared with the GEMM kernel in
``lora_matmul.py`` (which launches these reductions around it).

Bytes moved (M x K = 16 x 4096 x bf16, N = 4096, r = 16): the shrink reads lin once (M·T·2 B = 131 kB) and
P (T·r·4 B = 262 kB fp32 adapters) from L2 per row tile, writes split·M·r·4 B of partials. dB reads dy
(M·N·2 B) and xa (M·r·4 B) once and writes N·r elements; dA reads dS (M·r·4 B) and x (M·K·2 B) once
and writes r·K elements: ~2·r/N of the bytes of the dX GEMM.
"""

from __future__ import annotations

import torch
from lowrank.kernels import dropout as _dropout
from lowrank.kernels import nf4 as _nf4

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

#: Largest rank whose shrink is accumulated inside the GEMM's main loop (its accumulator lives in
#: registers); also the widest rank chunk (BLOCK_R) of one program of the split shrink and of the GEMM's
#: epilogue.
FUSED_RANK_MAX = 64
#: Smallest reduction length one program of the split shrink (x·Aᵀ, dy·B) handles.
SHRINK_MIN_T_PER_SPLIT = 256
#: Same for the rows of one program's share of a dA / dB reduction over M.
GRAD_MIN_ROWS_PER_SPLIT = 512


def _interpreting(device: torch.device) -> bool:
    # Triton runs CPU tensors only in its interpreter (the dispatch point checks that it is on), so the
    # device says which numerics apply; nothing here reads the environment.
    return device.type == "cpu"


# ----------------------------------------------------------------------------------------------------
# Triton kernels (and the jit helpers shared with lora_matmul.py)
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
# Launchers
# ----------------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _dot_config(dtype: torch.dtype, device: torch.device) -> dict:
    """DOT_DTYPE / DOT_FP32 for inputs of ``dtype`` (bf16 is upcast under the interpreter)."""
    interpreting = _interpreting(device)
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting):
        return {"DOT_DTYPE": tl.float32, "DOT_FP32": True, "ROUND_BY_BITS": interpreting}
    return {"DOT_DTYPE": getattr(tl, _TL_DTYPES[dtype]), "DOT_FP32": False, "ROUND_BY_BITS": interpreting}


def _block_r(r: int) -> int:
    return max(16, min(triton.next_power_of_2(r), FUSED_RANK_MAX))


def _shrink(lin: torch.Tensor, p: torch.Tensor, r: int, dropout=None) -> torch.Tensor:
    """``(keep ⊙ lin) · p`` for lin (M, T) in x.dtype and p a (T, r) view; fp32 (M, r). keep = 1 without dropout."""
    M, T = lin.shape
    block_r, block_t = _block_r(r), 64
    block_m = 64 if M > 32 else max(16, triton.next_power_of_2(M))
    tiles = triton.cdiv(M, block_m) * triton.cdiv(r, block_r)
    # The long T reduction is split deterministically: fp32 partials, then one sum.
    split, t_per_split = _reduction_split(T, tiles, block_t, SHRINK_MIN_T_PER_SPLIT)
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


def _reduction_split(length: int, tiles: int, block: int, min_per_split: int, split_allowed: bool = True):
    """``(splits, length per split)`` for a reduction over ``length`` on ``tiles`` output tiles: enough
    programs for about two waves on a 132-SM GPU, each reducing a multiple of ``block`` and at least
    ``min_per_split`` (one split when ``split_allowed`` is false)."""
    split = max(1, min(triton.cdiv(2 * 132, tiles), length // min_per_split)) if split_allowed else 1
    per_split = triton.cdiv(triton.cdiv(length, split), block) * block
    return triton.cdiv(length, per_split), per_split


def _drop_args(dropout) -> tuple[int, int, int]:
    return (0, 0, 0) if dropout is None else dropout.kernel_args()


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
    # Not split on CPU (the interpreter gains nothing from more programs).
    split, rows_per_split = _reduction_split(M, tiles, block_m, GRAD_MIN_ROWS_PER_SPLIT, u.device.type != "cpu")
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
