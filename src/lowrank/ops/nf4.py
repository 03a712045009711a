"""4-bit quantization ops, registered with ``torch.library`` and routed through the dispatch point.

Each op takes the *resolved* backend name as its last argument, so ``torch.compile`` sees one opaque
custom op per call (no graph break) and the choice is made once, outside the traced region.
"""

from __future__ import annotations

import torch

from lowrank.kernels import nf4 as K
from lowrank.nf4_format import TENSOR_FIELDS
from lowrank.ops import dispatch
from lowrank.ops.dispatch import register
from lowrank.ops.spec import OpSpec

# ---------------------------------------------------------------------------------------------------
# torch backend: the references themselves.
# ---------------------------------------------------------------------------------------------------

#: Elements per call of the reference quantizer. Blocks are independent, so whole-block chunks give the same
#: bits; they bound its fp32/int64 temporaries (~25 bytes per element) to ~25 MiB, which keeps streamed
#: loading without the extension inside its memory bound (tests/lowrank/test_loading.py).
QUANTIZE_CHUNK_ELEMENTS = 1 << 20


@register("quantize_4bit", "torch")
def _quantize_4bit_torch(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    flat = x.reshape(-1)
    chunk = max(blocksize, QUANTIZE_CHUNK_ELEMENTS // blocksize * blocksize)  # a multiple of blocksize (even)
    if flat.numel() <= chunk:
        return K.quantize_4bit_ref(x, blocksize, quant_type)
    n = flat.numel()
    # The outputs are allocated once, before the temporaries: pieces kept alive between them would pin the
    # heap (glibc keeps the freed temporaries' pages; measured +150 MB peak RSS on a streamed 300 MB load).
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(K.num_blocks(n, blocksize), dtype=torch.float32, device=flat.device)
    for start in range(0, n, chunk):
        part_packed, part_absmax = K.quantize_4bit_ref(flat[start : start + chunk], blocksize, quant_type)
        packed[start // 2 : start // 2 + part_packed.shape[0]] = part_packed
        absmax[start // blocksize : start // blocksize + part_absmax.numel()] = part_absmax
        del part_packed, part_absmax
    return packed, absmax


register("double_quantize", "torch")(K.double_quantize_ref)
register("double_dequantize", "torch")(K.double_dequantize_ref)


@register("dequantize_4bit", "torch")
def _dequantize_4bit_torch(
    packed,
    absmax,
    nested_absmax,
    nested_offset,
    shape,
    dtype,
    blocksize=64,
    quant_type="nf4",
    nested_dtype=torch.float32,
    out=None,
):
    K.check_dequantize_args(
        packed, absmax, nested_absmax, nested_offset, shape, dtype, blocksize, quant_type, nested_dtype
    )
    if out is not None:
        K.check_dequantize_out(out, shape, dtype, packed.device)
    if nested_absmax is not None:
        absmax = K.double_dequantize_ref(absmax, nested_absmax, nested_offset, nested_dtype)
    result = K.dequantize_4bit_ref(packed, absmax, shape, dtype, blocksize, quant_type)
    return result if out is None else out.copy_(result)


# ---------------------------------------------------------------------------------------------------
# triton backend: the launchers in lowrank.kernels.nf4 (absent when triton is not installed).
# ---------------------------------------------------------------------------------------------------

if K.HAS_TRITON:
    register("quantize_4bit", "triton")(K.quantize_4bit)
    register("double_quantize", "triton")(K.double_quantize)
    register("double_dequantize", "triton")(K.double_dequantize)
    register("dequantize_4bit", "triton")(K.dequantize_4bit)


# ---------------------------------------------------------------------------------------------------
# ext backend: the optional C++/CUDA extension, looked up at call time.
# ---------------------------------------------------------------------------------------------------

for _op in ("quantize_4bit", "double_quantize", "double_dequantize", "dequantize_4bit"):
    register(_op, "ext")(lambda *args, _op=_op, **kwargs: getattr(dispatch.ext_module(), _op)(*args, **kwargs))


# ---------------------------------------------------------------------------------------------------
# torch.library registrations (what torch.compile and opcheck see).
# ---------------------------------------------------------------------------------------------------


# Each op's arguments are declared once (OpSpec); each takes the resolved backend name.

QUANTIZE = OpSpec(
    "lowrank::quantize_4bit",
    [("x", "Tensor"), ("blocksize", "int"), ("quant_type", "str"), ("backend", "str")],
    returns="(Tensor, Tensor)",  # packed uint8 ((n + 1) // 2, 1), absmax fp32 [nb]
)
DOUBLE_QUANTIZE = OpSpec(
    "lowrank::double_quantize",
    [("absmax", "Tensor"), ("backend", "str")],
    returns="(Tensor, Tensor, Tensor)",  # codes uint8 [nb], nested_absmax fp32 [ceil(nb / 256)], nested_offset 0-dim
)
DOUBLE_DEQUANTIZE = OpSpec(
    "lowrank::double_dequantize",
    [
        ("qabsmax", "Tensor"),
        ("nested_absmax", "Tensor"),
        ("nested_offset", "Tensor"),
        ("backend", "str"),
        ("nested_dtype", "ScalarType", torch.float32),
    ],
    returns="Tensor",  # fp32 [nb]
)
DEQUANTIZE = OpSpec(
    "lowrank::dequantize_4bit",
    [
        *((field, "Tensor" if field in ("packed", "absmax") else "Tensor?") for field in TENSOR_FIELDS),
        ("shape", "int[]"),
        ("dtype", "ScalarType"),
        ("blocksize", "int"),
        ("quant_type", "str"),
        ("backend", "str"),
        ("nested_dtype", "ScalarType", torch.float32),
    ],
    returns="Tensor",  # `shape` in `dtype`
)

quantize_4bit_op = QUANTIZE.define(
    lambda a: dispatch.implementation("quantize_4bit", a.backend)(a.x, a.blocksize, a.quant_type),
    lambda a: (
        a.x.new_empty(K.packed_shape(a.x.numel()), dtype=torch.uint8),
        a.x.new_empty((K.num_blocks(a.x.numel(), a.blocksize),), dtype=torch.float32),
    ),
)
double_quantize_op = DOUBLE_QUANTIZE.define(
    lambda a: dispatch.implementation("double_quantize", a.backend)(a.absmax),
    lambda a: (
        a.absmax.new_empty((a.absmax.numel(),), dtype=torch.uint8),
        a.absmax.new_empty((K.num_blocks(a.absmax.numel(), K.NESTED_BLOCKSIZE),), dtype=torch.float32),
        a.absmax.new_empty((), dtype=torch.float32),
    ),
)
double_dequantize_op = DOUBLE_DEQUANTIZE.define(
    lambda a: dispatch.implementation("double_dequantize", a.backend)(
        a.qabsmax, a.nested_absmax, a.nested_offset, a.nested_dtype
    ),
    lambda a: a.qabsmax.new_empty(a.qabsmax.shape, dtype=torch.float32),
)
dequantize_4bit_op = DEQUANTIZE.define(
    lambda a: dispatch.implementation("dequantize_4bit", a.backend)(
        *(getattr(a, field) for field in TENSOR_FIELDS),
        tuple(a.shape),
        a.dtype,
        a.blocksize,
        a.quant_type,
        a.nested_dtype,
    ),
    lambda a: a.packed.new_empty(a.shape, dtype=a.dtype),
)
