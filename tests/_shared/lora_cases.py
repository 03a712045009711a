"""Shared LoRA test problems for the extension's CPU and CUDA kernel tests (tests/lowrank/test_ext.py,
tests/csrc/test_cuda_ops.py): the weight kinds, a seeded problem, and the tolerance rule of tests/README.md."""

from __future__ import annotations

import torch
from lowrank.kernels import dropout as D

import lowrank

#: absolute slack of the tolerance rule, per compute dtype
ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
#: the base-weight kinds: "<quant_type>[-dq]-<blocksize>", a transformers-written bf16 nested state, or dense
WEIGHTS = ["nf4-dq-64", "fp4-128", "nf4-dq-bf16-nested", "dense"]


def make_weight(kind: str, w: torch.Tensor, device: torch.device | str = "cpu"):
    """(weight argument on ``device``, its exact fp32 value on the CPU)."""
    if kind == "dense":
        return w.to(device), w.float()
    quant_type, *flags, blocksize = kind.split("-")
    qw = lowrank.quantize(
        w,
        blocksize=64 if blocksize == "nested" else int(blocksize),
        double_quant="dq" in flags,
        quant_type=quant_type,
        backend="torch",
    )
    if blocksize == "nested":  # a transformers-written state: constants reconstructed in bf16
        qw = lowrank.NF4Weight(
            qw.packed,
            qw.absmax,
            qw.shape,
            qw.dtype,
            qw.blocksize,
            qw.quant_type,
            qw.nested_absmax,
            qw.nested_offset,
            nested_dtype=torch.bfloat16,
        )
    return qw.to(device), lowrank.dequantize(qw, torch.float32, backend="torch")


def lora_problem(M, K, N, r, dtype, lora_dtype, seed):
    """CPU tensors: x, the dense weight to quantize, A, B, bias, a Dropout (p 0.2, seeded) of the LoRA input, dy."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * std).to(dt)

    x = randn(M, K)
    w = randn(N, K, std=K**-0.5)
    A = randn(r, K, std=K**-0.5, dt=lora_dtype)
    B = randn(N, r, std=0.5, dt=lora_dtype)
    bias = randn(N, std=0.1)
    dropout = D.Dropout(0.2, 1000 + seed)
    dy = randn(M, N)
    return x, w, A, B, bias, dropout, dy


def kept(t: torch.Tensor, dropout) -> torch.Tensor:
    """keep ⊙ t with the reference mask (rows of t are rows of the (M, K) mask); t itself without dropout."""
    return t if dropout is None else D.masked_rows_ref(t.cpu(), dropout).to(t.device)


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.detach().cpu().double() - ref.double()).abs().max().item()


def check_rule(name, out, ref, low, dtype):
    """max|out - ref| <= 2 max|low - ref| + atol(dtype): as good as torch at the same precision."""
    assert out.dtype == low.dtype and tuple(out.shape) == tuple(ref.shape), f"{name}: {out.dtype}{tuple(out.shape)}"
    bound = 2 * max_err(low, ref) + ATOL[dtype]
    assert max_err(out, ref) <= bound, f"{name}: error {max_err(out, ref):.3g} > bound {bound:.3g}"


def check_partial_gradients(ext, x, weight, A, B, bias, dy, assert_bit_equal) -> None:
    """bf16 x with fp32 adapters: output dtypes, and every subset of (dx, dA, dB) asked of the extension's
    backward gives the bits of the full backward (``assert_bit_equal(got, ref, what)``)."""
    y, xa = ext.lora_forward(x, weight, A, B, 0.5, bias, None)
    assert y.dtype == torch.bfloat16 and tuple(y.shape) == (x.shape[0], B.shape[0]) and xa.dtype == torch.float32
    full = ext.lora_backward(dy, x, weight, A, B, 0.5, xa)
    assert [t.dtype for t in full] == [torch.bfloat16, torch.float32, torch.float32]
    for need in ((True, False, False), (False, True, False), (False, False, True), (False, True, True)):
        part = ext.lora_backward(dy, x, weight, A, B, 0.5, xa, None, *need)
        for wanted, got, ref in zip(need, part, full, strict=True):
            assert (got is None) != wanted
            if wanted:
                assert_bit_equal(got, ref, "partial gradient")
