"""Operand validation of the LoRA matmul launchers (``lora_matmul.lora_forward`` / ``lora_backward``).

The checked entry points call these once per call; the ops layer validates its operands itself and calls
the ``*_unchecked`` launchers. A bad operand raises a ValueError / TypeError naming the value and what was
expected, before anything is allocated or launched.
"""

from __future__ import annotations

import math
import numbers

import torch
from lowrank.kernels import dropout as _dropout
from lowrank.kernels import nf4 as _nf4

from lowrank.nf4_format import NF4Weight


def _weight_shape(weight) -> tuple[int, int]:
    if isinstance(weight, torch.Tensor):
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
        if weight.dtype not in _nf4.FLOAT_DTYPES:
            raise TypeError(f"a dense weight must be float32/float16/bfloat16, got {weight.dtype}")
        return tuple(weight.shape)
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be a dense tensor or an NF4Weight, got {type(weight).__name__}")
    shape = tuple(weight.shape)  # an NF4Weight was validated where it was built
    if len(shape) != 2:
        raise ValueError(f"a 4-bit weight must have a 2-D shape (N, K), got {shape}")
    return shape


def _check_path(path: str, paths: tuple[str, ...]) -> None:
    # The launchers do not choose: the caller names the path (lowrank.ops.dispatch chooses for the ops layer).
    if path not in paths:
        raise ValueError(f"path must be one of {paths}, got {path!r}")


def _weight_device(weight) -> torch.device:
    return weight.device if isinstance(weight, torch.Tensor) else weight.packed.device


def _check_device(device: torch.device) -> None:
    if not _nf4.HAS_TRITON:
        raise RuntimeError("the lora_matmul kernels need triton, which is not installed")
    if device.type in ("cuda", "cpu"):  # CPU tensors run in the Triton interpreter (TRITON_INTERPRET=1)
        return
    raise RuntimeError(f"the lora_matmul kernels need CUDA tensors (or CPU tensors in the interpreter), got {device}")


def _check_operands(x, weight, A, B, scale, bias=None, dropout=None):
    """Validate the forward operands (direct callers of the launchers); returns (M, N, K, r)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D (M, K) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _nf4.FLOAT_DTYPES:
        raise TypeError(f"x must be float32/float16/bfloat16, got {x.dtype}")
    N, K = _weight_shape(weight)
    M = x.shape[0]
    if x.shape[1] != K:
        raise ValueError(f"x has K = {x.shape[1]} columns but the weight is (N, K) = ({N}, {K})")
    for name, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in _nf4.FLOAT_DTYPES:
            raise TypeError(f"{name} must be a 2-D float32/float16/bfloat16 tensor, got {getattr(t, 'dtype', type(t))}")
    r = A.shape[0]
    if A.shape[1] != K:
        raise ValueError(f"A must be (r, K) = (r, {K}), got {tuple(A.shape)}")
    if tuple(B.shape) != (N, r):
        raise ValueError(f"B must be (N, r) = ({N}, {r}), got {tuple(B.shape)}")
    if not 1 <= r <= min(N, K):
        raise ValueError(f"rank r = {r} must be in [1, min(N, K) = {min(N, K)}]")
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,) or bias.dtype not in _nf4.FLOAT_DTYPES:
            raise ValueError(f"bias must be a float tensor of shape ({N},), got {getattr(bias, 'shape', bias)}")
    if dropout is not None and not isinstance(dropout, _dropout.Dropout):
        raise TypeError(f"dropout must be a lowrank.kernels.dropout.Dropout or None, got {type(dropout).__name__}")
    device = x.device
    tensors = {"weight": _weight_device(weight), "A": A.device, "B": B.device}
    if bias is not None:
        tensors["bias"] = bias.device
    wrong = {name: str(d) for name, d in tensors.items() if d != device}
    if wrong:
        raise ValueError(f"all operands must be on x's device {device}; got {wrong}")
    _check_device(device)
    return M, N, K, r


def _check_backward_operands(dy, xa, M: int, N: int, r: int, x, need_dB: bool) -> None:
    """Validate the backward's extra operands: dy (M, N) in x.dtype, and the forward's fp32 xa (M, r) for dB."""
    if not isinstance(dy, torch.Tensor) or tuple(dy.shape) != (M, N) or dy.dtype != x.dtype:
        raise ValueError(
            f"dy must be ({M}, {N}) in {x.dtype}, got {getattr(dy, 'shape', dy)} {getattr(dy, 'dtype', '')}"
        )
    if need_dB and (not isinstance(xa, torch.Tensor) or tuple(xa.shape) != (M, r) or xa.dtype != torch.float32):
        raise ValueError(f"xa must be the forward's fp32 ({M}, {r}) tensor, got {getattr(xa, 'shape', xa)}")
    for name, t in (("dy", dy), ("xa", xa)):
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
