"""4-bit quantization ops, registered with ``torch.library`` and routed through the dispatch point.

Each op takes the *resolved* backend name as its last argument, so ``torch.compile`` sees one opaque
custom op per call (no graph break) and the choice is made once, outside the traced region.
"""

from __future__ import annotations

import torch

from lowrank.kernels import nf4 as K
from lowrank.ops import dispatch
from lowrank.ops.dispatch import register

# ---------------------------------------------------------------------------------------------------
# torch backend: the references themselves.
# ---------------------------------------------------------------------------------------------------

register("quantize_4bit", "torch")(K.quantize_4bit_ref)
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


@torch.library.custom_op("lowrank::quantize_4bit", mutates_args=())
def quantize_4bit_op(
    x: torch.Tensor, blocksize: int, quant_type: str, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return dispatch.implementation("quantize_4bit", backend)(x, blocksize, quant_type)


@quantize_4bit_op.register_fake
def _(x, blocksize, quant_type, backend):
    n = x.numel()
    return (
        x.new_empty(K.packed_shape(n), dtype=torch.uint8),
        x.new_empty((K.num_blocks(n, blocksize),), dtype=torch.float32),
    )


@torch.library.custom_op("lowrank::double_quantize", mutates_args=())
def double_quantize_op(absmax: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.implementation("double_quantize", backend)(absmax)


@double_quantize_op.register_fake
def _(absmax, backend):
    nb = absmax.numel()
    return (
        absmax.new_empty((nb,), dtype=torch.uint8),
        absmax.new_empty((K.num_blocks(nb, K.NESTED_BLOCKSIZE),), dtype=torch.float32),
        absmax.new_empty((), dtype=torch.float32),
    )


@torch.library.custom_op("lowrank::double_dequantize", mutates_args=())
def double_dequantize_op(
    qabsmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_offset: torch.Tensor,
    backend: str,
    nested_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    return dispatch.implementation("double_dequantize", backend)(qabsmax, nested_absmax, nested_offset, nested_dtype)


@double_dequantize_op.register_fake
def _(qabsmax, nested_absmax, nested_offset, backend, nested_dtype=torch.float32):
    return qabsmax.new_empty(qabsmax.shape, dtype=torch.float32)


@torch.library.custom_op("lowrank::dequantize_4bit", mutates_args=())
def dequantize_4bit_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    shape: list[int],
    dtype: torch.dtype,
    blocksize: int,
    quant_type: str,
    backend: str,
    nested_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    return dispatch.implementation("dequantize_4bit", backend)(
        packed, absmax, nested_absmax, nested_offset, tuple(shape), dtype, blocksize, quant_type, nested_dtype
    )


@dequantize_4bit_op.register_fake
def _(
    packed,
    absmax,
    nested_absmax,
    nested_offset,
    shape,
    dtype,
    blocksize,
    quant_type,
    backend,
    nested_dtype=torch.float32,
):
    return packed.new_empty(shape, dtype=dtype)
