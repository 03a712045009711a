"""Loads the optional C++ extension ``lowrank._C`` once and adapts it to the dispatch point.

:func:`load` returns ``None`` when the extension is not built, failed to load (one warning is logged,
nothing is raised at import) or is disabled with ``LOWRANK_DISABLE_EXT=1``; otherwise an
:class:`Extension` whose methods have the signatures of the torch implementations registered in
``lowrank.ops.nf4`` and ``lowrank.ops.lora``. The kernels themselves are ``torch.ops.lowrank_ext.*``
(schemas in ``csrc/module.cpp``); their fake (meta) implementations are registered here, so
``torch.compile`` and ``torch.library.opcheck`` can trace them.

Why it is unavailable, when it is: :func:`load_error`.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from lowrank import nf4_format as F

log = logging.getLogger(__name__)

#: Ops with a kernel in the extension (device type -> op names). The CUDA kernels (csrc/cuda/) exist only in
#: a build with LOWRANK_BUILD_CUDA=1; :meth:`Extension.supports` also asks :func:`cuda_kernels_built`.
_SUPPORTED = {
    "cpu": frozenset(
        {
            "quantize_4bit",
            "double_quantize",
            "double_dequantize",
            "dequantize_4bit",
            "lora_forward",
            "lora_backward",
            "dropout_mask",
        }
    ),
    "cuda": frozenset({"double_dequantize", "dequantize_4bit", "lora_forward", "lora_backward", "dropout_mask"}),
}


def disabled() -> bool:
    """True when ``LOWRANK_DISABLE_EXT=1`` asks lowrank to ignore the extension."""
    return os.environ.get("LOWRANK_DISABLE_EXT", "0") == "1"


# (module, None) or (None, reason), set once. A plain global rather than functools.lru_cache: torch.compile
# traces through lru_cache wrappers (and cannot trace importlib), but reads a global as a constant.
_IMPORT_RESULT: tuple[object | None, str | None] | None = None
# Whether the loaded module registered CUDA kernels; set with _IMPORT_RESULT.
_CUDA_KERNELS_BUILT = False


def _import() -> tuple[object | None, str | None]:
    """(module, None) or (None, reason). Runs once; a failure is logged once as a warning."""
    global _IMPORT_RESULT
    if _IMPORT_RESULT is None:
        _IMPORT_RESULT = _import_once()
    return _IMPORT_RESULT


def _import_once() -> tuple[object | None, str | None]:
    global _CUDA_KERNELS_BUILT
    try:
        module = importlib.import_module("lowrank._C")
    except ModuleNotFoundError as err:
        if err.name != "lowrank._C":
            log.warning(
                "lowrank: the C++ extension lowrank._C failed to load (%s); using the torch/triton backends", err
            )
        return None, f"lowrank._C is not built ({err})"
    except Exception as err:  # noqa: BLE001 - an incompatible binary can raise anything; never fail the import
        log.warning("lowrank: the C++ extension lowrank._C failed to load (%s); using the torch/triton backends", err)
        return None, f"lowrank._C failed to load: {type(err).__name__}: {err}"
    _register_fakes()
    _CUDA_KERNELS_BUILT = torch._C._dispatch_has_kernel_for_dispatch_key("lowrank_ext::dequantize_4bit", "CUDA")
    return module, None


def load() -> Extension | None:
    """The extension, or None when it is absent, failed to load or is disabled (``LOWRANK_DISABLE_EXT=1``)."""
    if disabled():
        return None
    module, _ = _import()
    return None if module is None else _EXTENSION


def cuda_kernels_built() -> bool:
    """True when the extension is usable and has the CUDA kernels of csrc/cuda/ (``LOWRANK_BUILD_CUDA=1``)."""
    return load() is not None and _CUDA_KERNELS_BUILT


def load_error() -> str | None:
    """Why :func:`load` returns None (None when the extension is usable)."""
    if disabled():
        return "disabled by LOWRANK_DISABLE_EXT=1"
    return _import()[1]


# ---------------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only.
# ---------------------------------------------------------------------------------------------------


def _register_fakes() -> None:
    lib = "lowrank_ext::"

    @torch.library.register_fake(lib + "quantize_4bit")
    def _(x, blocksize, quant_type):
        n = x.numel()
        return x.new_empty(F.packed_shape(n), dtype=torch.uint8), x.new_empty(
            (F.num_blocks(n, blocksize),), dtype=torch.float32
        )

    @torch.library.register_fake(lib + "double_quantize")
    def _(absmax):
        nb = absmax.numel()
        return (
            absmax.new_empty((nb,), dtype=torch.uint8),
            absmax.new_empty((F.num_blocks(nb, F.NESTED_BLOCKSIZE),), dtype=torch.float32),
            absmax.new_empty((), dtype=torch.float32),
        )

    @torch.library.register_fake(lib + "double_dequantize")
    def _(qabsmax, nested_absmax, nested_offset, nested_dtype):
        return qabsmax.new_empty(qabsmax.shape, dtype=torch.float32)

    @torch.library.register_fake(lib + "dequantize_4bit")
    def _(packed, absmax, nested_absmax, nested_offset, shape, dtype, blocksize, quant_type, nested_dtype):
        return packed.new_empty(shape, dtype=dtype)

    @torch.library.register_fake(lib + "dequantize_4bit_out")
    def _(packed, absmax, nested_absmax, nested_offset, blocksize, quant_type, nested_dtype, out):
        return None

    @torch.library.register_fake(lib + "lora_forward")
    def _(
        x,
        weight,
        absmax,
        nested_absmax,
        nested_offset,
        blocksize,
        quant_type,
        nested_dtype,
        A,
        B,
        scale,
        bias,
        dropout,
        seed,
    ):
        return x.new_empty((x.shape[0], B.shape[0])), x.new_empty((x.shape[0], A.shape[0]), dtype=torch.float32)

    @torch.library.register_fake(lib + "lora_backward")
    def _(
        dy,
        x,
        weight,
        absmax,
        nested_absmax,
        nested_offset,
        blocksize,
        quant_type,
        nested_dtype,
        A,
        B,
        scale,
        xa,
        dropout,
        seed,
        need_dx,
        need_dA,
        need_dB,
    ):
        return (
            x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
            A.new_empty(A.shape) if need_dA else x.new_empty((0,)),
            B.new_empty(B.shape) if need_dB else x.new_empty((0,)),
        )

    @torch.library.register_fake(lib + "dropout_mask_out")
    def _(out, row_offset, p, seed):
        return None


# ---------------------------------------------------------------------------------------------------
# The object the dispatch point calls.
# ---------------------------------------------------------------------------------------------------


def _weight_args(weight, n: int, k: int) -> tuple:
    """The lora kernels' weight arguments: (tensor, absmax, nested_absmax, nested_offset, blocksize, quant_type,
    nested_dtype). A 4-bit weight is an :class:`~lowrank.nf4_format.NF4Weight` validated where it came in."""
    if isinstance(weight, torch.Tensor):
        if weight.shape != (n, k):
            raise ValueError(f"weight must have shape ({n}, {k}) = (B.shape[0], x.shape[1]), got {tuple(weight.shape)}")
        return weight, None, None, None, 64, "nf4", torch.float32
    if tuple(weight.shape) != (n, k):
        raise ValueError(
            f"4-bit weight must have shape ({n}, {k}) = (B.shape[0], x.shape[1]), got {tuple(weight.shape)}"
        )
    tensors = tuple(getattr(weight, name) for name in F.TENSOR_FIELDS)
    return (*tensors, weight.blocksize, weight.quant_type, weight.nested_dtype)


def _dropout_args(dropout) -> tuple[float, int]:
    """(p, seed as int64) for the C++ schemas; (0.0, 0) for no dropout."""
    if dropout is None:
        return 0.0, 0
    return float(dropout.p), int(dropout.seed_int64)


def _check_lora_shapes(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[int, int]:
    if x.dim() != 2 or A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"x, A, B must be 2-D, got shapes {tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}")
    return B.shape[0], x.shape[1]


class Extension:
    """The loaded extension, seen through the dispatch point's signatures (CPU kernels, and CUDA kernels for
    dequantization and the LoRA linear when built with them)."""

    @staticmethod
    def supports(op: str, device_type: str) -> bool:
        if device_type == "cuda" and not _CUDA_KERNELS_BUILT:
            return False
        return op in _SUPPORTED.get(device_type, ())

    # -- 4-bit quantization -------------------------------------------------------------------------

    @staticmethod
    def quantize_4bit(
        x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: any shape, fp32/fp16/bf16 -> (packed uint8 ((n + 1) // 2, 1), absmax fp32 [ceil(n / blocksize)])."""
        F.check_float_input(x)
        F.check_blocksize(blocksize)
        F.check_quant_type(quant_type)
        return torch.ops.lowrank_ext.quantize_4bit(x, blocksize, quant_type)

    @staticmethod
    def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """absmax fp32 [nb] -> (codes uint8 [nb], nested_absmax fp32 [ceil(nb / 256)], nested_offset fp32 0-dim)."""
        F.check_absmax_for_double_quant(absmax)
        return torch.ops.lowrank_ext.double_quantize(absmax)

    @staticmethod
    def double_dequantize(
        qabsmax: torch.Tensor,
        nested_absmax: torch.Tensor,
        nested_offset: torch.Tensor,
        nested_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """-> fp32 [nb] block constants (see ``double_dequantize_ref``)."""
        F.check_nested_args(qabsmax, nested_absmax, nested_offset, nested_dtype)
        return torch.ops.lowrank_ext.double_dequantize(qabsmax.reshape(-1), nested_absmax, nested_offset, nested_dtype)

    @staticmethod
    def dequantize_4bit(
        packed: torch.Tensor,
        absmax: torch.Tensor,
        nested_absmax: torch.Tensor | None,
        nested_offset: torch.Tensor | None,
        shape,
        dtype: torch.dtype,
        blocksize: int = 64,
        quant_type: str = "nf4",
        nested_dtype: torch.dtype = torch.float32,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass: nested constants decoded per block, then ``dtype(code * absmax)`` -> ``shape``
        (written into ``out`` when given: a buffer reused across calls skips a fresh output's page faults)."""
        F.check_dequantize_args(
            packed, absmax, nested_absmax, nested_offset, shape, dtype, blocksize, quant_type, nested_dtype
        )
        if out is not None:
            F.check_dequantize_out(out, shape, dtype, packed.device)
            # a kernel exists wherever dequantize_4bit has one: CPU, and CUDA when built with it
            torch.ops.lowrank_ext.dequantize_4bit_out(
                packed, absmax, nested_absmax, nested_offset, blocksize, quant_type, nested_dtype, out
            )
            return out
        return torch.ops.lowrank_ext.dequantize_4bit(
            packed,
            absmax,
            nested_absmax,
            nested_offset,
            [int(d) for d in shape],
            dtype,
            blocksize,
            quant_type,
            nested_dtype,
        )

    # -- LoRA linear on a 4-bit or dense base -------------------------------------------------------

    @staticmethod
    def lora_forward(x, weight, A, B, scale: float, bias=None, dropout=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, K), weight (N, K) 4-bit or dense, A (r, K), B (N, r) -> (y (M, N) x.dtype, xa (M, r) fp32).

        ``dropout``: a :class:`lowrank.kernels.dropout.Dropout` (p, seed) or None; the mask is generated inside.
        """
        n, k = _check_lora_shapes(x, A, B)
        w = _weight_args(weight, n, k)
        return torch.ops.lowrank_ext.lora_forward(x, *w, A, B, float(scale), bias, *_dropout_args(dropout))

    @staticmethod
    def lora_backward(
        dy,
        x,
        weight,
        A,
        B,
        scale: float,
        xa,
        dropout=None,
        need_dx: bool = True,
        need_dA: bool = True,
        need_dB: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """-> (dx (M, K), dA (r, K), dB (N, r)); None for a gradient that was not asked for."""
        n, k = _check_lora_shapes(x, A, B)
        w = _weight_args(weight, n, k)
        dx, dA, dB = torch.ops.lowrank_ext.lora_backward(
            dy, x, *w, A, B, float(scale), xa, *_dropout_args(dropout), bool(need_dx), bool(need_dA), bool(need_dB)
        )
        return (dx if need_dx else None, dA if need_dA else None, dB if need_dB else None)

    @staticmethod
    def dropout_mask(rows: int, cols: int, dropout, row_offset: int = 0, device="cpu") -> torch.Tensor:
        """The bool (rows, cols) keep-mask of ``dropout`` (rows from ``row_offset``), from csrc/dropout.h."""
        out = torch.empty((rows, cols), dtype=torch.uint8, device=device)
        torch.ops.lowrank_ext.dropout_mask_out(out, int(row_offset), *_dropout_args(dropout))
        return out.bool()


_EXTENSION = Extension()

__all__ = ["Extension", "cuda_kernels_built", "disabled", "load", "load_error"]


# Load at import (when not disabled), so that a torch.compile trace never has to run the import itself.
if not disabled():
    _import()
