"""NF4 quantize / dequantize throughput on real weight shapes, against the reference, torch.compile and bitsandbytes.

Memory-bound: the figure of merit is GB/s and its fraction of the measured copy bandwidth.
Bytes moved per weight element (blocksize 64): dequantize reads 0.5 B codes + 1/64 B uint8 absmax +
4/(64·256) B nested absmax (double quant; 4/64 B fp32 absmax without) and writes 2 B of bf16;
quantize reads 2 B of bf16 and writes the same 0.516 (0.5625) B. 4096x14336 dequantize moves 147.7 MB.

Goal on H100 (docs/bench.md, "Where the goals come from"): NF4 + double quant → bf16 dequantize at ≥ 80 % of
copy bandwidth: 4096x14336 ≤ 55 µs, 8192x28672 ≤ 220 µs (bitsandbytes ≈ 151 µs at 4096x14336).

Providers: ``triton`` (lowrank.nf4 public API, backend="triton"), ``torch`` (same API, backend="torch":
the reference), ``ext`` (same API, backend="ext": the C++ extension's kernels -- CUDA ones when built
with them; its quantize runs on CPU only), ``torch_compiled`` (``torch.compile(dynamic=True)`` of the reference
functions, called directly because the public op is opaque to the compiler), ``bitsandbytes`` (``bnb.functional``).
The public API's ``quantize`` also checks that the input is finite (one more read and a host sync): that is
part of what a user pays, and it is in the lowrank figures.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from _harness import (
    BLOCKSIZE,
    DEVICE,
    DTYPE,
    NF4_GOAL_SHAPES,
    NF4_SHAPES,
    SHAPES,
    SUITE,
    nf4_weight_bytes,
    optional_module,
    skip_reason,
)
from lowrank.kernels import nf4 as K

import lowrank.nf4


def _cases() -> list:
    """Run order: lowrank and bitsandbytes on every case first, then eager, then compiled (cold compiles are slow;
    a time-boxed run loses the tail, never the goal figures)."""
    shapes = NF4_GOAL_SHAPES if SUITE == "goal" else NF4_SHAPES
    tiers = (("triton", "bitsandbytes", "ext"), ("torch",), ("torch_compiled",))
    cases = []
    for providers in tiers:
        for op in ("dequantize", "quantize"):
            for shape in shapes:
                for double_quant in (True, False):
                    for provider in providers:
                        case_id = f"{op}-{shape}-{'dq' if double_quant else 'nodq'}-{provider}"
                        cases.append(pytest.param(op, shape, double_quant, provider, id=case_id))
    return cases


@functools.cache
def _compiled_reference(op: str, double_quant: bool):
    """``torch.compile`` of the pure-torch reference; one compilation serves every shape (dynamic=True)."""
    if op == "dequantize":

        def dequantize_flat(packed, absmax, nested_absmax, nested_offset, numel: int):
            if double_quant:
                absmax = K.double_dequantize_ref(absmax, nested_absmax, nested_offset)
            return K.dequantize_4bit_ref(packed, absmax, (numel,), DTYPE, BLOCKSIZE, "nf4")

        return torch.compile(dequantize_flat, dynamic=True)

    def quantize_flat(w_flat):
        packed, absmax = K.quantize_4bit_ref(w_flat, BLOCKSIZE, "nf4")
        if double_quant:
            return (packed, *K.double_quantize_ref(absmax))
        return packed, absmax

    return torch.compile(quantize_flat, dynamic=True)


def _random_weight(shape_name: str) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(SHAPES[shape_name].weight_shape, device=DEVICE, dtype=DTYPE)


@pytest.mark.parametrize("op, shape_name, double_quant, provider", _cases())
def test_nf4(bench, op: str, shape_name: str, double_quant: bool, provider: str) -> None:
    reason = skip_reason(provider)
    if provider == "ext" and op == "quantize" and not reason and torch.device(DEVICE).type != "cpu":
        reason = "the extension quantizes on CPU only"
    if reason:
        pytest.skip(f"{provider}: {reason}")
    w = _random_weight(shape_name)
    numel = w.numel()
    quantized_bytes = nf4_weight_bytes(numel, double_quant)
    case = {"shape": SHAPES[shape_name].label, "double_quant": double_quant, "dtype": "bf16"}
    if op == "dequantize":
        fn, check = _dequantize_fn(provider, w, double_quant)
        bytes_moved = quantized_bytes + numel * w.element_size()
    else:
        fn, check = _quantize_fn(provider, w, double_quant)
        bytes_moved = numel * w.element_size() + quantized_bytes
    extra = {"matches_reference": check()} if check is not None else {}
    bench.run(
        fn,
        op=f"nf4_{op}",
        case=case,
        provider=provider,
        bytes_moved=bytes_moved,
        # the row the others are compared with: Triton on a GPU, the extension on a CPU
        ours=provider == ("triton" if torch.device(DEVICE).type == "cuda" else "ext"),
        extra=extra,
    )


def _dequantize_fn(provider: str, w: torch.Tensor, double_quant: bool):
    """The timed callable and, for lowrank's own providers, a bit-exactness check against the reference."""
    if provider == "bitsandbytes":
        functional = optional_module("bitsandbytes.functional")[0]
        packed, state = functional.quantize_4bit(
            w, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type="nf4"
        )
        return (lambda: functional.dequantize_4bit(packed, state)), None
    qw = lowrank.nf4.quantize(w, blocksize=BLOCKSIZE, double_quant=double_quant)
    if provider == "torch":
        return (lambda: lowrank.nf4.dequantize(qw, DTYPE, backend="torch")), None
    reference = lowrank.nf4.dequantize(qw, DTYPE, backend="torch")
    if provider == "torch_compiled":
        compiled = _compiled_reference("dequantize", double_quant)

        def fn():
            return compiled(qw.packed, qw.absmax, qw.nested_absmax, qw.nested_offset, qw.numel).view(qw.shape)

    else:
        backend = "ext" if provider == "ext" else "triton"

        def fn():
            return lowrank.nf4.dequantize(qw, DTYPE, backend=backend)

    return fn, lambda: bool(torch.equal(fn(), reference))


def _quantize_fn(provider: str, w: torch.Tensor, double_quant: bool):
    if provider == "bitsandbytes":
        functional = optional_module("bitsandbytes.functional")[0]
        return (
            lambda: functional.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type="nf4")
        ), None
    if provider == "torch":
        return (lambda: lowrank.nf4.quantize(w, BLOCKSIZE, double_quant, backend="torch")), None
    reference = lowrank.nf4.quantize(w, BLOCKSIZE, double_quant, backend="torch")
    if provider == "torch_compiled":
        compiled = _compiled_reference("quantize", double_quant)
        flat = w.reshape(-1)

        def fn():
            return compiled(flat)

        def check() -> bool:
            packed, absmax, *nested = fn()
            return bool(torch.equal(packed, reference.packed) and torch.equal(absmax, reference.absmax))

        return fn, check

    backend = "ext" if provider == "ext" else "triton"

    def fn():
        return lowrank.nf4.quantize(w, BLOCKSIZE, double_quant, backend=backend)

    def check() -> bool:
        got = fn()
        same = torch.equal(got.packed, reference.packed) and torch.equal(got.absmax, reference.absmax)
        if double_quant:
            same = same and torch.equal(got.nested_absmax, reference.nested_absmax)
        return bool(same)

    return fn, check


def test_bytes_model_matches_nf4weight() -> None:
    """The harness's byte count is the size of an actual NF4Weight (guards the GB/s figures)."""
    w = torch.randn(3, 1001)
    for double_quant in (True, False):
        qw = lowrank.nf4.quantize(w, BLOCKSIZE, double_quant, backend="torch")
        assert nf4_weight_bytes(w.numel(), double_quant) == qw.nbytes, (double_quant, qw.nbytes)
    assert math.isclose(nf4_weight_bytes(4096 * 14336) / (4096 * 14336), 0.51587, rel_tol=1e-4)
