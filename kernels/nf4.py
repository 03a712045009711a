"""NF4 / FP4 blockwise 4-bit quantization and double quantization, bit-exact with bitsandbytes' format.

Format (tables and checks: ``lowrank.nf4_format``; docs/nf4.md describes bitsandbytes' format; the facts the
kernels rely on are restated here)
------------------------------------------------------------------------------------------------------------
* A tensor of ``n`` elements is flattened in row-major (C) order and cut into blocks of ``blocksize``
  consecutive elements (32 ... 4096, a power of two). The last block may be partial; only its valid
  elements take part.
* Per block: ``absmax = max |x|`` (fp32), ``s = x * (1 / max(absmax, 1e-38))`` (an IEEE reciprocal, then
  a multiply; the clamp is bitsandbytes' and only matters for all-zero or subnormal blocks),
  ``code = #{thresholds t : t < s}`` where the thresholds are the 15 fp32 midpoints of the sorted code
  table -- so a value exactly on a threshold takes the LOWER code.
* Two codes per byte, the first element in the HIGH nibble: ``byte[i] = code[2i] << 4 | code[2i+1]``;
  an odd ``n`` pads the last low nibble with the code of 0.0 (7 for NF4, 0 for FP4). Packed shape
  ``((n + 1) // 2, 1)``, uint8.
* Dequantize: ``out = T(table[code] * absmax[block])`` -- the product in fp32, then ONE cast to T.
* All-zero block: ``absmax = 0``, every code is the code of 0.0, and dequantization gives +0.0 --
  never NaN. (bitsandbytes' CUDA kernels compute 0 * inf = NaN there and store code 0 / -1.0; its CPU
  path stores 1e-38 for an all-zero *partial* last block and divides instead of multiplying by the
  reciprocal in any partial last block. We use one rule for every block.)

Double quantization (``compress_statistics`` in bitsandbytes)
-------------------------------------------------------------
``nested_offset = mean(absmax)`` (``torch.mean``, fp32); ``c = absmax - nested_offset`` is quantized in
blocks of 256 with the signed 8-bit dynamic map: ``nested_absmax = max |c|`` per 256-block,
``s = clamp(c * (1/nested_absmax), -1, 1)`` and the code is the exact-nearest map entry (ties go to the
lower code; an all-zero block gives the code of 0.0). Reconstruction:
``absmax = fp32(dyn[q] * nested_absmax[i // 256]) + nested_offset`` -- two roundings, never a fused
multiply-add. A state whose ``nested_dtype`` is bf16/fp16 (transformers writes ``"nested_dtype":
"bfloat16"``) is reconstructed the way bitsandbytes does it: ``T(T(dyn[q] * nested_absmax) +
T(nested_offset))`` with every T-rounding to nearest even, then widened to fp32.
(bitsandbytes >= 0.50 on CPU picks nested codes through an approximate 65,536-bin lookup table that
differs from exact nearest in ~0.3 % of entries; ``double_quantize_ref(..., rounding="bnb_cpu_lut")``
reproduces it for oracle tests. Its CUDA kernel is exact nearest, like ours.)

Bytes moved (per weight element, blocksize 64, double quantization)
-------------------------------------------------------------------
dequantize to bf16: read 0.5 B packed + 1/64 B code + 4/(64*256) B nested_absmax = 0.516 B, write 2 B ->
2.516 B/element: 4096x14336 moves 147.7 MB, 44 us at 3.35 TB/s. quantize from bf16: read 2 B, write
0.516 B.

This file holds the pure-torch references (``*_ref``), the Triton kernels and their launchers; the
constants, code tables and checks are ``lowrank.nf4_format``'s. Autograd, dispatch and the public API
live in ``lowrank.ops`` / ``lowrank.nf4``.
"""

from __future__ import annotations

import torch

try:  # Triton has no wheels for some platforms (macOS, Windows); the references work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# The format (tables, checks) lives in lowrank.nf4_format, which imports no Triton; its names are also
# reachable here so that code calling the kernels needs one module.
from lowrank.nf4_format import (  # noqa: F401
    BLOCKSIZES,
    FLOAT_DTYPES,
    FP4_CODE,
    NESTED_BLOCKSIZE,
    NESTED_DTYPES,
    NESTED_RECIPROCAL_FLOOR,
    NF4_CODE,
    QUANT_TYPES,
    RECIPROCAL_FLOOR,
    ZERO_CODE,
    _dynamic_map_cpu,
    _dynamic_midpoints_cpu,
    _sorted_table,
    check_absmax_for_double_quant,
    check_blocksize,
    check_dequantize_args,
    check_dequantize_out,
    check_float_input,
    check_nested_args,
    check_quant_type,
    code_table,
    dynamic_map,
    num_blocks,
    packed_shape,
    sorted_codes,
    thresholds,
)

# ----------------------------------------------------------------------------------------------------
# Pure-torch references. They define the numerics; the kernels must match them bit for bit.
# ----------------------------------------------------------------------------------------------------


def quantize_4bit_ref(
    x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization of ``x`` (any shape; fp32/fp16/bf16).

    Returns ``(packed, absmax)``: packed uint8 of shape ``((n + 1) // 2, 1)`` and fp32 absmax of shape
    ``[ceil(n / blocksize)]``.
    """
    check_float_input(x)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    flat = x.reshape(-1).float()  # reshape copies a non-contiguous input in logical (row-major) order
    n = flat.numel()
    nb = num_blocks(n, blocksize)
    blocks = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # The clamp keeps 1/absmax finite: an all-zero block scales 0 by 1e38 (code of 0.0, never NaN).
    inv = 1.0 / absmax.clamp(min=RECIPROCAL_FLOOR)
    scaled = (blocks * inv[:, None]).clamp_(-1.0, 1.0).reshape(-1)[:n]
    values, mids, codes_of_sorted = _sorted_table(quant_type)
    position = torch.bucketize(scaled, mids.to(scaled.device))  # right=False: ties go to the lower code
    codes = codes_of_sorted.to(scaled.device)[position]
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), ZERO_CODE[quant_type])])
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.view(-1, 1), absmax


def dequantize_4bit_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
    blocksize: int = 64,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit_ref`: ``dtype(table[code] * absmax[block])``, reshaped to ``shape``.

    ``absmax`` is fp32 ``[ceil(n / blocksize)]`` (reconstruct double-quantized constants first with
    :func:`double_dequantize_ref`).
    """
    n = check_dequantize_args(packed, absmax, None, None, shape, dtype, blocksize, quant_type)
    nibbles = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 0xF], dim=1).reshape(-1)[:n]
    table = code_table(quant_type, packed.device)
    # repeat_interleave rather than absmax[arange(n) // blocksize]: torch.compile (Inductor, CPU, torch 2.13)
    # reads garbage for that gather in a partial last block (tests/kernels/test_nf4.py has the check).
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (table[nibbles.long()] * scale).to(dtype).reshape(shape)


def double_quantize_ref(
    absmax: torch.Tensor, rounding: str = "nearest"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize fp32 block constants with the signed dynamic map in 256-blocks around their mean.

    Returns ``(qabsmax uint8 [nb], nested_absmax fp32 [ceil(nb/256)], nested_offset fp32 0-dim)``.
    ``rounding="nearest"`` is our format (exact nearest code, ties to the lower code);
    ``"bnb_cpu_lut"`` mimics bitsandbytes >= 0.50's CPU lookup table, for oracle tests only.
    """
    check_absmax_for_double_quant(absmax)
    nested_offset = absmax.mean()
    centred = absmax - nested_offset
    nb = centred.numel()
    n2 = num_blocks(nb, NESTED_BLOCKSIZE)
    blocks = torch.nn.functional.pad(centred, (0, n2 * NESTED_BLOCKSIZE - nb)).view(n2, NESTED_BLOCKSIZE)
    nested_absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / nested_absmax.clamp(min=NESTED_RECIPROCAL_FLOOR)
    scaled = (blocks * inv[:, None]).clamp_(-1.0, 1.0).reshape(-1)[:nb]
    if rounding == "nearest":
        codes = torch.bucketize(scaled, _dynamic_midpoints_cpu().to(scaled.device))
    elif rounding == "bnb_cpu_lut":
        codes = _bnb_cpu_lut_codes(scaled, nested_absmax)
    else:
        raise ValueError(f"rounding must be 'nearest' or 'bnb_cpu_lut', got {rounding!r}")
    return codes.to(torch.uint8), nested_absmax, nested_offset


def _bnb_cpu_lut_codes(scaled: torch.Tensor, nested_absmax: torch.Tensor) -> torch.Tensor:
    # bitsandbytes >= 0.50 CPU: idx = uint16((s + 1) * 0.5 * 65535 + 0.5), code = #{midpoints < -1 + 2 idx / 65535};
    # an all-zero 256-block gets code 0.
    grid = -1.0 + 2.0 * torch.arange(65536, dtype=torch.float32) / 65535.0
    lut = torch.searchsorted(_dynamic_midpoints_cpu(), grid, right=False)
    idx = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64).clamp_(0, 65535)
    codes = lut.to(scaled.device)[idx]
    zero_block = (nested_absmax == 0).repeat_interleave(NESTED_BLOCKSIZE)[: scaled.numel()]
    return torch.where(zero_block, torch.zeros_like(codes), codes)


def double_dequantize_ref(
    qabsmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_offset: torch.Tensor,
    nested_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reconstruct fp32 block constants ``[nb]``: ``fp32(dyn[q] * nested_absmax[i // 256]) + nested_offset``
    (two roundings).

    With ``nested_dtype`` bf16/fp16 the product, the nested offset and the sum are each rounded to that dtype,
    as bitsandbytes does for a state that names it (``T(T(product) + T(nested_offset))``, widened to fp32).
    """
    check_nested_args(qabsmax, nested_absmax, nested_offset, nested_dtype)
    # repeat_interleave, not a gather by arange // 256: see dequantize_4bit_ref
    scale = nested_absmax.reshape(-1).repeat_interleave(NESTED_BLOCKSIZE)[: qabsmax.numel()]
    product = dynamic_map(qabsmax.device)[qabsmax.reshape(-1).long()] * scale
    if nested_dtype == torch.float32:
        return product + nested_offset.reshape(())
    return (product.to(nested_dtype) + nested_offset.reshape(()).to(nested_dtype)).float()


# ----------------------------------------------------------------------------------------------------
# Triton kernels.
# ----------------------------------------------------------------------------------------------------

if HAS_TRITON:
    # Triton kernels may only read globals that are constexpr.
    _RECIPROCAL_FLOOR = tl.constexpr(RECIPROCAL_FLOOR)
    _NESTED_RECIPROCAL_FLOOR = tl.constexpr(NESTED_RECIPROCAL_FLOOR)

    @triton.jit
    def _round_to_bf16(x):
        # fp32 -> the nearest bf16 value (ties to even), still held in fp32, by integer arithmetic on the
        # bits (finite inputs). The interpreter's own fp32 -> bf16 cast truncates; the GPU cast is exact.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return ((bits >> 16) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _code_of(
        scaled,  # fp32 values in [-1, 1]
        thresholds_ptr,  # fp32 [15] sorted decision thresholds
        sorted_code_ptr,  # uint8 [16] code of each sorted table position
        IDENTITY_CODES: tl.constexpr,  # True for NF4 (its table is already sorted)
    ):
        # code position = number of thresholds strictly below the value: ties go to the lower code.
        position = tl.zeros(scaled.shape, dtype=tl.int32)
        for k in tl.static_range(15):
            position += (scaled > tl.load(thresholds_ptr + k)).to(tl.int32)
        if not IDENTITY_CODES:
            position = tl.load(sorted_code_ptr + position).to(tl.int32)
        return position

    @triton.jit
    def _quantize_4bit_kernel(
        x_ptr,  # fp32/fp16/bf16 [n], contiguous (flattened row-major)
        packed_ptr,  # uint8 [(n + 1) // 2]
        absmax_ptr,  # fp32 [ceil(n / BLOCKSIZE)]
        thresholds_ptr,  # fp32 [15]
        sorted_code_ptr,  # uint8 [16]
        n,  # number of elements
        BLOCKSIZE: tl.constexpr,  # quantization block
        BLOCKS_PER_PROGRAM: tl.constexpr,  # quantization blocks handled by one program
        IDENTITY_CODES: tl.constexpr,
    ):
        first_block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM
        block = first_block + tl.arange(0, BLOCKS_PER_PROGRAM)
        # elements as [block, pair, 2]: the pair axis is what one output byte holds
        pair = tl.arange(0, BLOCKSIZE // 2)
        even = block[:, None] * BLOCKSIZE + 2 * pair[None, :]
        odd = even + 1
        # Padding reads 0.0, which neither changes the block's absmax nor the code of 0.0 in the pad nibble.
        x_even = tl.load(x_ptr + even, mask=even < n, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + odd, mask=odd < n, other=0.0).to(tl.float32)
        absmax = tl.maximum(tl.max(tl.abs(x_even), axis=1), tl.max(tl.abs(x_odd), axis=1))
        # IEEE reciprocal of the clamped absmax, then a multiply (bitsandbytes' order and clamp). An
        # all-zero block scales by 1 explicitly, so a GPU that flushes the subnormal floor to zero still
        # never computes 0 * inf.
        floor = tl.full(absmax.shape, _RECIPROCAL_FLOOR, tl.float32)
        inv = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, floor))
        inv = tl.where(absmax > 0, inv, 1.0)
        s_even = tl.minimum(tl.maximum(x_even * inv[:, None], -1.0), 1.0)
        s_odd = tl.minimum(tl.maximum(x_odd * inv[:, None], -1.0), 1.0)
        hi = _code_of(s_even, thresholds_ptr, sorted_code_ptr, IDENTITY_CODES)
        lo = _code_of(s_odd, thresholds_ptr, sorted_code_ptr, IDENTITY_CODES)
        byte = ((hi << 4) | lo).to(tl.uint8)
        byte_index = block[:, None] * (BLOCKSIZE // 2) + pair[None, :]
        tl.store(packed_ptr + byte_index, byte, mask=even < n)
        tl.store(absmax_ptr + block, absmax, mask=block * BLOCKSIZE < n)

    @triton.jit
    def _block_constant(
        block,  # int64 block indices
        mask,
        absmax_ptr,  # fp32 [nb], or uint8 [nb] codes when DOUBLE_QUANT
        nested_absmax_ptr,  # fp32 [ceil(nb / 256)]
        nested_offset_ptr,  # fp32 [1]
        dynamic_map_ptr,  # fp32 [256]
        DOUBLE_QUANT: tl.constexpr,
        NESTED_KIND: tl.constexpr,  # rounding of the reconstruction: 0 fp32, 1 bf16, 2 fp16
    ):
        # One return at the end: the compiler type-checks every return, even in a dead constexpr branch.
        if DOUBLE_QUANT:
            code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
            product = tl.load(dynamic_map_ptr + code) * scale
            nested_offset = tl.load(nested_offset_ptr)
            # Two roundings (product, then sum): the launcher disables FMA contraction. A bf16/fp16
            # nested state rounds the product, the nested offset and the sum to that dtype (bitsandbytes).
            if NESTED_KIND == 1:
                constant = _round_to_bf16(_round_to_bf16(product) + _round_to_bf16(nested_offset))
            elif NESTED_KIND == 2:
                product = product.to(tl.float16).to(tl.float32)
                nested_offset = nested_offset.to(tl.float16).to(tl.float32)
                constant = (product + nested_offset).to(tl.float16).to(tl.float32)
            else:
                constant = product + nested_offset
        else:
            constant = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        return constant

    @triton.jit
    def _dequantize_4bit_kernel(
        packed_ptr,  # uint8 [(n + 1) // 2]
        absmax_ptr,  # fp32 [nb] or uint8 [nb] (DOUBLE_QUANT)
        nested_absmax_ptr,  # fp32 [ceil(nb / 256)] (DOUBLE_QUANT)
        nested_offset_ptr,  # fp32 [1] (DOUBLE_QUANT)
        dynamic_map_ptr,  # fp32 [256] (DOUBLE_QUANT)
        table_ptr,  # fp32 [16] code values
        out_ptr,  # [n] in the output dtype
        n,  # number of elements
        BLOCKSIZE: tl.constexpr,  # quantization block (elements)
        BYTES_PER_PROGRAM: tl.constexpr,  # packed bytes per program (a multiple of BLOCKSIZE // 2)
        DOUBLE_QUANT: tl.constexpr,
        NESTED_KIND: tl.constexpr = 0,  # see _block_constant
        ROUND_BF16_BY_BITS: tl.constexpr = False,  # bf16 output under the interpreter (see _round_to_bf16)
    ):
        # One row of the [ROWS, BLOCKSIZE/2] tile is one quantization block, so its constant is decoded
        # once per row and broadcast.
        ROWS: tl.constexpr = BYTES_PER_PROGRAM // (BLOCKSIZE // 2)
        block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        pair = tl.arange(0, BLOCKSIZE // 2)
        byte_index = block[:, None] * (BLOCKSIZE // 2) + pair[None, :]
        byte_mask = byte_index < (n + 1) // 2
        byte = tl.load(packed_ptr + byte_index, mask=byte_mask, other=0x77).to(tl.int32)
        scale = _block_constant(
            block,
            block * BLOCKSIZE < n,
            absmax_ptr,
            nested_absmax_ptr,
            nested_offset_ptr,
            dynamic_map_ptr,
            DOUBLE_QUANT,
            NESTED_KIND,
        )
        hi = tl.load(table_ptr + (byte >> 4)) * scale[:, None]
        lo = tl.load(table_ptr + (byte & 0xF)) * scale[:, None]
        values = tl.interleave(hi, lo)  # [ROWS, BLOCKSIZE]: element 2i from the high nibble
        if ROUND_BF16_BY_BITS:
            values = _round_to_bf16(values)  # the cast below is then exact
        element = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + element, values.to(out_ptr.dtype.element_ty), mask=element < n)

    @triton.jit
    def _double_quantize_kernel(
        absmax_ptr,  # fp32 [nb]
        nested_offset_ptr,  # fp32 [1]: mean of absmax
        midpoints_ptr,  # fp32 [255]: midpoints of the dynamic map
        qabsmax_ptr,  # uint8 [nb]
        nested_absmax_ptr,  # fp32 [ceil(nb / 256)]
        nb,  # number of block constants
    ):
        block = tl.program_id(0).to(tl.int64)
        index = block * 256 + tl.arange(0, 256)
        mask = index < nb
        centred = tl.load(absmax_ptr + index, mask=mask, other=0.0) - tl.load(nested_offset_ptr)
        centred = tl.where(mask, centred, 0.0)
        nested_absmax = tl.max(tl.abs(centred), axis=0)
        inv = tl.math.div_rn(1.0, tl.maximum(nested_absmax, _NESTED_RECIPROCAL_FLOOR))
        scaled = tl.minimum(tl.maximum(centred * inv, -1.0), 1.0)
        # Exact nearest code = number of midpoints strictly below the value, by binary search over 255.
        position = tl.zeros([256], dtype=tl.int32)
        for step in tl.static_range(7, -1, -1):
            probe = position + (1 << step)
            below = tl.load(midpoints_ptr + probe - 1, mask=probe <= 255, other=float("inf")) < scaled
            position = tl.where(below & (probe <= 255), probe, position)
        tl.store(qabsmax_ptr + index, position.to(tl.uint8), mask=mask)
        tl.store(nested_absmax_ptr + block, nested_absmax)

    @triton.jit
    def _double_dequantize_kernel(
        qabsmax_ptr,  # uint8 [nb]
        nested_absmax_ptr,  # fp32 [ceil(nb / 256)]
        nested_offset_ptr,  # fp32 [1]
        dynamic_map_ptr,  # fp32 [256]
        out_ptr,  # fp32 [nb]
        nb,
        BLOCK: tl.constexpr,
        NESTED_KIND: tl.constexpr,  # see _block_constant
    ):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = index < nb
        out = _block_constant(
            index, mask, qabsmax_ptr, nested_absmax_ptr, nested_offset_ptr, dynamic_map_ptr, True, NESTED_KIND
        )
        tl.store(out_ptr + index, out, mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers: validate, allocate, grid, launch.
# ----------------------------------------------------------------------------------------------------

# Per-device copies of the small constant tables, so launches do not re-upload them.
_TABLE_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def _device_table(name: str, device: torch.device) -> torch.Tensor:
    key = (name, str(device))
    if key not in _TABLE_CACHE:
        if name in QUANT_TYPES:
            table = code_table(name)
        elif name.endswith("/thresholds"):
            table = _sorted_table(name.split("/")[0])[1]
        elif name.endswith("/sorted_codes"):
            table = _sorted_table(name.split("/")[0])[2]
        elif name == "dynamic":
            table = _dynamic_map_cpu()
        elif name == "dynamic/midpoints":
            table = _dynamic_midpoints_cpu()
        else:
            raise KeyError(name)
        _TABLE_CACHE[key] = table.to(device)
    return _TABLE_CACHE[key]


#: NESTED_KIND constexpr of each nested dtype (see _block_constant).
_NESTED_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _launch_options(device: torch.device) -> dict:
    # Keep a*b + c as two roundings (bitsandbytes' order) on GPUs; the interpreter never fuses.
    return {} if device.type == "cpu" else {"enable_fp_fusion": False}


def _device_context(device: torch.device):
    import contextlib

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Triton blockwise 4-bit quantization; same contract and bytes as :func:`quantize_4bit_ref`.

    x: any shape, fp32/fp16/bf16 (non-contiguous input is copied in row-major order).
    Returns packed uint8 ``((n + 1) // 2, 1)`` and fp32 absmax ``[ceil(n / blocksize)]``.
    """
    check_float_input(x)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    flat = x.contiguous().view(-1)
    n = flat.numel()
    nb = num_blocks(n, blocksize)
    packed = torch.empty(packed_shape(n), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    blocks_per_program = max(1, min(16, 2048 // blocksize))
    grid = (triton.cdiv(nb, blocks_per_program),)
    with _device_context(x.device):
        _quantize_4bit_kernel[grid](
            flat,
            packed,
            absmax,
            _device_table(f"{quant_type}/thresholds", x.device),
            _device_table(f"{quant_type}/sorted_codes", x.device),
            n,
            BLOCKSIZE=blocksize,
            BLOCKS_PER_PROGRAM=blocks_per_program,
            IDENTITY_CODES=quant_type == "nf4",
            **_launch_options(x.device),
        )
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    blocksize: int = 64,
    quant_type: str = "nf4",
    nested_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-launch Triton dequantization, double-quantized constants decoded in the same kernel.

    packed: uint8 ``((n + 1) // 2, 1)``; absmax: fp32 ``[nb]``, or uint8 ``[nb]`` with nested_absmax fp32
    ``[ceil(nb / 256)]`` and nested_offset fp32 0-dim (reconstructed in ``nested_dtype``, see
    :func:`double_dequantize_ref`). Returns ``shape`` in ``dtype``, written into ``out`` when given.
    """
    n = check_dequantize_args(
        packed, absmax, nested_absmax, nested_offset, shape, dtype, blocksize, quant_type, nested_dtype
    )
    device = packed.device
    packed = packed.contiguous()
    double_quant = nested_absmax is not None
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    else:
        check_dequantize_out(out, shape, dtype, device)
    # Measured on an H100 (triton 3.6, NF4+DQ -> bf16): 2048 bytes and 2 warps per program reach 82-88 %
    # of copy bandwidth at 4096x14336 and 8192x28672; 4 or 8 warps were slower at these sizes.
    bytes_per_program = max(blocksize // 2, 2048)
    grid = (triton.cdiv((n + 1) // 2, bytes_per_program),)
    absmax = absmax.contiguous()
    with _device_context(device):
        _dequantize_4bit_kernel[grid](
            packed,
            absmax,
            nested_absmax if double_quant else absmax,
            nested_offset.reshape(1) if double_quant else absmax,
            _device_table("dynamic", device),
            _device_table(quant_type, device),
            out,
            n,
            BLOCKSIZE=blocksize,
            BYTES_PER_PROGRAM=bytes_per_program,
            DOUBLE_QUANT=double_quant,
            NESTED_KIND=_NESTED_KIND[nested_dtype],
            ROUND_BF16_BY_BITS=dtype == torch.bfloat16 and device.type == "cpu",
            num_warps=2,
            **_launch_options(device),
        )
    return out


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton double quantization; same contract and bytes as :func:`double_quantize_ref`.

    The mean is taken with ``torch.mean`` on the tensor's own device, like bitsandbytes, because its
    reduction order decides the last bit of the nested offset.
    """
    check_absmax_for_double_quant(absmax)
    absmax = absmax.contiguous()
    nb = absmax.numel()
    nested_offset = absmax.mean()
    qabsmax = torch.empty(nb, dtype=torch.uint8, device=absmax.device)
    nested_absmax = torch.empty(num_blocks(nb, NESTED_BLOCKSIZE), dtype=torch.float32, device=absmax.device)
    with _device_context(absmax.device):
        _double_quantize_kernel[(nested_absmax.numel(),)](
            absmax,
            nested_offset.reshape(1),
            _device_table("dynamic/midpoints", absmax.device),
            qabsmax,
            nested_absmax,
            nb,
        )
    return qabsmax, nested_absmax, nested_offset


def double_dequantize(
    qabsmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_offset: torch.Tensor,
    nested_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Triton reconstruction of fp32 block constants ``[nb]``; same values as :func:`double_dequantize_ref`."""
    check_nested_args(qabsmax, nested_absmax, nested_offset, nested_dtype)
    qabsmax, nested_absmax = qabsmax.contiguous(), nested_absmax.contiguous()
    nb = qabsmax.numel()
    out = torch.empty(nb, dtype=torch.float32, device=qabsmax.device)
    block = 1024
    with _device_context(qabsmax.device):
        _double_dequantize_kernel[(triton.cdiv(nb, block),)](
            qabsmax,
            nested_absmax,
            nested_offset.reshape(1),
            _device_table("dynamic", qabsmax.device),
            out,
            nb,
            BLOCK=block,
            NESTED_KIND=_NESTED_KIND[nested_dtype],
            **_launch_options(qabsmax.device),
        )
    return out
