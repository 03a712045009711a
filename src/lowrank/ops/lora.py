"""LoRA linear ops: ``y = x·dequant(W)ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` with a frozen dense or 4-bit base.

Shapes: x ``(M, K)`` (leading batch dims are flattened by the public functions), W ``(N, K)`` dense or an
:class:`~lowrank.nf4.NF4Weight`, A ``(r, K)``, B ``(N, r)``, bias ``(N,)``; y ``(M, N)`` in x's dtype.

Backends (``torch`` | ``triton`` | ``ext``) implement two functions, registered with the dispatch point
under the op names ``"lora_forward"`` and ``"lora_backward"``::

    lora_forward(x, weight, A, B, scale, bias=None, x_lora=None) -> (y, xa)      xa = x_lora·Aᵀ, fp32 (M, r)
    lora_backward(dy, x, weight, A, B, scale, xa, x_lora=None, need_dx, need_dA, need_dB) -> (dx, dA, dB)
        dx = dy·W + s·(dy·B)·A,  dA = s·(dy·B)ᵀ·x_lora,  dB = s·dyᵀ·xa

Autograd saves only what the caller already holds -- x, the packed weight (never a dequantized copy), A, B,
the bias -- plus xa (M·r fp32) and, with dropout, a 0-dim int64 seed: the keep-mask is regenerated in the
backward instead of storing ``drop(x)`` (M·K). Dropout follows PEFT (only the LoRA input is dropped) but is
applied as ``x_lora = x·mask`` with ``1/(1-p)`` folded into the scale, so the mask is exact in every dtype.
Every backward that needs W decodes it from the saved packed bytes: the triton backend either tile by tile
or, for large M, into a transient freed before it returns (``lowrank.kernels.lora_matmul.choose_backward_path``;
``LOWRANK_LORA_BACKWARD_PATH=fused|dequant``, read by the dispatch point, forces one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lowrank.kernels import lora_matmul as _LK
from lowrank.kernels import nf4 as K
from lowrank.nf4_format import NF4Weight
from lowrank.ops import dispatch
from lowrank.ops.dispatch import register

_SEED_HIGH = 2**62


def _is_4bit(w) -> bool:
    return isinstance(w, NF4Weight)


# ---------------------------------------------------------------------------------------------------
# torch backend: dequantize, then plain matmuls (LoRA term and accumulation in fp32).
# ---------------------------------------------------------------------------------------------------


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` as a dense ``(N, K)`` tensor in ``dtype`` (dequantized when it is NF4Weight-like)."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype)
    absmax = weight.absmax
    if weight.nested_absmax is not None:
        absmax = K.double_dequantize_ref(absmax, weight.nested_absmax, weight.nested_offset, weight.nested_dtype)
    return K.dequantize_4bit_ref(weight.packed, absmax, tuple(weight.shape), dtype, weight.blocksize, weight.quant_type)


@register("lora_forward", "torch")
def lora_forward_torch(x, weight, A, B, scale: float, bias=None, x_lora=None):
    x_lora = x if x_lora is None else x_lora
    xa = x_lora.float() @ A.float().t()
    base = x @ dense_weight(weight, x.dtype).t()
    y = base.float() + scale * (xa @ B.float().t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), xa


@register("lora_backward", "torch")
def lora_backward_torch(dy, x, weight, A, B, scale: float, xa, x_lora=None, need_dx=True, need_dA=True, need_dB=True):
    x_lora = x if x_lora is None else x_lora
    dy32 = dy.float()
    dyb = scale * (dy32 @ B.float()) if (need_dx or need_dA) else None
    dx = dA = dB = None
    if need_dx:
        dx = ((dy @ dense_weight(weight, dy.dtype)).float() + dyb @ A.float()).to(x.dtype)
    if need_dA:
        dA = (dyb.t() @ x_lora.float()).to(A.dtype)
    if need_dB:
        dB = (scale * (dy32.t() @ xa)).to(B.dtype)
    return dx, dA, dB


# ---------------------------------------------------------------------------------------------------
# triton backend (the launchers in lowrank.kernels.lora_matmul) and ext backend (the C++ extension).
# ---------------------------------------------------------------------------------------------------

if _LK.HAS_TRITON:
    # The ops layer has validated the operands once per public call: the launchers' unchecked entries.
    register("lora_forward", "triton")(_LK.lora_forward_unchecked)

    @register("lora_backward", "triton")
    def _lora_backward_triton(*args, **kwargs):
        path = dispatch.forced_path(dispatch.LORA_BACKWARD_PATH_ENV, _LK.BACKWARD_PATHS)
        return _LK.lora_backward_unchecked(*args, **kwargs, path=path)


for _op in ("lora_forward", "lora_backward"):
    register(_op, "ext")(lambda *args, _op=_op, **kwargs: getattr(dispatch.ext_module(), _op)(*args, **kwargs))


# ---------------------------------------------------------------------------------------------------
# Dropout on the LoRA input, reproducible from a seed.
# ---------------------------------------------------------------------------------------------------


def dropout_mask(shape: Sequence[int], p: float, seed: int, device: torch.device | str) -> torch.Tensor:
    """The bool keep-mask (True = kept, probability ``1 - p``) that dropout with ``seed`` applies.

    Drawn from a private generator seeded with ``seed`` on ``device``, so a test can rebuild it exactly.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(tuple(shape), generator=gen, device=device) >= p


def new_dropout_seed() -> torch.Tensor:
    """A fresh 0-dim int64 CPU seed drawn from torch's default generator (so ``torch.manual_seed`` fixes it)."""
    return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64)


def _masked_input(x: torch.Tensor, p: float, seed: torch.Tensor | None, index: int = 0):
    """``(x·mask, mask)`` for projection ``index`` (each projection draws its own mask, like PEFT)."""
    if p == 0.0 or seed is None:
        return None, None
    mask = dropout_mask(x.shape, p, int(seed.item()) + index, x.device)
    return x * mask, mask


# ---------------------------------------------------------------------------------------------------
# Shared forward/backward bodies (one projection). Weight fields travel as plain tensors so torch.library
# can see them; `weight` is uint8 for packed 4-bit codes, a float tensor for a dense base.
# ---------------------------------------------------------------------------------------------------


def _weight_object(weight, absmax, nested_absmax, nested_offset, shape, blocksize, quant_type, nested_dtype, dtype):
    if weight.dtype != torch.uint8:
        return weight
    return NF4Weight.trusted(
        weight, absmax, shape, dtype, blocksize, quant_type, nested_absmax, nested_offset, nested_dtype
    )


def _dequantize(w, dtype: torch.dtype, backend: str) -> torch.Tensor:
    return dispatch.implementation("dequantize_4bit", backend)(
        w.packed,
        w.absmax,
        w.nested_absmax,
        w.nested_offset,
        tuple(w.shape),
        dtype,
        w.blocksize,
        w.quant_type,
        w.nested_dtype,
    )


def _forward_one(x, w, A, B, scale, bias, dropout, seed, index, backend):
    if A is None:  # frozen base only: `backend` names the dequantize backend
        if isinstance(w, torch.Tensor):
            dense = w.to(x.dtype)
        else:
            dense = _dequantize(w, x.dtype, backend)
        y = torch.nn.functional.linear(x, dense, None if bias is None else bias.to(x.dtype))
        return y, x.new_empty((x.shape[0], 0), dtype=torch.float32)
    x_lora, _ = _masked_input(x, dropout, seed, index)
    eff_scale = scale / (1.0 - dropout) if x_lora is not None else scale
    return dispatch.implementation("lora_forward", backend)(x, w, A, B, eff_scale, bias, x_lora)


def _backward_one(dy, x, w, A, B, scale, xa, dropout, seed, index, need_dx, need_dA, need_dB, backend):
    """(dx or None, dA, dB) for one projection; dx is in x's dtype, or fp32 when dropout masks its LoRA term."""
    if A is None:
        if isinstance(w, torch.Tensor):
            dense = w.to(dy.dtype)
        else:
            dense = _dequantize(w, dy.dtype, backend)
        return (dy @ dense) if need_dx else None, None, None
    impl = dispatch.implementation("lora_backward", backend)
    x_lora, mask = _masked_input(x, dropout, seed, index)
    if x_lora is None:
        return impl(dy, x, w, A, B, scale, xa, None, need_dx, need_dA, need_dB)
    eff_scale = scale / (1.0 - dropout)
    dx = dA = dB = None
    if need_dA or need_dB:
        _, dA, dB = impl(dy, x, w, A, B, eff_scale, xa, x_lora, False, need_dA, need_dB)
    if need_dx:
        # The backends' dx has no mask on the LoRA term: take the base part (scale 0) and add the masked term.
        base, _, _ = impl(dy, x, w, A, B, 0.0, xa, None, True, False, False)
        lora = (eff_scale * (dy.float() @ B.float())) @ A.float()
        dx = lora.mul_(mask).add_(base)  # in place: the same bits as base.float() + lora * mask, two temporaries fewer
    return dx, dA, dB


# ---------------------------------------------------------------------------------------------------
# torch.library ops: one projection (several projections sharing x: lowrank.ops.lora_multi).
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("lowrank::lora_linear", mutates_args=())
def lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    weight_shape: list[int],
    blocksize: int,
    quant_type: str,
    nested_dtype: torch.dtype,
    A: torch.Tensor | None,
    B: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None,
    dropout: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y (M, N) x.dtype, xa (M, r) fp32)``; xa is saved for the backward and is not differentiable."""
    w = _weight_object(
        weight, absmax, nested_absmax, nested_offset, weight_shape, blocksize, quant_type, nested_dtype, x.dtype
    )
    return _forward_one(x, w, A, B, scale, bias, dropout, seed, 0, backend)


@lora_linear_op.register_fake
def _(
    x,
    weight,
    absmax,
    nested_absmax,
    nested_offset,
    weight_shape,
    blocksize,
    quant_type,
    nested_dtype,
    A,
    B,
    scale,
    bias,
    dropout,
    seed,
    backend,
):
    r = 0 if A is None else A.shape[0]
    return x.new_empty((x.shape[0], weight_shape[0])), x.new_empty((x.shape[0], r), dtype=torch.float32)


@torch.library.custom_op("lowrank::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    weight_shape: list[int],
    blocksize: int,
    quant_type: str,
    nested_dtype: torch.dtype,
    A: torch.Tensor | None,
    B: torch.Tensor | None,
    scale: float,
    xa: torch.Tensor,
    dropout: float,
    seed: torch.Tensor | None,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dA, dB)``; a gradient that is not needed comes back as an empty tensor."""
    w = _weight_object(
        weight, absmax, nested_absmax, nested_offset, weight_shape, blocksize, quant_type, nested_dtype, x.dtype
    )
    dx, dA, dB = _backward_one(
        dy.contiguous(), x, w, A, B, scale, xa, dropout, seed, 0, need_dx, need_dA, need_dB, backend
    )
    empty = x.new_empty((0,))
    return (
        dx.to(x.dtype) if dx is not None else empty,
        dA if dA is not None else empty.clone(),
        dB if dB is not None else empty.clone(),
    )


@lora_linear_backward_op.register_fake
def _(
    dy,
    x,
    weight,
    absmax,
    nested_absmax,
    nested_offset,
    weight_shape,
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
    backend,
):
    empty = x.new_empty((0,))
    return (
        torch.empty_like(x) if need_dx else empty,
        torch.empty_like(A) if need_dA else empty.clone(),
        torch.empty_like(B) if need_dB else empty.clone(),
    )


def _lora_linear_setup(ctx, inputs, output):
    (
        x,
        weight,
        absmax,
        nested_absmax,
        nested_offset,
        shape,
        blocksize,
        quant_type,
        nested_dtype,
        A,
        B,
        scale,
        bias,
        dropout,
        seed,
        backend,
    ) = inputs
    ctx.save_for_backward(x, weight, absmax, nested_absmax, nested_offset, A, B, seed, output[1])
    ctx.meta = (
        list(shape),
        blocksize,
        quant_type,
        nested_dtype,
        scale,
        dropout,
        backend,
        None if bias is None else bias.dtype,
    )
    ctx.mark_non_differentiable(output[1])


def _lora_linear_backward(ctx, dy, _dxa):
    x, weight, absmax, nested_absmax, nested_offset, A, B, seed, xa = ctx.saved_tensors
    shape, blocksize, quant_type, nested_dtype, scale, dropout, backend, bias_dtype = ctx.meta
    needs = ctx.needs_input_grad
    need_dx, need_dA, need_dB = needs[0], bool(A is not None and needs[9]), bool(B is not None and needs[10])
    dx = dA = dB = None
    if need_dx or need_dA or need_dB:
        dx, dA, dB = lora_linear_backward_op(
            dy,
            x,
            weight,
            absmax,
            nested_absmax,
            nested_offset,
            shape,
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
            backend,
        )
    dbias = dy.sum(0, dtype=torch.float32).to(bias_dtype) if bias_dtype is not None and needs[12] else None
    return (
        dx if need_dx else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        dA if need_dA else None,
        dB if need_dB else None,
        None,
        dbias,
        None,
        None,
        None,
    )


lora_linear_op.register_autograd(_lora_linear_backward, setup_context=_lora_linear_setup)


# ---------------------------------------------------------------------------------------------------
# Public functions: validate, flatten leading dims, resolve the backend once, call the op.
# ---------------------------------------------------------------------------------------------------


def _check_tensor(t, name: str, ndim: int, device: torch.device, float_only: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if float_only and t.dtype not in K.FLOAT_DTYPES:
        raise TypeError(f"{name} dtype must be float32/float16/bfloat16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; move them to one device")


def _check_projection(x: torch.Tensor, w, A, B, scale, bias, index: str = "") -> tuple[int, int]:
    """Validate one projection against x (..., K); returns (N, K)."""
    if _is_4bit(w):
        if len(w.shape) != 2:
            raise ValueError(f"w{index} must describe a 2-D (out, in) weight, got shape {tuple(w.shape)}")
        if w.device != x.device:
            raise ValueError(f"w{index} is on {w.device} but x is on {x.device}; move them to one device")
        n_out, k_in = w.shape
    else:
        _check_tensor(w, f"w{index}", 2, x.device)
        if torch.is_grad_enabled() and w.requires_grad:
            raise ValueError(
                f"w{index} requires grad, but the base weight of a LoRA linear is frozen (no gradient is computed "
                "for it); call .requires_grad_(False) on it or pass w.detach()"
            )
        n_out, k_in = w.shape
    if x.shape[-1] != k_in:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dim but w{index} expects {k_in} (weight shape ({n_out}, {k_in}))"
        )
    if A is not None or B is not None:
        _check_tensor(A, f"A{index}", 2, x.device)
        _check_tensor(B, f"B{index}", 2, x.device)
        r = A.shape[0]
        if r < 1 or r > min(n_out, k_in):
            raise ValueError(f"rank r{index}={r} (A.shape[0]) must be in [1, min(out, in)] = [1, {min(n_out, k_in)}]")
        if A.shape != (r, k_in):
            raise ValueError(f"A{index} must be (r, in) = ({r}, {k_in}), got {tuple(A.shape)}")
        if B.shape != (n_out, r):
            raise ValueError(f"B{index} must be (out, r) = ({n_out}, {r}), got {tuple(B.shape)}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise ValueError(f"scale{index} must be a finite Python number, got {scale!r}")
    if bias is not None:
        _check_tensor(bias, f"bias{index}", 1, x.device)
        if bias.shape[0] != n_out:
            raise ValueError(f"bias{index} must have {n_out} entries (out features), got {bias.shape[0]}")
    return n_out, k_in


def _check_x_and_dropout(x, dropout: float) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in K.FLOAT_DTYPES:
        raise TypeError(f"x dtype must be float32/float16/bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be non-empty with features in its last dim, got shape {tuple(x.shape)}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


def _seed_tensor(dropout: float, dropout_seed) -> torch.Tensor | None:
    if dropout == 0.0:
        return None
    if dropout_seed is None:
        return new_dropout_seed()
    if isinstance(dropout_seed, torch.Tensor):
        return dropout_seed.reshape(()).to(device="cpu", dtype=torch.int64)
    return torch.tensor(int(dropout_seed), dtype=torch.int64)


def _weight_fields(w) -> tuple:
    """The op arguments describing ``w``.

    (tensor, absmax, nested_absmax, nested_offset, shape, blocksize, quant_type, nested_dtype).
    """
    if _is_4bit(w):
        shape = [int(s) for s in w.shape]
        return (w.packed, w.absmax, w.nested_absmax, w.nested_offset, shape, w.blocksize, w.quant_type, w.nested_dtype)
    return (w, None, None, None, [int(s) for s in w.shape], 0, "none", torch.float32)


@torch._dynamo.assume_constant_result
def _resolve(op: str, device: str, backend: str | None) -> str:
    """The backend name for ``op`` (``"lora"``: one that runs both lora_forward and lora_backward).

    A constant under torch.compile: the choice depends only on the device, the request and the environment.
    """
    if op != "lora":
        return dispatch.resolve(op, device, backend)
    name = dispatch.resolve("lora_forward", device, backend)
    if dispatch.why_unusable(name, "lora_backward", torch.device(device)) is not None:
        name = dispatch.resolve("lora_backward", device, backend)
    return name


def _lora_call(x, w, A, B, scale, bias, dropout, backend, dropout_seed):
    _check_x_and_dropout(x, dropout)
    n_out, k_in = _check_projection(x, w, A, B, scale, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k_in).contiguous()
    if A is None:
        name = _resolve("dequantize_4bit" if _is_4bit(w) else "lora_forward", str(x.device), backend)
    else:
        name = _resolve("lora", str(x.device), backend)
    seed = _seed_tensor(dropout, dropout_seed) if A is not None else None
    y, _ = lora_linear_op(x2d, *_weight_fields(w), A, B, float(scale), bias, float(dropout), seed, name)
    return y.reshape(*lead, n_out)


def lora_linear(
    x, w_dense, A, B, scale: float, bias=None, dropout: float = 0.0, backend: str | None = None, *, dropout_seed=None
):
    """``x·Wᵀ + bias + scale·(drop(x)·Aᵀ)·Bᵀ`` with a frozen dense ``w_dense`` (N, K).

    x: (..., K) fp32/fp16/bf16; A: (r, K); B: (N, r); bias: (N,) or None. Returns (..., N) in x's dtype.
    ``dropout`` (probability, applied whenever > 0) drops only the LoRA input; ``dropout_seed`` (int or
    0-dim tensor) fixes its mask (see :func:`dropout_mask`), else a seed is drawn from torch's generator.
    Gradients flow to x, A, B and bias, never to the base weight.
    """
    if _is_4bit(w_dense):
        raise TypeError("lora_linear takes a dense weight tensor; use lora_linear_nf4 for an NF4Weight")
    return _lora_call(x, w_dense, A, B, scale, bias, dropout, backend, dropout_seed)


def lora_linear_nf4(
    x,
    w: NF4Weight,
    A,
    B,
    scale: float,
    bias=None,
    dropout: float = 0.0,
    backend: str | None = None,
    *,
    dropout_seed=None,
):
    """:func:`lora_linear` with a frozen 4-bit base ``w`` (an :class:`NF4Weight` of shape (N, K))."""
    if not _is_4bit(w):
        raise TypeError(
            f"lora_linear_nf4 expects an NF4Weight, got {type(w).__name__}; use lora_linear for a dense weight"
        )
    return _lora_call(x, w, A, B, scale, bias, dropout, backend, dropout_seed)


def linear_nf4(x, w: NF4Weight, bias=None, backend: str | None = None):
    """``x·dequant(w)ᵀ + bias`` without a dense copy kept for the backward (dx re-dequantizes ``w``)."""
    if not _is_4bit(w):
        raise TypeError(f"linear_nf4 expects an NF4Weight, got {type(w).__name__}")
    return _lora_call(x, w, None, None, 0.0, bias, 0.0, backend, None)
