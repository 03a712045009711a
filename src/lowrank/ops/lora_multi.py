"""LoRA over several projections of one input (q/k/v, gate/up) and batched multi-adapter serving.

Built on :mod:`lowrank.ops.lora` (same backends, dropout and validation); see that module for the math.
``lora_linear_multi`` is ONE autograd node: x is read and saved once and the backward sums every
projection's dx into one fp32 buffer. ``lora_linear_multi_adapter`` is a forward for serving.
"""

from __future__ import annotations

import torch

from lowrank.ops.lora import (
    LORA,
    _check_projection,
    _check_tensor,
    _check_x_and_dropout,
    _is_4bit,
    _resolve,
    _seed_tensor,
    linear_nf4,
    lora_op_args,
)


def lora_linear_multi(x, projections, dropout: float = 0.0, backend: str | None = None, *, dropout_seed=None) -> tuple:
    """Several LoRA projections of one input (q/k/v, gate/up) in ONE autograd node.

    ``projections``: a sequence of ``(w, A, B, scale, bias)`` with ``w`` an NF4Weight or a dense tensor.
    x is read and saved once; in the backward the dx of every projection is summed into one fp32 buffer.
    With dropout each projection draws its own mask (seed + index), as PEFT's per-module dropout does.
    Returns a tuple of outputs (..., N_i) in x's dtype. (The op is :data:`lowrank.ops.lora.LORA`, the same
    one a single LoRA linear calls with one projection.)
    """
    _check_x_and_dropout(x, dropout)
    if not projections:
        raise ValueError("projections is empty; pass at least one (w, A, B, scale, bias)")
    outs = []
    for i, proj in enumerate(projections):
        if len(proj) != 5:
            raise ValueError(f"projections[{i}] must be (w, A, B, scale, bias), got {len(proj)} items")
        w, A, B, scale, bias = proj
        if A is None or B is None:
            raise ValueError(f"projections[{i}] has no adapter (A or B is None)")
        outs.append(_check_projection(x, w, A, B, scale, bias, index=f"[{i}]")[0])
    name = _resolve("lora", str(x.device), backend)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    outputs = LORA(**lora_op_args(x2d, projections, dropout, _seed_tensor(dropout, dropout_seed), name))
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
