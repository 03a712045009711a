"""Public NF4 / FP4 API: :func:`quantize`, :func:`dequantize` and the :class:`NF4Weight` container.

The format is bitsandbytes' (bytes, constants and serialized state dict), computed by lowrank's own
kernels. :class:`NF4Weight` and the format checks live in :mod:`lowrank.nf4_format` (no Triton import);
this module adds the operations that run a kernel, through the dispatch point.
"""

from __future__ import annotations

import torch

from lowrank import nf4_format as F
from lowrank.nf4_format import NF4Weight, QuantStateError
from lowrank.ops import dispatch
from lowrank.ops import nf4 as ops

__all__ = ["NF4Weight", "QuantStateError", "dequantize", "dequantize_absmax", "quantize"]


def quantize(
    w: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
    backend: str | None = None,
) -> NF4Weight:
    """Quantize ``w`` (any shape, fp32/fp16/bf16) to 4 bits in bitsandbytes' format.

    ``backend``: ``None``/``"auto"`` picks per device; ``"torch"``, ``"triton"`` or ``"ext"`` forces one
    (and raises if it cannot run here). Non-finite values and empty tensors are rejected.
    """
    F.check_float_input(w, "weight")
    F.check_blocksize(blocksize)
    F.check_quant_type(quant_type)
    w = w.detach()  # the weight is frozen: its constants never carry autograd history
    if w.device.type == "meta":
        raise ValueError(f"weight of shape {tuple(w.shape)} is on the meta device: it has no values to quantize")
    # aminmax is one vectorised reduction that propagates NaN and shows ±inf in its extremes: on CPU it
    # costs ~1/50 of isfinite(w).all(); the full scan runs only to name the first bad element.
    lowest, highest = torch.aminmax(w)
    if not bool(torch.isfinite(lowest) & torch.isfinite(highest)):
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueError(
            f"weight has non-finite values (first at index {bad}: {w[tuple(bad)].item()}); cannot quantize"
        )
    name = dispatch.resolve("quantize_4bit", w.device, backend)
    packed, absmax = ops.quantize_4bit_op(w, blocksize, quant_type, name)
    nested_absmax = nested_offset = None
    if double_quant:
        dq = dispatch.resolve("double_quantize", w.device, backend)
        absmax, nested_absmax, nested_offset = ops.double_quantize_op(absmax, dq)
    return NF4Weight.trusted(packed, absmax, w.shape, w.dtype, blocksize, quant_type, nested_absmax, nested_offset)


def dequantize(
    qw: NF4Weight, dtype: torch.dtype | None = None, backend: str | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Reconstruct the tensor in ``dtype`` (default: ``out``'s dtype, else the original dtype), in the
    original shape. With ``out`` (contiguous, that shape and dtype, on ``qw``'s device) the result is written
    there and ``out`` is returned: reusing one buffer skips the allocation (on CPU, its page faults cost
    several times the decode)."""
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"dequantize expects an NF4Weight, got {type(qw).__name__}")
    if dtype is None:
        dtype = out.dtype if isinstance(out, torch.Tensor) else qw.dtype
    if dtype not in F.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32/float16/bfloat16, got {dtype}")
    if out is not None:
        F.check_dequantize_out(out, qw.shape, dtype, qw.device)
    name = dispatch.resolve("dequantize_4bit", qw.device, backend)
    args = (qw.packed, qw.absmax, qw.nested_absmax, qw.nested_offset)
    if torch.compiler.is_compiling():
        result = ops.dequantize_4bit_op(
            *args, list(qw.shape), dtype, qw.blocksize, qw.quant_type, name, qw.nested_dtype
        )
        return result if out is None else out.copy_(result)
    # Eager calls launch the implementation directly: the torch.library dispatcher costs tens of
    # microseconds per call, as much as the whole kernel for a 4096x4096 weight on an H100.
    impl = dispatch.implementation("dequantize_4bit", name)
    with torch.no_grad():
        if out is None:
            return impl(*args, tuple(qw.shape), dtype, qw.blocksize, qw.quant_type, qw.nested_dtype)
        return impl(*args, tuple(qw.shape), dtype, qw.blocksize, qw.quant_type, qw.nested_dtype, out=out)


def dequantize_absmax(qw: NF4Weight, backend: str | None = None) -> torch.Tensor:
    """The fp32 per-block constants ``[nb]`` of ``qw`` (reconstructed when double-quantized)."""
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"dequantize_absmax expects an NF4Weight, got {type(qw).__name__}")
    if not qw.double_quant:
        return qw.absmax
    name = dispatch.resolve("double_dequantize", qw.device, backend)
    return ops.double_dequantize_op(qw.absmax, qw.nested_absmax, qw.nested_offset, name, qw.nested_dtype)
