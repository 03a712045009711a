"""LoRA linear ops: ``y = x·dequant(W)ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` with a frozen dense or 4-bit base.

Shapes: x ``(M, K)`` (leading batch dims are flattened by the public functions), W ``(N, K)`` dense or an
:class:`~lowrank.nf4.NF4Weight`, A ``(r, K)``, B ``(N, r)``, bias ``(N,)``; y ``(M, N)`` in x's dtype.

Backends (``torch`` | ``triton`` | ``ext``) implement two functions, registered with the dispatch point
under the op names ``"lora_forward"`` and ``"lora_backward"``::

    lora_forward(x, weight, A, B, scale, bias=None, dropout=None) -> (y, xa)      xa = x_lora·Aᵀ, fp32 (M, r)
    lora_backward(dy, x, weight, A, B, scale, xa, dropout=None, need_dx, need_dA, need_dB) -> (dx, dA, dB)
        dx = dy·W + s·keep⊙((dy·B)·A),  dA = s·(dy·B)ᵀ·x_lora,  dB = s·dyᵀ·xa

``dropout`` is a :class:`lowrank.kernels.dropout.Dropout` (p, seed) or None: x_lora = keep⊙x and
s = scale/(1-p), where keep is the counter-based mask of ``lowrank.kernels.dropout`` -- the same bits in
every backend, generated inside each backend where it reads x (the torch backend in row chunks), never
stored as (M, K). Autograd saves only what the caller already holds -- x, the packed weight (never a
dequantized copy), A, B, the bias -- plus xa (M·r fp32) and, with dropout, a 0-dim int64 seed. Dropout
follows PEFT (only the LoRA input is dropped); ``1/(1-p)`` is folded into the scale, so the mask is exact in
every dtype.
Every backward that needs W decodes it from the saved packed bytes: the triton backend either tile by tile
or, for large M, into a transient freed before it returns (``lowrank.kernels.lora_matmul.choose_backward_path``;
``LOWRANK_LORA_BACKWARD_PATH=fused|dequant``, read by the dispatch point, forces one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lowrank.kernels import dropout as D
from lowrank.kernels import lora_matmul as _LK
from lowrank.kernels import nf4 as K
from lowrank.nf4_format import FLOAT_DTYPES, QUANT_TYPES, TENSOR_FIELDS, NF4Weight
from lowrank.ops import dispatch
from lowrank.ops.dispatch import register
from lowrank.ops.spec import OpSpec, save, saved

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


def _kept_chunks(x: torch.Tensor, dropout):
    """(m0, m1, keep ⊙ x[m0:m1] in fp32) over row chunks of x (M, K): the mask exists one chunk at a time."""
    step = D.ref_chunk_rows(x.shape[1])
    for m0 in range(0, x.shape[0], step):
        m1 = min(m0 + step, x.shape[0])
        yield m0, m1, D.masked_rows_ref(x[m0:m1], dropout, m0, torch.float32)


@register("lora_forward", "torch")
def lora_forward_torch(x, weight, A, B, scale: float, bias=None, dropout=None):
    scale = D.lora_scale(scale, dropout)
    if dropout is None:
        xa = x.float() @ A.float().t()
    else:
        xa = torch.empty((x.shape[0], A.shape[0]), dtype=torch.float32, device=x.device)
        for m0, m1, kept in _kept_chunks(x, dropout):
            torch.mm(kept, A.float().t(), out=xa[m0:m1])
    base = x @ dense_weight(weight, x.dtype).t()
    y = base.float() + scale * (xa @ B.float().t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), xa


@register("lora_backward", "torch")
def lora_backward_torch(dy, x, weight, A, B, scale: float, xa, dropout=None, need_dx=True, need_dA=True, need_dB=True):
    scale = D.lora_scale(scale, dropout)
    dy32 = dy.float()
    dyb = scale * (dy32 @ B.float()) if (need_dx or need_dA) else None
    dx = dA = dB = None
    if need_dx:
        low = dyb @ A.float()
        if dropout is not None:
            step = D.ref_chunk_rows(x.shape[1])
            for m0 in range(0, x.shape[0], step):
                low[m0 : m0 + step] = D.masked_rows_ref(low[m0 : m0 + step], dropout, m0)
        dx = ((dy @ dense_weight(weight, dy.dtype)).float() + low).to(x.dtype)
    if need_dA:
        if dropout is None:
            dA = (dyb.t() @ x.float()).to(A.dtype)
        else:
            dA32 = torch.zeros(A.shape, dtype=torch.float32, device=x.device)
            for m0, m1, kept in _kept_chunks(x, dropout):
                dA32.addmm_(dyb[m0:m1].t(), kept)
            dA = dA32.to(A.dtype)
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


def dropout_mask(shape: Sequence[int], p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The bool keep-mask (True = kept, probability ``1 - p``) that dropout with ``seed`` applies to an input
    of ``shape`` (element index = position in the contiguous tensor; see ``lowrank.kernels.dropout``).

    The same bits on every device and backend; built here by the pure-torch generator.
    """
    shape = tuple(int(d) for d in shape)
    cols = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if shape else 1
    drop = D.Dropout.of(p, int(seed))
    if drop is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return D.dropout_mask_ref(rows, cols, drop, 0, device).reshape(shape)


def new_dropout_seed() -> torch.Tensor:
    """A fresh 0-dim int64 CPU seed drawn from torch's default generator (so ``torch.manual_seed`` fixes it)."""
    return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64)


def _dropout_of(p: float, seed: torch.Tensor | None, index: int = 0) -> D.Dropout | None:
    """The Dropout of projection ``index`` (seed + index: each projection has its own mask, like PEFT)."""
    if p == 0.0 or seed is None:
        return None
    return D.Dropout.of(p, int(seed.item()) + index)


# ---------------------------------------------------------------------------------------------------
# Weights at the op boundary. torch.library sees tensors and numbers, so a list of weights (dense tensors
# or NF4Weights) crosses as one Tensor[] per tensor field of NF4Weight (a dense weight travels as
# `packed`; an absent tensor as an empty one) plus, per weight, its shape, blocksize, quant type and
# nested dtype as ints. Both directions follow NF4Weight's field list (nf4_format.TENSOR_FIELDS).
# ---------------------------------------------------------------------------------------------------

_DENSE = -1  # quant-type code of a dense weight
WEIGHT_ARGS = (
    *((f"w_{field}", "Tensor[]") for field in TENSOR_FIELDS),
    ("w_shape", "int[]"),
    ("w_blocksize", "int[]"),
    ("w_quant_type", "int[]"),
    ("w_nested_dtype", "int[]"),
)


def _weights_to_args(ws, empty: torch.Tensor) -> dict:
    args = {name: [] for name, _ in WEIGHT_ARGS}
    for w in ws:
        quantized = _is_4bit(w)
        for field in TENSOR_FIELDS:
            t = getattr(w, field) if quantized else (w if field == "packed" else None)
            args[f"w_{field}"].append(empty if t is None else t)
        args["w_shape"] += [int(d) for d in w.shape]
        args["w_blocksize"].append(w.blocksize if quantized else 0)
        args["w_quant_type"].append(QUANT_TYPES.index(w.quant_type) if quantized else _DENSE)
        args["w_nested_dtype"].append(FLOAT_DTYPES.index(w.nested_dtype) if quantized else 0)
    return args


def _present(t: torch.Tensor) -> torch.Tensor | None:
    """None for the empty stand-in of a missing tensor in the ops' tensor lists."""
    return None if t.numel() == 0 else t


def _weights_from_args(args, dtype: torch.dtype) -> list:
    ws = []
    for i, kind in enumerate(args.w_quant_type):
        if kind == _DENSE:
            ws.append(args.w_packed[i])
            continue
        tensors = {field: _present(getattr(args, f"w_{field}")[i]) for field in TENSOR_FIELDS}
        ws.append(
            NF4Weight.trusted(
                **tensors,
                shape=args.w_shape[2 * i : 2 * i + 2],
                dtype=dtype,
                blocksize=args.w_blocksize[i],
                quant_type=QUANT_TYPES[kind],
                nested_dtype=FLOAT_DTYPES[args.w_nested_dtype[i]],
            )
        )
    return ws


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
    drop = _dropout_of(dropout, seed, index)
    return dispatch.implementation("lora_forward", backend)(x, w, A, B, scale, bias, drop)


def _backward_one(dy, x, w, A, B, scale, xa, dropout, seed, index, need_dx, need_dA, need_dB, backend):
    """(dx or None, dA, dB) for one projection; dx is in x's dtype."""
    if A is None:
        if isinstance(w, torch.Tensor):
            dense = w.to(dy.dtype)
        else:
            dense = _dequantize(w, dy.dtype, backend)
        return (dy @ dense) if need_dx else None, None, None
    impl = dispatch.implementation("lora_backward", backend)
    return impl(dy, x, w, A, B, scale, xa, _dropout_of(dropout, seed, index), need_dx, need_dA, need_dB)


# ---------------------------------------------------------------------------------------------------
# The torch.library ops: ONE family for one or several projections of the same input x (q/k/v, gate/up;
# a single LoRA linear is the case n = 1). Per projection i: weight i, A[i], B[i] (empty: base only),
# scale[i], bias[i] (empty: none). The backward op is derived from the forward op's arguments.
# ---------------------------------------------------------------------------------------------------

LORA = OpSpec(
    "lowrank::lora_linear",
    [
        ("x", "Tensor"),
        *WEIGHT_ARGS,
        ("A", "Tensor[]"),
        ("B", "Tensor[]"),
        ("scale", "float[]"),
        ("bias", "Tensor[]"),
        ("dropout", "float"),
        ("seed", "Tensor?"),
        ("backend", "str"),
    ],
    returns="Tensor[]",  # [y_0 .. y_{n-1}, xa_0 .. xa_{n-1}]; xa (M, r) fp32 is saved, not differentiable
)
LORA_BACKWARD = LORA.derive(
    "lowrank::lora_linear_backward",
    before=[("dy", "Tensor[]")],
    drop=("bias",),
    after=[("xa", "Tensor[]"), ("need_dx", "bool"), ("need_dA", "bool[]"), ("need_dB", "bool[]")],
    returns="Tensor[]",  # [dx, dA_0 .., dB_0 ..]; a gradient that is not needed is an empty tensor
)


def _lora_forward(a):
    ys, xas = [], []
    for i, w in enumerate(_weights_from_args(a, a.x.dtype)):
        y, xa = _forward_one(
            a.x, w, _present(a.A[i]), _present(a.B[i]), a.scale[i], _present(a.bias[i]), a.dropout, a.seed, i, a.backend
        )
        ys.append(y)
        xas.append(xa)
    return ys + xas


def _lora_forward_fake(a):
    M = a.x.shape[0]
    ys = [a.x.new_empty((M, a.w_shape[2 * i])) for i in range(len(a.A))]
    return ys + [a.x.new_empty((M, A.shape[0] if A.numel() else 0), dtype=torch.float32) for A in a.A]


def _lora_backward(a):
    x = a.x
    empty = x.new_empty((0,))
    dx_sum, dAs, dBs = None, [], []
    for i, w in enumerate(_weights_from_args(a, x.dtype)):
        A, B = _present(a.A[i]), _present(a.B[i])
        dx, dA, dB = _backward_one(
            a.dy[i].contiguous(),
            x,
            w,
            A,
            B,
            a.scale[i],
            a.xa[i],
            a.dropout,
            a.seed,
            i,
            a.need_dx,
            A is not None and a.need_dA[i],
            B is not None and a.need_dB[i],
            a.backend,
        )
        if a.need_dx:  # several projections: every dx summed in ONE fp32 buffer
            dx_sum = dx if len(a.A) == 1 else (dx.float() if dx_sum is None else dx_sum.add_(dx))
        dAs.append(empty.clone() if dA is None else dA)
        dBs.append(empty.clone() if dB is None else dB)
    dx = dx_sum.to(x.dtype) if a.need_dx else empty.clone()
    return [dx, *dAs, *dBs]


def _lora_backward_fake(a):
    x = a.x
    empty = x.new_empty((0,))
    dAs = [torch.empty_like(A) if need and A.numel() else empty.clone() for A, need in zip(a.A, a.need_dA, strict=True)]
    dBs = [torch.empty_like(B) if need and B.numel() else empty.clone() for B, need in zip(a.B, a.need_dB, strict=True)]
    return [torch.empty_like(x) if a.need_dx else empty.clone(), *dAs, *dBs]


LORA.define(_lora_forward, _lora_forward_fake)
LORA_BACKWARD.define(_lora_backward, _lora_backward_fake)
_WEIGHT_TENSORS = tuple(f"w_{field}" for field in TENSOR_FIELDS)
_WEIGHT_META = tuple(name for name, _ in WEIGHT_ARGS if name not in _WEIGHT_TENSORS)


def _lora_setup(ctx, a, output):
    n = len(a.A)
    save(ctx, x=a.x, seed=a.seed, A=a.A, B=a.B, xa=output[n:], **{name: getattr(a, name) for name in _WEIGHT_TENSORS})
    ctx.args = {name: getattr(a, name) for name in (*_WEIGHT_META, "scale", "dropout", "backend")}
    ctx.need = ([A.requires_grad for A in a.A], [B.requires_grad for B in a.B])
    ctx.bias_grad = [b.dtype if b.numel() and b.requires_grad else None for b in a.bias]
    ctx.mark_non_differentiable(*output[n:])


def _lora_autograd_backward(ctx, grads):
    kept = saved(ctx)
    x, n = kept["x"], len(kept["A"])
    # An output that did not reach the loss gets no gradient: it contributes zero.
    dys = [
        torch.zeros((x.shape[0], ctx.args["w_shape"][2 * i]), dtype=x.dtype, device=x.device) if g is None else g
        for i, g in enumerate(grads[:n])
    ]
    need_dA, need_dB = ctx.need
    need_dx = ctx.needs_input_grad[0]
    out = LORA_BACKWARD(dy=dys, need_dx=need_dx, need_dA=need_dA, need_dB=need_dB, **kept, **ctx.args)
    return {
        "x": out[0] if need_dx else None,
        "A": [g if need else None for g, need in zip(out[1 : 1 + n], need_dA, strict=True)],
        "B": [g if need else None for g, need in zip(out[1 + n :], need_dB, strict=True)],
        "bias": [
            None if dt is None else dys[i].sum(0, dtype=torch.float32).to(dt) for i, dt in enumerate(ctx.bias_grad)
        ],
    }


LORA.register_autograd(_lora_setup, _lora_autograd_backward)


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
    D.check_p(dropout)


def _seed_tensor(dropout: float, dropout_seed) -> torch.Tensor | None:
    if dropout == 0.0:
        return None
    if dropout_seed is None:
        return new_dropout_seed()
    if isinstance(dropout_seed, torch.Tensor):
        return dropout_seed.reshape(()).to(device="cpu", dtype=torch.int64)
    return torch.tensor(int(dropout_seed), dtype=torch.int64)


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


def lora_op_args(x2d, projections, dropout: float, seed, backend: str) -> dict:
    """The named arguments of :data:`LORA` for validated ``projections`` of ``(w, A, B, scale, bias)`` (A, B,
    bias may be None) of a 2-D ``x2d``, with ``backend`` resolved."""
    empty = x2d.new_empty((0,))
    args = _weights_to_args([p[0] for p in projections], empty)
    args.update(
        x=x2d,
        A=[empty if p[1] is None else p[1] for p in projections],
        B=[empty if p[2] is None else p[2] for p in projections],
        scale=[float(p[3]) for p in projections],
        bias=[empty if p[4] is None else p[4] for p in projections],
        dropout=float(dropout),
        seed=seed,
        backend=backend,
    )
    return args


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
    y, _ = LORA(**lora_op_args(x2d, [(w, A, B, scale, bias)], dropout, seed, name))
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
