"""Counter-based dropout keep-masks: one bit per element from (seed, element index), never stored.

Math (``lowrank-hash32``, the same bits in the torch reference, Triton, C++ and CUDA)
-------------------------------------------------------------------------------------
``fmix32`` is MurmurHash3's 32-bit finalizer, a bijection of uint32 with full avalanche::

    fmix32(h): h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16   (mod 2^32)

Key (once per call, from the 64-bit seed taken mod 2^64: ``s_lo``, ``s_hi`` its two 32-bit words)::

    key0 = fmix32(s_lo ^ 0x243F6A88),  key1 = fmix32(s_hi ^ 0x85A308D3 ^ key0)

Element ``e`` (int64, see "index layout"; ``e_lo``, ``e_hi`` its two 32-bit words)::

    h = fmix32(fmix32(e_lo ^ key0) ^ e_hi ^ key1)
    keep(e) = h >= threshold,  threshold = floor(p · 2^32)   (p in [0, 1): 0 <= threshold < 2^32)

so P(keep) = 1 - threshold / 2^32 = 1 - p to within 2^-32. Kept elements are scaled by 1 / (1 - p).

Index layout: the mask of an (M, K) LoRA input x (leading batch dims flattened) gives element (m, k) the
index ``e = m · K + k`` -- its position in the contiguous (M, K) tensor. Projection ``i`` of a
multi-projection op uses seed ``seed + i``. A row chunk ``[m0, m0 + rows)`` is the same mask with
``row_offset = m0``, so kernels that tile M (or the torch backend's row chunks) regenerate exactly the
bits of the whole mask.

Why counter-based: the bit of any element is a pure function of (seed, e), so the forward and the
backward regenerate it where they read x (no (M, K) mask or ``x · mask`` is kept between them), every
tile computes its own bits independently of launch order and grid, and a CPU run and a GPU run drop the
same elements. Cost: four 32-bit multiplies and eight shift/xor per element, in registers; no state.
uint32 arithmetic everywhere except the torch reference, which emulates it in int64 (products split in
16-bit halves of the constant so nothing overflows).

Bytes moved: none of its own -- the bit is computed in the kernel that already reads x (or writes the
low-rank term of dx). The standalone :func:`dropout_mask` / :func:`apply_dropout_` launchers (tests,
the dequant dX path) read/write the tensor once.

This file holds the constants, the pure-torch reference (:func:`dropout_keep_ref`,
:func:`dropout_mask_ref`), the ``@triton.jit`` helper :func:`dropout_keep` used by ``lora_matmul.py``,
and two launchers.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# ----------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------

MASK32 = 0xFFFFFFFF
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
KEY_SALT0 = 0x243F6A88  # pi's first fraction bits: any fixed odd-looking constant works
KEY_SALT1 = 0x85A308D3
#: Rows of a chunk in the torch reference: the int64 temporaries of one chunk stay near 8 MiB.
REF_CHUNK_ELEMENTS = 1 << 20


def check_p(p) -> float:
    """``p`` as a float in [0, 1), or a ValueError naming it."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(float(p)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {p!r}")
    return float(p)


def fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finalizer on a Python int (host-side key derivation)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * FMIX_C1) & MASK32
    h ^= h >> 13
    h = (h * FMIX_C2) & MASK32
    h ^= h >> 16
    return h


class Dropout(NamedTuple):
    """Dropout of the LoRA input with probability ``p`` and mask seed ``seed`` (any int, taken mod 2^64)."""

    p: float
    seed: int

    @staticmethod
    def of(p, seed) -> Dropout | None:
        """A validated Dropout, or None when ``p`` is 0 (no dropout)."""
        p = check_p(p)
        if p == 0.0:
            return None
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"dropout seed must be an int, got {type(seed).__name__}")
        return Dropout(p, seed)

    @property
    def keys(self) -> tuple[int, int]:
        """(key0, key1): the two uint32 words of the key derived from the seed."""
        s = self.seed % (1 << 64)
        key0 = fmix32((s & MASK32) ^ KEY_SALT0)
        key1 = fmix32((s >> 32) ^ KEY_SALT1 ^ key0)
        return key0, key1

    @property
    def threshold(self) -> int:
        """floor(p · 2^32): an element is kept when its hash is >= this."""
        return int(self.p * 4294967296.0)

    @property
    def scale(self) -> float:
        """The factor of kept elements, 1 / (1 - p)."""
        return 1.0 / (1.0 - self.p)

    @property
    def seed_int64(self) -> int:
        """The seed as a signed int64 with the same 64 bits (what the C++ schema takes)."""
        s = self.seed % (1 << 64)
        return s - (1 << 64) if s >= 1 << 63 else s

    def kernel_args(self) -> tuple[int, int, int]:
        """(key0, key1, threshold) as int32 bit patterns (Triton scalars are typed by value)."""
        return tuple(v - (1 << 32) if v >= 1 << 31 else v for v in (*self.keys, self.threshold))

    def shifted(self, index: int) -> Dropout:
        """The dropout of projection ``index`` of a multi-projection op (seed + index)."""
        return Dropout(self.p, self.seed + index)


# ----------------------------------------------------------------------------------------------------
# Pure-torch reference (int64 tensors emulate uint32)
# ----------------------------------------------------------------------------------------------------


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h · c) mod 2^32 for h int64 in [0, 2^32): the constant split in 16-bit halves, no int64 overflow."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def _fmix32_ref(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def dropout_keep_ref(index: torch.Tensor, dropout: Dropout) -> torch.Tensor:
    """Bool keep-bits of the elements with int64 indices ``index`` (any shape, any device)."""
    key0, key1 = dropout.keys
    index = index.to(torch.int64)
    lo, hi = index & MASK32, (index >> 32) & MASK32
    h = _fmix32_ref(_fmix32_ref(lo ^ key0) ^ hi ^ key1)
    return h >= dropout.threshold


def dropout_mask_ref(
    rows: int, cols: int, dropout: Dropout, row_offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Rows ``[row_offset, row_offset + rows)`` of the (·, cols) keep-mask: bool (rows, cols)."""
    _check_extent(rows, cols, row_offset)
    first = row_offset * cols
    index = torch.arange(first, first + rows * cols, dtype=torch.int64, device=device)
    return dropout_keep_ref(index, dropout).reshape(rows, cols)


def masked_rows_ref(t: torch.Tensor, dropout: Dropout, row_offset: int = 0, dtype=None) -> torch.Tensor:
    """``t · keep`` (0/1, not scaled) for a 2-D ``t`` whose rows start at mask row ``row_offset``."""
    keep = dropout_mask_ref(t.shape[0], t.shape[1], dropout, row_offset, t.device)
    out = t if dtype is None else t.to(dtype)
    return out.masked_fill(~keep, 0)


def lora_scale(scale: float, dropout: Dropout | None) -> float:
    """The LoRA scale with the kept elements' 1 / (1 - p) folded in (one rounding: scale / (1 - p))."""
    return scale if dropout is None else scale / (1.0 - dropout.p)


def ref_chunk_rows(cols: int) -> int:
    """Rows per chunk when the torch reference builds a mask piece by piece."""
    return max(1, REF_CHUNK_ELEMENTS // max(1, cols))


def _check_extent(rows: int, cols: int, row_offset: int) -> None:
    for name, v in (("rows", rows), ("cols", cols), ("row_offset", row_offset)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if (row_offset + rows) * cols >= 1 << 63:
        raise ValueError(f"mask index out of int64 range: ({row_offset} + {rows}) * {cols}")


# ----------------------------------------------------------------------------------------------------
# Triton: the jit helper (used by lora_matmul.py) and a standalone kernel
# ----------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _fmix32(h):
        h ^= h >> 16
        h *= tl.full((), FMIX_C1, tl.uint32)
        h ^= h >> 13
        h *= tl.full((), FMIX_C2, tl.uint32)
        h ^= h >> 16
        return h

    @triton.jit
    def dropout_keep(index, key0, key1, threshold):
        """Keep-bits (int1) of int64 element indices ``index``; key0/key1/threshold are int32 bit patterns."""
        lo = (index & 0xFFFFFFFF).to(tl.uint32)
        hi = ((index >> 32) & 0xFFFFFFFF).to(tl.uint32)
        k0 = tl.cast(key0, tl.int32).to(tl.uint32, bitcast=True)
        k1 = tl.cast(key1, tl.int32).to(tl.uint32, bitcast=True)
        th = tl.cast(threshold, tl.int32).to(tl.uint32, bitcast=True)
        h = _fmix32(_fmix32(lo ^ k0) ^ hi ^ k1)
        return h >= th

    @triton.jit
    def _dropout_kernel(
        t_ptr,  # [rows, cols] contiguous: zeroed where dropped (APPLY), else unused
        mask_ptr,  # uint8 [rows, cols]: the keep-bits (WRITE_MASK)
        rows,
        cols,
        row_offset,
        key0,
        key1,
        threshold,
        BLOCK: tl.constexpr,
        APPLY: tl.constexpr,
        WRITE_MASK: tl.constexpr,
    ):
        # tl.cast, not .to: an int argument equal to 1 may arrive as a constexpr
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        ok = offs < tl.cast(rows, tl.int64) * cols
        keep = dropout_keep(tl.cast(row_offset, tl.int64) * cols + offs, key0, key1, threshold)
        if WRITE_MASK:
            tl.store(mask_ptr + offs, keep.to(tl.uint8), mask=ok)
        if APPLY:
            v = tl.load(t_ptr + offs, mask=ok, other=0.0)
            tl.store(t_ptr + offs, tl.where(keep, v, tl.zeros_like(v)), mask=ok)


def _launch(t: torch.Tensor | None, mask: torch.Tensor | None, rows, cols, row_offset, dropout: Dropout) -> None:
    if not HAS_TRITON:
        raise RuntimeError("the dropout Triton kernels need triton, which is not installed")
    ref = t if t is not None else mask
    if ref.device.type not in ("cuda", "cpu"):  # CPU tensors run in the interpreter (lowrank.ops.dispatch checks)
        raise RuntimeError(f"the dropout kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {ref.device}")
    if rows * cols == 0:
        return
    block = 1024
    grid = (triton.cdiv(rows * cols, block),)
    with _device_context(ref.device):
        _dropout_kernel[grid](
            t if t is not None else mask,
            mask if mask is not None else t,
            rows,
            cols,
            row_offset,
            *dropout.kernel_args(),
            BLOCK=block,
            APPLY=t is not None,
            WRITE_MASK=mask is not None,
        )


def _device_context(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dropout_mask(
    rows: int, cols: int, dropout: Dropout, row_offset: int = 0, device: torch.device | str = "cuda"
) -> torch.Tensor:
    """Triton: the bool (rows, cols) keep-mask, bit for bit :func:`dropout_mask_ref`."""
    _check_extent(rows, cols, row_offset)
    mask = torch.empty((rows, cols), dtype=torch.uint8, device=device)
    _launch(None, mask, rows, cols, row_offset, dropout)
    return mask.bool()


def apply_dropout_(t: torch.Tensor, dropout: Dropout, row_offset: int = 0) -> torch.Tensor:
    """Triton, in place: zero the dropped elements of a contiguous 2-D ``t`` (no 1/(1-p) scaling)."""
    if t.dim() != 2 or not t.is_contiguous():
        raise ValueError(f"t must be a contiguous 2-D tensor, got shape {tuple(t.shape)} strides {t.stride()}")
    _check_extent(t.shape[0], t.shape[1], row_offset)
    _launch(t, None, t.shape[0], t.shape[1], row_offset, dropout)
    return t
