"""LoRA over several projections of one input (q/k/v, gate/up) and batched multi-adapter serving.

Built on :mod:`lowrank.ops.lora` (same backends, dropout and validation); see that module for the math.
``lora_linear_multi`` is ONE autograd node: x is read and saved once and the backward sums every
projection's dx into one fp32 buffer. ``lora_linear_multi_adapter`` is a forward for serving.
"""

from __future__ import annotations

import torch

from lowrank.dtypes import DTYPES_BY_NAME
from lowrank.ops.lora import (
    _backward_one,
    _check_projection,
    _check_tensor,
    _check_x_and_dropout,
    _forward_one,
    _is_4bit,
    _resolve,
    _seed_tensor,
    _weight_fields,
    _weight_object,
    linear_nf4,
)

# ---------------------------------------------------------------------------------------------------
# torch.library ops
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("lowrank::lora_linear_multi", mutates_args=())
def lora_linear_multi_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    absmaxes: list[torch.Tensor],
    nested_absmaxes: list[torch.Tensor],
    nested_offsets: list[torch.Tensor],
    shapes: list[int],
    blocksizes: list[int],
    quant_types: str,
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    scales: list[float],
    biases: list[torch.Tensor],
    dropout: float,
    seed: torch.Tensor | None,
    backend: str,
) -> list[torch.Tensor]:
    """Several projections of one x: returns ``[y_0, ..., y_{n-1}, xa_0, ..., xa_{n-1}]``.

    Lists of tensors hold an empty tensor where a projection has none (no bias, a dense weight's absmax):
    torch.library's autograd wants lists of tensors without None. ``shapes`` is flattened (two ints per
    projection); ``quant_types`` holds ``"<quant_type>:<nested dtype>"``
    per projection, comma-separated (``"none:none"`` for a dense weight).
    """
    ys, xas = [], []
    for i, w in enumerate(
        _weight_objects(x, weights, absmaxes, nested_absmaxes, nested_offsets, shapes, blocksizes, quant_types)
    ):
        y, xa = _forward_one(x, w, As[i], Bs[i], scales[i], _present(biases[i]), dropout, seed, i, backend)
        ys.append(y)
        xas.append(xa)
    return ys + xas


@lora_linear_multi_op.register_fake
def _(
    x,
    weights,
    absmaxes,
    nested_absmaxes,
    nested_offsets,
    shapes,
    blocksizes,
    quant_types,
    As,
    Bs,
    scales,
    biases,
    dropout,
    seed,
    backend,
):
    ys = [x.new_empty((x.shape[0], shapes[2 * i])) for i in range(len(weights))]
    return ys + [x.new_empty((x.shape[0], A.shape[0]), dtype=torch.float32) for A in As]


def _present(t: torch.Tensor) -> torch.Tensor | None:
    """None for the empty stand-in of a missing tensor in the multi ops' tensor lists."""
    return None if t.numel() == 0 else t


def _weight_objects(x, weights, absmaxes, nested_absmaxes, nested_offsets, shapes, blocksizes, quant_types):
    kinds = [kind.split(":") for kind in quant_types.split(",")]
    return [
        _weight_object(
            w,
            _present(absmaxes[i]),
            _present(nested_absmaxes[i]),
            _present(nested_offsets[i]),
            shapes[2 * i : 2 * i + 2],
            blocksizes[i],
            kinds[i][0],
            DTYPES_BY_NAME.get(kinds[i][1], torch.float32),
            x.dtype,
        )
        for i, w in enumerate(weights)
    ]


@torch.library.custom_op("lowrank::lora_linear_multi_backward", mutates_args=())
def lora_linear_multi_backward_op(
    dys: list[torch.Tensor],
    x: torch.Tensor,
    weights: list[torch.Tensor],
    absmaxes: list[torch.Tensor],
    nested_absmaxes: list[torch.Tensor],
    nested_offsets: list[torch.Tensor],
    shapes: list[int],
    blocksizes: list[int],
    quant_types: str,
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    scales: list[float],
    xas: list[torch.Tensor],
    dropout: float,
    seed: torch.Tensor | None,
    need_dx: bool,
    need_dA: list[bool],
    need_dB: list[bool],
    backend: str,
) -> list[torch.Tensor]:
    """``[dx, dA_0.., dB_0..]``: dx summed over the projections in ONE fp32 buffer; unneeded grads are empty."""
    ws = _weight_objects(x, weights, absmaxes, nested_absmaxes, nested_offsets, shapes, blocksizes, quant_types)
    dx_sum = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_dx else None
    dAs, dBs = [], []
    empty = x.new_empty((0,))
    for i, w in enumerate(ws):
        dx, dA, dB = _backward_one(
            dys[i].contiguous(),
            x,
            w,
            As[i],
            Bs[i],
            scales[i],
            xas[i],
            dropout,
            seed,
            i,
            need_dx,
            need_dA[i],
            need_dB[i],
            backend,
        )
        if need_dx:
            dx_sum += dx
        dAs.append(dA if dA is not None else empty.clone())
        dBs.append(dB if dB is not None else empty.clone())
    return [dx_sum.to(x.dtype) if need_dx else empty.clone()] + dAs + dBs


@lora_linear_multi_backward_op.register_fake
def _(
    dys,
    x,
    weights,
    absmaxes,
    nested_absmaxes,
    nested_offsets,
    shapes,
    blocksizes,
    quant_types,
    As,
    Bs,
    scales,
    xas,
    dropout,
    seed,
    need_dx,
    need_dA,
    need_dB,
    backend,
):
    empty = x.new_empty((0,))
    dAs = [torch.empty_like(A) if need else empty.clone() for A, need in zip(As, need_dA, strict=True)]
    dBs = [torch.empty_like(B) if need else empty.clone() for B, need in zip(Bs, need_dB, strict=True)]
    return [torch.empty_like(x) if need_dx else empty.clone()] + dAs + dBs


def _lora_multi_setup(ctx, inputs, output):
    (
        x,
        weights,
        absmaxes,
        nested_absmaxes,
        nested_offsets,
        shapes,
        blocksizes,
        quant_types,
        As,
        Bs,
        scales,
        biases,
        dropout,
        seed,
        backend,
    ) = inputs
    n = len(weights)
    ctx.n = n
    ctx.save_for_backward(x, seed, *weights, *absmaxes, *nested_absmaxes, *nested_offsets, *As, *Bs, *output[n:])
    ctx.meta = (list(shapes), list(blocksizes), quant_types, list(scales), dropout, backend)
    ctx.need = ([A.requires_grad for A in As], [B.requires_grad for B in Bs])
    ctx.bias_grad = [None if b.numel() == 0 or not b.requires_grad else b.dtype for b in biases]
    ctx.mark_non_differentiable(*output[n:])


def _lora_multi_backward(ctx, grads):
    n = ctx.n
    x, seed, *rest = ctx.saved_tensors
    weights, absmaxes, nested_absmaxes, nested_offsets, As, Bs, xas = (
        list(rest[i * n : (i + 1) * n]) for i in range(7)
    )
    shapes, blocksizes, quant_types, scales, dropout, backend = ctx.meta
    need_dA, need_dB = ctx.need
    need_dx = ctx.needs_input_grad[0]
    # An output that did not reach the loss gets no gradient: it contributes zero.
    dys = [
        torch.zeros((x.shape[0], shapes[2 * i]), dtype=x.dtype, device=x.device) if dy is None else dy
        for i, dy in enumerate(grads[:n])
    ]
    dx_and_adapter_grads = lora_linear_multi_backward_op(
        dys,
        x,
        weights,
        absmaxes,
        nested_absmaxes,
        nested_offsets,
        shapes,
        blocksizes,
        quant_types,
        As,
        Bs,
        scales,
        xas,
        dropout,
        seed,
        need_dx,
        need_dA,
        need_dB,
        backend,
    )
    dAs = [g if need else None for g, need in zip(dx_and_adapter_grads[1 : 1 + n], need_dA, strict=True)]
    dBs = [g if need else None for g, need in zip(dx_and_adapter_grads[1 + n :], need_dB, strict=True)]
    dbiases = [None if dt is None else dys[i].sum(0, dtype=torch.float32).to(dt) for i, dt in enumerate(ctx.bias_grad)]
    dx = dx_and_adapter_grads[0] if need_dx else None
    nones = [None] * n
    # Gradients mirror the input structure: one entry per element of each list of tensors.
    return (dx, nones, nones, nones, nones, None, None, None, dAs, dBs, None, dbiases, None, None, None)


lora_linear_multi_op.register_autograd(_lora_multi_backward, setup_context=_lora_multi_setup)


# ---------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------


def lora_linear_multi(x, projections, dropout: float = 0.0, backend: str | None = None, *, dropout_seed=None) -> tuple:
    """Several LoRA projections of one input (q/k/v, gate/up) in ONE autograd node.

    ``projections``: a sequence of ``(w, A, B, scale, bias)`` with ``w`` an NF4Weight or a dense tensor.
    x is read and saved once; in the backward the dx of every projection is summed into one fp32 buffer.
    With dropout each projection draws its own mask (seed + index), as PEFT's per-module dropout does.
    Returns a tuple of outputs (..., N_i) in x's dtype.
    """
    _check_x_and_dropout(x, dropout)
    if not projections:
        raise ValueError("projections is empty; pass at least one (w, A, B, scale, bias)")
    fields = [[] for _ in range(8)]
    As, Bs, scales, biases, outs = [], [], [], [], []
    for i, proj in enumerate(projections):
        if len(proj) != 5:
            raise ValueError(f"projections[{i}] must be (w, A, B, scale, bias), got {len(proj)} items")
        w, A, B, scale, bias = proj
        if A is None or B is None:
            raise ValueError(f"projections[{i}] has no adapter (A or B is None)")
        n_out, k_in = _check_projection(x, w, A, B, scale, bias, index=f"[{i}]")
        for store, value in zip(fields, _weight_fields(w), strict=True):
            store.append(x.new_empty((0,)) if value is None else value)
        As.append(A)
        Bs.append(B)
        scales.append(float(scale))
        biases.append(x.new_empty((0,)) if bias is None else bias)
        outs.append(n_out)
    name = _resolve("lora", str(x.device), backend)
    weights, absmaxes, nested_absmaxes, nested_offsets, shapes, blocksizes, quant_types, nested_dtypes = fields
    kinds = ",".join(
        f"{qt}:{str(nd).removeprefix('torch.')}" for qt, nd in zip(quant_types, nested_dtypes, strict=True)
    )
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    flat_shapes = [s for shape in shapes for s in shape]
    outputs = lora_linear_multi_op(
        x2d,
        weights,
        absmaxes,
        nested_absmaxes,
        nested_offsets,
        flat_shapes,
        blocksizes,
        kinds,
        As,
        Bs,
        scales,
        biases,
        float(dropout),
        _seed_tensor(dropout, dropout_seed),
        name,
    )
    return tuple(y.reshape(*lead, n) for y, n in zip(outputs[: len(outs)], outs, strict=True))


@torch.no_grad()
def lora_linear_multi_adapter(
    x, w, A_stack, B_stack, scales, adapter_ids, bias=None, backend: str | None = None
) -> torch.Tensor:
    """Serving forward: each sequence of a batch uses its own adapter (no autograd).

    x: (batch, seq, K); w: NF4Weight or dense (N, K); A_stack: (n_adapters, r, K); B_stack: (n_adapters, N, r);
    scales: (n_adapters,) tensor or sequence; adapter_ids: (batch,) int, ``-1`` = base model only.
    The base matmul runs once for the whole batch; the LoRA term is a gathered batched matmul (fp32).
    Returns (batch, seq, N) in x's dtype.
    """
    _check_x_and_dropout(x, 0.0)
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, seq, in), got shape {tuple(x.shape)}")
    n_out, k_in = _check_projection(x, w, None, None, 0.0, bias)
    _check_tensor(A_stack, "A_stack", 3, x.device)
    _check_tensor(B_stack, "B_stack", 3, x.device)
    n_adapters, r = A_stack.shape[:2]
    if A_stack.shape != (n_adapters, r, k_in) or B_stack.shape != (n_adapters, n_out, r) or r < 1:
        raise ValueError(
            f"A_stack must be (n_adapters, r, {k_in}) and B_stack (n_adapters, {n_out}, r) with r >= 1; "
            f"got {tuple(A_stack.shape)} and {tuple(B_stack.shape)}"
        )
    scales = torch.as_tensor(scales, dtype=torch.float32, device=x.device).reshape(-1)
    if scales.numel() != n_adapters:
        raise ValueError(f"scales must have one entry per adapter ({n_adapters}), got {scales.numel()}")
    ids = torch.as_tensor(adapter_ids, device=x.device)
    if ids.dtype.is_floating_point or ids.shape != (x.shape[0],):
        raise ValueError(
            f"adapter_ids must be integers of shape ({x.shape[0]},) (one per sequence), "
            f"got {ids.dtype} {tuple(ids.shape)}"
        )
    if bool(((ids < -1) | (ids >= n_adapters)).any()):
        raise ValueError(f"adapter_ids must be in [-1, {n_adapters - 1}] (-1 = no adapter), got {ids.tolist()}")
    if _is_4bit(w):
        y = linear_nf4(x, w, bias, backend=backend)
    else:
        y = torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    has = ids >= 0
    safe = ids.clamp(min=0)
    xa = torch.bmm(x.float(), A_stack[safe].float().transpose(1, 2))  # (batch, seq, r)
    lora = torch.bmm(xa, B_stack[safe].float().transpose(1, 2)) * (scales[safe] * has)[:, None, None]
    return (y.float() + lora).to(x.dtype)
