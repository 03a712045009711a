"""The optional C++ extension (``lowrank._C`` via ``lowrank._ext``): bit-exact 4-bit kernels, fused LoRA
matmuls within the tolerance policy, opcheck on every registered op, and ``LOWRANK_DISABLE_EXT=1``.

Tests that need the extension skip when it is not built; CI builds it, so they run there.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    WEIGHTS,
    assert_bit_equal,
    assert_within_torch_error,
    check_partial_gradients,
    check_rule,
    kept,
    lora_problem,
    make_weight,
)
from helpers import sample_decades as sample
from lowrank.kernels import dropout as D
from lowrank.kernels import nf4 as K

import lowrank
from lowrank import _ext
from lowrank.ops import dispatch

EXT = _ext.load()
needs_ext = pytest.mark.skipif(EXT is None, reason=f"C++ extension unavailable: {_ext.load_error()}")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# Quantization: bit-exact against the references.
# ---------------------------------------------------------------------------------------------------

SHAPES = [(1,), (7,), (64,), (3, 129), (33, 96), (5, 7, 11), (2, 4097)]


@needs_ext
@pytest.mark.parametrize("quant_type", K.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", K.BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_and_double_quant_bit_exact(dtype, blocksize, quant_type):
    for i, shape in enumerate(SHAPES):
        x = sample(shape, dtype, seed=i + blocksize)
        packed, absmax = EXT.quantize_4bit(x, blocksize, quant_type)
        packed_ref, absmax_ref = K.quantize_4bit_ref(x, blocksize, quant_type)
        assert_bit_equal(packed, packed_ref, f"packed {shape}")
        assert_bit_equal(absmax, absmax_ref, f"absmax {shape}")
        for out, ref, name in zip(
            EXT.double_quantize(absmax),
            K.double_quantize_ref(absmax_ref),
            ("codes", "nested_absmax", "nested_offset"),
            strict=True,
        ):
            assert_bit_equal(out, ref, f"double quant {name} {shape}")


@needs_ext
@pytest.mark.parametrize("quant_type", K.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_dequantize_bit_exact(out_dtype, blocksize, quant_type):
    for i, shape in enumerate(SHAPES):
        x = sample(shape, torch.float32, seed=100 + i)
        packed, absmax = K.quantize_4bit_ref(x, blocksize, quant_type)
        out = EXT.dequantize_4bit(packed, absmax, None, None, shape, out_dtype, blocksize, quant_type)
        assert_bit_equal(
            out, K.dequantize_4bit_ref(packed, absmax, shape, out_dtype, blocksize, quant_type), f"plain {shape}"
        )
        q, a2, off = K.double_quantize_ref(absmax)
        for nested_dtype in DTYPES:
            constants = K.double_dequantize_ref(q, a2, off, nested_dtype)
            assert_bit_equal(EXT.double_dequantize(q, a2, off, nested_dtype), constants, f"constants {nested_dtype}")
            out = EXT.dequantize_4bit(packed, q, a2, off, shape, out_dtype, blocksize, quant_type, nested_dtype)
            ref = K.dequantize_4bit_ref(packed, constants, shape, out_dtype, blocksize, quant_type)
            assert_bit_equal(out, ref, f"double quant {shape} nested {nested_dtype}")


@needs_ext
@pytest.mark.parametrize("quant_type", K.QUANT_TYPES)
def test_ties_subnormals_and_zero_blocks(quant_type):
    # Values exactly on each threshold (block absmax 1.0, so s == x) go to the lower code; the next float
    # up goes to the upper one. Subnormal and all-zero blocks follow the reference's reciprocal clamp.
    mids = torch.tensor(K.thresholds(quant_type), dtype=torch.float32)
    above = torch.nextafter(mids, torch.full_like(mids, 2.0))
    ties = torch.cat([torch.tensor([1.0]), mids, above, torch.tensor([-1.0])])
    block = torch.nn.functional.pad(ties, (0, 64 - ties.numel()))
    subnormal = torch.full((64,), 1e-40) * torch.linspace(-1, 1, 64)
    x = torch.cat([block, subnormal, torch.zeros(64), torch.zeros(33)])
    packed, absmax = EXT.quantize_4bit(x, 64, quant_type)
    packed_ref, absmax_ref = K.quantize_4bit_ref(x, 64, quant_type)
    assert_bit_equal(packed, packed_ref, "packed")
    assert_bit_equal(absmax, absmax_ref, "absmax")
    # Nested: all constants equal (centred values all zero) and a single constant.
    for constants in (torch.full((300,), 0.5), torch.tensor([2.0])):
        for out, ref in zip(EXT.double_quantize(constants), K.double_quantize_ref(constants), strict=True):
            assert_bit_equal(out, ref, "nested")


@needs_ext
def test_quantize_non_contiguous_input_uses_logical_order():
    x = sample((96, 130), torch.bfloat16, seed=7).t()
    for out, ref in zip(EXT.quantize_4bit(x, 64, "nf4"), K.quantize_4bit_ref(x.contiguous(), 64, "nf4"), strict=True):
        assert_bit_equal(out, ref, "transposed input")


@needs_ext
def test_public_api_with_ext_matches_torch_backend():
    w = sample((48, 200), torch.bfloat16, seed=3)
    assert dispatch.resolve("quantize_4bit", "cpu") == "ext"
    q_ext = lowrank.quantize(w, backend="ext")
    q_torch = lowrank.quantize(w, backend="torch")
    for name, t in q_torch.tensors().items():
        assert_bit_equal(q_ext.tensors()[name], t, name)
    assert_bit_equal(
        lowrank.dequantize(q_ext, backend="ext"), lowrank.dequantize(q_torch, backend="torch"), "dequantize"
    )


@needs_ext
def test_bad_input_gives_clear_errors():
    x = torch.randn(128)
    with pytest.raises(ValueError, match="blocksize"):
        EXT.quantize_4bit(x, 48, "nf4")
    with pytest.raises(ValueError, match="quant_type"):
        EXT.quantize_4bit(x, 64, "int4")
    with pytest.raises(TypeError, match="dtype"):
        EXT.quantize_4bit(x.double(), 64, "nf4")
    packed, absmax = EXT.quantize_4bit(x, 64, "nf4")
    with pytest.raises(ValueError, match="packed"):
        EXT.dequantize_4bit(packed[:-1], absmax, None, None, (128,), torch.float32, 64, "nf4")
    # The raw ops check too, naming the value, when called without the Python wrapper.
    with pytest.raises(RuntimeError, match="blocksize must be one of .* got 48"):
        torch.ops.lowrank_ext.quantize_4bit(x, 48, "nf4")
    with pytest.raises(RuntimeError, match="absmax must be float32 with 2 entries"):
        torch.ops.lowrank_ext.dequantize_4bit(
            packed, absmax[:1], None, None, [128], torch.float32, 64, "nf4", torch.float32
        )
    with pytest.raises(RuntimeError, match="empty"):
        torch.ops.lowrank_ext.quantize_4bit(torch.empty(0), 64, "nf4")
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in DTYPES:
            y = torch.randn(300).to(dtype)
            y[200] = bad
            with pytest.raises(RuntimeError, match=r"non-finite values .* elements \[192, 256\)"):
                torch.ops.lowrank_ext.quantize_4bit(y, 64, "nf4")
            y = y[:250]  # now in the partial last block (the scalar path)
            with pytest.raises(RuntimeError, match=r"non-finite values .* elements \[192, 250\)"):
                torch.ops.lowrank_ext.quantize_4bit(y, 64, "nf4")


@needs_ext
def test_code_tables_match_the_references():
    # csrc/tables.h is generated from lowrank.kernels.nf4; decoding every code with scale 1 shows its values.
    codes = torch.arange(256, dtype=torch.uint8)
    ones = torch.ones(1)
    zero = torch.zeros(())
    assert_bit_equal(EXT.double_dequantize(codes, ones, zero), K.dynamic_map(), "dynamic map")
    for quant_type in K.QUANT_TYPES:
        packed = (torch.arange(16, dtype=torch.uint8) * 17).view(-1, 1)  # byte 0xcc holds code c twice
        out = EXT.dequantize_4bit(packed, torch.ones(1), None, None, (32,), torch.float32, 32, quant_type)
        assert_bit_equal(out[0::2], K.code_table(quant_type), quant_type)


# ---------------------------------------------------------------------------------------------------
# Registered ops: schema, fake tensors, autograd registration.
# ---------------------------------------------------------------------------------------------------


@needs_ext
def test_opcheck_quantization_ops():
    x = sample((40, 70), torch.bfloat16, seed=11)
    packed, absmax = EXT.quantize_4bit(x, 64, "nf4")
    q, a2, off = EXT.double_quantize(absmax)
    ops = torch.ops.lowrank_ext
    torch.library.opcheck(ops.quantize_4bit, (x, 64, "nf4"))
    torch.library.opcheck(ops.double_quantize, (absmax,))
    torch.library.opcheck(ops.double_dequantize, (q, a2, off, torch.bfloat16))
    torch.library.opcheck(ops.dequantize_4bit, (packed, q, a2, off, [40, 70], torch.float16, 64, "nf4", torch.float32))
    torch.library.opcheck(
        ops.dequantize_4bit, (packed, absmax, None, None, [40, 70], torch.float32, 64, "nf4", torch.float32)
    )
    out = torch.empty(40, 70, dtype=torch.bfloat16)
    torch.library.opcheck(ops.dequantize_4bit_out, (packed, q, a2, off, 64, "nf4", torch.float32, out))
    ops.dequantize_4bit_out(packed, q, a2, off, 64, "nf4", torch.float32, out)  # opcheck ran on copies
    expected = ops.dequantize_4bit(packed, q, a2, off, [40, 70], torch.bfloat16, 64, "nf4", torch.float32)
    assert_bit_equal(out, expected, "dequantize_4bit_out")
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        ops.dequantize_4bit_out(packed, q, a2, off, 64, "nf4", torch.float32, torch.empty(70, 40).t())
    with pytest.raises(
        RuntimeError, match="packed must be uint8 with 1420 bytes for 2840 elements, got Byte with 1400"
    ):
        ops.dequantize_4bit_out(packed, q, a2, off, 64, "nf4", torch.float32, torch.empty(40, 71))


# ---------------------------------------------------------------------------------------------------
# LOWRANK_DISABLE_EXT=1 (subprocess: the switch is read by a fresh interpreter).
# ---------------------------------------------------------------------------------------------------

_PORTABLE_SCRIPT = """
import torch, lowrank
from lowrank import _ext
from lowrank.kernels import nf4 as K
ext = _ext.load()
for shape, dtype in (((33, 96), torch.bfloat16), ((5, 7, 11), torch.float16), ((2, 4097), torch.float32)):
    x = torch.randn(shape).to(dtype)
    for quant_type in ("nf4", "fp4"):
        packed, absmax = ext.quantize_4bit(x, 64, quant_type)
        ref = K.quantize_4bit_ref(x, 64, quant_type)
        assert torch.equal(packed, ref[0]) and torch.equal(absmax, ref[1])
        q, a2, off = ext.double_quantize(absmax)
        assert all(torch.equal(a, b) for a, b in zip((q, a2, off), K.double_quantize_ref(absmax)))
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = ext.dequantize_4bit(packed, q, a2, off, shape, out_dtype, 64, quant_type)
            want = K.dequantize_4bit_ref(packed, K.double_dequantize_ref(q, a2, off), shape, out_dtype, 64, quant_type)
            assert torch.equal(out.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
print("ok")
"""


@needs_ext
def test_portable_paths_without_avx512_are_bit_exact():
    env = dict(os.environ, LOWRANK_EXT_NO_AVX512="1")
    result = subprocess.run(
        [sys.executable, "-c", _PORTABLE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


_DISABLED_SCRIPT = """
import torch, lowrank
from lowrank import _ext
from lowrank.ops import dispatch
assert _ext.load() is None and "LOWRANK_DISABLE_EXT" in _ext.load_error()
assert dispatch.resolve("quantize_4bit", "cpu") == "torch"
w = torch.randn(64, 96)
qw = lowrank.quantize(w)
assert lowrank.dequantize(qw).shape == (64, 96)
try:
    lowrank.quantize(w, backend="ext")
except dispatch.BackendUnavailableError as err:
    assert "LOWRANK_DISABLE_EXT" in str(err)
else:
    raise AssertionError("backend='ext' was honoured although the extension is disabled")
print("ok")
"""


def test_disable_switch_is_honoured_and_library_still_works():
    env = dict(os.environ, LOWRANK_DISABLE_EXT="1", TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", _DISABLED_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------
# Fused LoRA linear on a 4-bit (or dense) base: forward and backward within the tolerance policy.
# ---------------------------------------------------------------------------------------------------

# (M, K, N, r): N * K is not a multiple of the blocksize. With the default panel size these run as one
# panel; test_lora_with_tiny_panels_and_chunks reruns them with panels of 64 rows / slabs of 64 columns
# and row chunks of a few rows, so panels start in the middle of a quantization block.
LORA_SHAPES = [(1, 64, 96, 4), (3, 300, 130, 8), (67, 256, 300, 16), (300, 72, 40, 4)]


@needs_ext
@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lora_forward_backward_within_tolerance(shape, dtype, weight_kind):
    M, K, N, r = shape
    scale = 2.0
    use_bias = use_dropout = N != 96
    x, w, A, B, bias, dropout, dy = lora_problem(M, K, N, r, dtype, dtype, seed=M + N)
    weight, w32 = make_weight(weight_kind, w)
    bias = bias if use_bias else None
    dropout = dropout if use_dropout else None
    xl = kept(x, dropout)  # the reference mask: the kernels must drop exactly these elements

    y, xa = EXT.lora_forward(x, weight, A, B, scale, bias, dropout)
    dx, dA, dB = EXT.lora_backward(dy, x, weight, A, B, scale, xa, dropout)
    scale = D.lora_scale(scale, dropout)

    # fp64 reference from the exact dequantized weight (fp32 is not exact enough for the fp32 rows' dA)
    x64, xl64, A64, B64, dy64, w64 = (t.double() for t in (x, xl, A, B, dy, w32))
    xa64 = xl64 @ A64.t()
    y64 = x64 @ w64.t() + scale * xa64 @ B64.t() + (0 if bias is None else bias.double())
    g64 = dy64 @ B64
    dx64, dA64, dB64 = dy64 @ w64 + scale * kept(g64 @ A64, dropout), scale * g64.t() @ xl64, scale * dy64.t() @ xa64
    # torch at the same precision, PEFT-style: every matmul in dtype
    w_low = w32.to(dtype)
    xa_low = xl @ A.t()
    y_low = torch.nn.functional.linear(x, w_low, bias) + (xa_low @ B.t()) * scale
    g_low = (dy @ B) * scale
    dx_low, dA_low, dB_low = dy @ w_low + kept(g_low @ A, dropout), g_low.t() @ xl, (dy * scale).t() @ xa_low

    assert xa.dtype == torch.float32
    assert_within_torch_error(xa, xa_low, xa64, dtype, "xa")
    for name, out, ref, low in (
        ("y", y, y64, y_low),
        ("dx", dx, dx64, dx_low),
        ("dA", dA, dA64, dA_low),
        ("dB", dB, dB64, dB_low),
    ):
        check_rule(name, out, ref, low, dtype)


@needs_ext
def test_lora_fp32_adapters_on_bf16_input_and_partial_gradients():
    M, K, N, r = 5, 128, 200, 8
    x, w, A, B, bias, _, dy = lora_problem(M, K, N, r, torch.bfloat16, torch.float32, seed=1)
    weight, _ = make_weight("nf4-dq-64", w)
    check_partial_gradients(EXT, x, weight, A, B, bias, dy, assert_bit_equal)


def _rerun_in_fresh_process(selection: str, timeout: int, **env) -> str:
    """Run this file's tests matching ``-k selection`` in a new process with ``env`` added (the extension
    reads its settings once per process); returns pytest's output after checking that they all passed."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", __file__, "-k", selection],
        env=dict(os.environ, **env), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-500:]
    return result.stdout


@needs_ext
def test_lora_with_tiny_panels_and_chunks():
    """The tolerance tests again, in a fresh process whose panels are 64 rows/columns and row chunks a few
    rows: many panels and chunks per call, panels starting inside a quantization block."""
    _rerun_in_fresh_process(
        "within_tolerance or partial_gradients or opcheck_lora",
        600,
        LOWRANK_EXT_PANEL_BYTES="4096",
        LOWRANK_EXT_CHUNK_BYTES="1024",
    )


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_dense_forward_rounds_like_the_torch_composite(dtype):
    """On a dense base the forward is dtype(dtype(x W^T) + s (x A^T) B^T) bit for bit, as the torch
    composite computes it (the extension's own float32 <-> 16-bit row conversions replace torch's copy_
    and add_): random values, values far out of range of the dtype, and NaN/inf rows."""
    from lowrank.kernels.dropout import Dropout

    gen = torch.Generator().manual_seed(3)
    M, K, N, r = 37, 96, 83, 16  # N not a multiple of 16: the masked tail of every row
    x = torch.randn(M, K, generator=gen).to(dtype)
    x[3, 5], x[4, 7], x[5, 0] = float("nan"), float("inf"), -float("inf")
    w = torch.randn(N, K, generator=gen).to(dtype)
    A = torch.randn(r, K, generator=gen)
    B = torch.randn(N, r, generator=gen) * 1e3  # updates beyond float16's range in some rows
    y, xa = EXT.lora_forward(x, w, A, B, 2.0, None, Dropout.of(0.0, 0))
    update = (x.float() @ A.t() * 2.0) @ B.t()
    want = (x @ w.t()).add_(update)
    torch.testing.assert_close(xa, x.float() @ A.t(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)


@needs_ext
def test_lora_dense_forward_rounds_like_the_torch_composite_without_avx512():
    out = _rerun_in_fresh_process(
        "rounds_like_the_torch_composite and not without_avx512", 300, LOWRANK_EXT_NO_AVX512="1"
    )
    assert "2 passed" in out, out[-500:]


@needs_ext
def test_lora_concurrent_calls_from_threads_match_sequential_ones():
    """Each calling thread has its own scratch buffers: concurrent calls of different shapes give the
    bits of sequential ones."""
    problems = []
    for seed, (m, k, n, r) in enumerate([(33, 200, 150, 4), (5, 96, 300, 8), (70, 320, 64, 16)] * 2):
        x, w, A, B, bias, _, dy = lora_problem(m, k, n, r, torch.bfloat16, torch.float32, seed=seed)
        problems.append((x, make_weight("nf4-dq-64", w)[0], A, B, bias, dy))

    def step(problem):
        x, weight, A, B, bias, dy = problem
        y, xa = EXT.lora_forward(x, weight, A, B, 2.0, bias)
        return (y, xa, *EXT.lora_backward(dy, x, weight, A, B, 2.0, xa))

    sequential = [step(p) for p in problems]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        for _ in range(3):
            for got, want in zip(pool.map(step, problems), sequential, strict=True):
                for a, b in zip(got, want, strict=True):
                    assert_bit_equal(a, b, "concurrent LoRA call")


@needs_ext
def test_lora_dispatch_and_bad_shapes():
    assert dispatch.resolve("lora_forward", "cpu") == "ext"
    assert dispatch.resolve("lora_backward", "cpu") == "ext"
    x, w, A, B, *_ = lora_problem(4, 64, 32, 4, torch.float32, torch.float32, seed=2)
    weight, _ = make_weight("nf4-dq-64", w)
    with pytest.raises(ValueError, match=r"must have shape \(16, 64\) .* got \(32, 64\)"):
        EXT.lora_forward(x, weight, A, B[:16], 1.0)
    with pytest.raises(RuntimeError, match="A must have shape"):
        torch.ops.lowrank_ext.lora_forward(
            x, w, None, None, None, 64, "nf4", torch.float32, A[:, :32], B, 1.0, None, 0.0, 0
        )
    with pytest.raises(RuntimeError, match=r"dropout must be a probability in \[0, 1\), got 1"):
        torch.ops.lowrank_ext.lora_forward(x, w, None, None, None, 64, "nf4", torch.float32, A, B, 1.0, None, 1.0, 0)


@needs_ext
def test_opcheck_lora_ops():
    x, w, A, B, bias, dropout, dy = lora_problem(6, 64, 40, 4, torch.bfloat16, torch.float32, seed=3)
    qw, _ = make_weight("nf4-dq-64", w)
    quant = (qw.packed, qw.absmax, qw.nested_absmax, qw.nested_offset, 64, "nf4", torch.float32)
    dense = (w, None, None, None, 64, "nf4", torch.float32)
    ops = torch.ops.lowrank_ext
    for weight_args in (quant, dense):
        drop = (dropout.p, dropout.seed_int64)
        torch.library.opcheck(ops.lora_forward, (x, *weight_args, A, B, 2.0, bias, *drop))
        y, xa = ops.lora_forward(x, *weight_args, A, B, 2.0, bias, *drop)
        torch.library.opcheck(ops.lora_backward, (dy, x, *weight_args, A, B, 2.0, xa, *drop, True, True, True))
        torch.library.opcheck(ops.lora_backward, (dy, x, *weight_args, A, B, 2.0, xa, 0.0, 0, True, False, True))
