"""The CUDA kernels of the extension (csrc/cuda/) on a GPU: dequantization bit-exact against the torch
references, the LoRA forward/backward within the tolerance policy against an fp64 reference, clear errors,
opcheck, CUDA-graph capture. Needs a CUDA device, ``LOWRANK_TEST_GPU=1`` (``-m gpu``) and an extension built
with the CUDA kernels (``LOWRANK_BUILD_CUDA=1``, or bench/gpu/build_ext_cuda.py); otherwise every test skips.

With ``LOWRANK_TEST_CUDA_EMULATED=1`` the same tests run on the CPU against the CUDA sources built as host code
(tests/csrc/test_cuda_emulated.py sets this up; the few tests about devices and streams skip there).

References run on the CPU from the same inputs, so the comparison does not depend on torch's CUDA kernels.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from helpers import WEIGHTS, assert_bit_equal, assert_within_torch_error, check_partial_gradients, kept, lora_problem
from helpers import check_rule as shared_check_rule
from helpers import make_weight as shared_make_weight
from helpers import sample_decades as sample
from lowrank.kernels import dropout as D
from lowrank.kernels import nf4 as K

import lowrank
from lowrank import _ext
from lowrank.ops import dispatch
from lowrank.ops.lora import lora_backward_torch, lora_forward_torch

EXT = _ext.load()
EMULATED = os.environ.get("LOWRANK_TEST_CUDA_EMULATED") == "1"
if EMULATED:
    # The kernels are registered for the CPU by the emulated build; every "CUDA" tensor lives on the CPU.
    pytestmark = []
    CUDA = torch.device("cpu")
else:
    pytestmark = [
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        pytest.mark.skipif(
            not _ext.cuda_kernels_built(),
            reason=f"the extension has no CUDA kernels ({_ext.load_error() or 'built without LOWRANK_BUILD_CUDA=1'})",
        ),
    ]
    CUDA = torch.device("cuda")
needs_real_gpu = pytest.mark.skipif(EMULATED, reason="about devices or streams: not emulated")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dequantize_op(packed, absmax, nested_absmax, nested_offset, shape, dtype, blocksize, quant_type, nested_dtype):
    return torch.ops.lowrank_ext.dequantize_4bit(
        packed, absmax, nested_absmax, nested_offset, list(shape), dtype, blocksize, quant_type, nested_dtype
    )


# ---------------------------------------------------------------------------------------------------
# Dequantization: bit-exact.
# ---------------------------------------------------------------------------------------------------

# odd counts, counts below / at / above one 32-element chunk, partial last blocks, several rows
SHAPES = [(1,), (7,), (31,), (32,), (33,), (64,), (3, 129), (33, 96), (5, 7, 11), (2, 4097), (257, 300)]


@pytest.mark.parametrize("quant_type", K.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", K.BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_bit_exact_plain_and_double_quantized(dtype, blocksize, quant_type):
    for i, shape in enumerate(SHAPES):
        packed, absmax = K.quantize_4bit_ref(sample(shape, seed=i + blocksize), blocksize, quant_type)
        ref = K.dequantize_4bit_ref(packed, absmax, shape, dtype, blocksize, quant_type)
        out = dequantize_op(packed.to(CUDA), absmax.to(CUDA), None, None, shape, dtype, blocksize, quant_type,
                            torch.float32)  # fmt: skip
        assert out.device.type == CUDA.type
        assert_bit_equal(out, ref, f"plain {shape}")
        qabsmax, nested_absmax, nested_offset = K.double_quantize_ref(absmax)
        for nested_dtype in NESTED_DTYPES:
            constants = K.double_dequantize_ref(qabsmax, nested_absmax, nested_offset, nested_dtype)
            ref = K.dequantize_4bit_ref(packed, constants, shape, dtype, blocksize, quant_type)
            nested = (qabsmax.to(CUDA), nested_absmax.to(CUDA), nested_offset.to(CUDA))
            out = dequantize_op(packed.to(CUDA), *nested, shape, dtype, blocksize, quant_type, nested_dtype)
            assert_bit_equal(out, ref, f"double quant, nested {nested_dtype}, {shape}")
            assert_bit_equal(
                EXT.double_dequantize(*nested, nested_dtype), constants, f"double_dequantize {nested_dtype}"
            )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_unaligned_packed_view(dtype):
    """A packed view at an odd byte offset takes the byte-wise path; same bits."""
    shape, blocksize = (37, 131), 64
    packed, absmax = K.quantize_4bit_ref(sample(shape, seed=5), blocksize, "nf4")
    qabsmax, nested_absmax, nested_offset = K.double_quantize_ref(absmax)
    storage = torch.zeros(packed.numel() + 3, dtype=torch.uint8, device=CUDA)
    for start in (1, 2, 3):
        view = storage[start : start + packed.numel()]
        view.copy_(packed.reshape(-1))
        assert view.data_ptr() % 16 != 0
        constants = K.double_dequantize_ref(qabsmax, nested_absmax, nested_offset, torch.float32)
        ref = K.dequantize_4bit_ref(packed, constants, shape, dtype, blocksize, "nf4")
        nested = (qabsmax.to(CUDA), nested_absmax.to(CUDA), nested_offset.to(CUDA))
        out = dequantize_op(view, *nested, shape, dtype, blocksize, "nf4", torch.float32)
        assert_bit_equal(out, ref, f"view at byte offset {start}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_into_out_buffer(dtype):
    """dequantize_4bit_out writes the same bits into a fresh buffer and into a view at an odd element offset
    (not 16-byte aligned: the byte-wise path); the public API passes ``out`` through to it."""
    shape, blocksize = (45, 70), 128
    packed, absmax = K.quantize_4bit_ref(sample(shape, seed=6), blocksize, "fp4")
    qabsmax, nested_absmax, nested_offset = K.double_quantize_ref(absmax)
    ref = K.dequantize_4bit_ref(
        packed, K.double_dequantize_ref(qabsmax, nested_absmax, nested_offset), shape, dtype, blocksize, "fp4"
    )
    args = [t.to(CUDA) for t in (packed, qabsmax, nested_absmax, nested_offset)]
    storage = torch.full((math.prod(shape) + 1,), float("nan"), dtype=dtype, device=CUDA)
    for out in (torch.empty(shape, dtype=dtype, device=CUDA), storage[1:].view(shape)):
        torch.ops.lowrank_ext.dequantize_4bit_out(*args, blocksize, "fp4", torch.float32, out)
        assert_bit_equal(out, ref, f"out at element offset {out.storage_offset()}")
    qw = lowrank.quantize(sample(shape, seed=7), blocksize=64, backend="torch")
    buffer = torch.empty(shape, dtype=dtype, device=CUDA)
    got = lowrank.dequantize(qw.to(CUDA), backend="ext", out=buffer)
    assert got.data_ptr() == buffer.data_ptr()
    assert_bit_equal(got, lowrank.dequantize(qw, dtype, backend="torch"), "lowrank.dequantize(out=)")


def test_ties_subnormal_and_zero_blocks():
    values = torch.tensor(K.NF4_CODE + K.thresholds("nf4"), dtype=torch.float32)
    x = torch.cat([values, torch.zeros(64), torch.full((64,), 1e-40), -values * 3e-39]).reshape(-1)
    for dtype in DTYPES:
        packed, absmax = K.quantize_4bit_ref(x, 32, "nf4")
        ref = K.dequantize_4bit_ref(packed, absmax, x.shape, dtype, 32, "nf4")
        out = dequantize_op(packed.to(CUDA), absmax.to(CUDA), None, None, x.shape, dtype, 32, "nf4", torch.float32)
        assert_bit_equal(out, ref, f"ties and zeros in {dtype}")


@pytest.mark.slow
def test_dequantize_beyond_2_31_elements():
    """Element and byte offsets past 2^31 (int64 indexing). Checks windows at the start, across 2^31 and at
    the odd-length end against the reference on the same bytes. Needs ~6 GiB of device memory."""
    n, blocksize = 2**31 + 4096 + 7, 64
    gen = torch.Generator(device=CUDA).manual_seed(0)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, device=CUDA, generator=gen)
    absmax = torch.rand(K.num_blocks(n, blocksize), device=CUDA, generator=gen) + 0.5
    out = dequantize_op(packed, absmax, None, None, (n,), torch.bfloat16, blocksize, "nf4", torch.float32)
    for start in (0, 2**31 - 4096, n - (n % blocksize) - 4096):
        length = min(8192, n - start)
        window_packed = packed[start // 2 : (start + length + 1) // 2].cpu()
        window_absmax = absmax[start // blocksize : K.num_blocks(start + length, blocksize)].cpu()
        ref = K.dequantize_4bit_ref(window_packed, window_absmax, (length,), torch.bfloat16, blocksize, "nf4")
        assert_bit_equal(out[start : start + length], ref, f"window at {start}")


def test_public_api_and_dispatch_use_the_cuda_kernels():
    w = sample((96, 80), seed=11).to(CUDA)
    qw = lowrank.quantize(w, blocksize=64, double_quant=True, backend="torch")
    assert dispatch.resolve("dequantize_4bit", CUDA.type, "ext") == "ext"
    for dtype in DTYPES:
        got = lowrank.dequantize(qw, dtype, backend="ext")
        want = lowrank.dequantize(qw.to("cpu"), dtype, backend="torch")
        assert_bit_equal(got, want, f"lowrank.dequantize({dtype})")


# ---------------------------------------------------------------------------------------------------
# LoRA forward / backward: the tolerance policy against fp64.
# ---------------------------------------------------------------------------------------------------

# (M, K, N, r). M <= 16 with K % 16 == 0 takes the fused kernel: one K tile, three tiles with a partial last
# one (K = 1040), N not a multiple of the 16 rows per CTA, N = 1. M > 16, an odd K and K % 16 != 0 take
# dequantize + at::mm.
LORA_SHAPES = [
    (1, 64, 48, 4),
    (3, 96, 33, 8),
    (13, 1040, 70, 16),
    (16, 512, 1, 4),
    (17, 64, 40, 4),
    (67, 128, 96, 8),
    (5, 33, 20, 4),
    (2, 100, 24, 4),
]


def make_weight(kind: str, w: torch.Tensor):
    """(weight argument on the (emulated) GPU, its exact value in fp32 on the CPU)."""
    return shared_make_weight(kind, w, CUDA)


def check_rule(name, out, ref64, low, dtype):
    """The tolerance rule of tests/README.md, and the result must come back on the (emulated) GPU."""
    assert out.device.type == CUDA.type, f"{name} came back on {out.device}"
    shared_check_rule(name, out, ref64, low, dtype)


@pytest.mark.parametrize("weight_kind", WEIGHTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LORA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lora_forward_backward_within_tolerance(shape, dtype, weight_kind):
    M, K, N, r = shape
    scale = 2.0
    use_bias = use_dropout = N % 2 == 0
    x, w, A, B, bias, dropout, dy = lora_problem(M, K, N, r, dtype, dtype, seed=M + N)
    weight, w32 = make_weight(weight_kind, w)
    bias = bias if use_bias else None
    dropout = dropout if use_dropout else None
    xl = kept(x, dropout)  # the reference mask: the kernels must drop exactly these elements
    on_gpu = [None if t is None else t.to(CUDA) for t in (x, A, B, bias, dy)]
    xg, Ag, Bg, biasg, dyg = on_gpu

    y, xa = EXT.lora_forward(xg, weight, Ag, Bg, scale, biasg, dropout)
    dx, dA, dB = EXT.lora_backward(dyg, xg, weight, Ag, Bg, scale, xa, dropout)
    scale = D.lora_scale(scale, dropout)

    # fp64 reference from the exact dequantized weight
    x64, xl64, A64, B64, dy64, w64 = (t.double() for t in (x, xl, A, B, dy, w32))
    xa64 = xl64 @ A64.t()
    y64 = x64 @ w64.t() + scale * xa64 @ B64.t() + (0 if bias is None else bias.double())
    g64 = dy64 @ B64
    dx64, dA64, dB64 = dy64 @ w64 + scale * kept(g64 @ A64, dropout), scale * g64.t() @ xl64, scale * dy64.t() @ xa64
    # torch on the GPU at the same precision, PEFT-style: every matmul in dtype
    w_low = w32.to(CUDA, dtype)
    xl_g = xl.to(CUDA)
    xa_low = xl_g @ Ag.t()
    y_low = torch.nn.functional.linear(xg, w_low, biasg) + (xa_low @ Bg.t()) * scale
    g_low = (dyg @ Bg) * scale
    dx_low, dA_low, dB_low = dyg @ w_low + kept(g_low @ Ag, dropout), g_low.t() @ xl_g, (dyg * scale).t() @ xa_low

    assert xa.dtype == torch.float32 and xa.device.type == CUDA.type
    assert_within_torch_error(xa, xa_low, xa64, dtype, "xa")
    for name, out, ref, low in (
        ("y", y, y64, y_low),
        ("dx", dx, dx64, dx_low),
        ("dA", dA, dA64, dA_low),
        ("dB", dB, dB64, dB_low),
    ):
        check_rule(name, out, ref, low, dtype)


@pytest.mark.parametrize("M", [1, 4, 5, 16])
def test_fused_forward_matches_the_unfused_torch_backend(M):
    """Same inputs through the fused kernel (M <= 16) and through lowrank's torch backend on the GPU; the
    rule against fp64, per accumulator bucket of the kernel (M = 1, <= 4, <= 16)."""
    K, N, r = 2048, 200, 16
    x, w, A, B, bias, _, _ = lora_problem(M, K, N, r, torch.bfloat16, torch.float32, seed=M)
    weight, w32 = make_weight("nf4-dq-64", w)
    y, xa = EXT.lora_forward(x.to(CUDA), weight, A.to(CUDA), B.to(CUDA), 0.5, bias.to(CUDA))
    y_torch, _ = lora_forward_torch(x.to(CUDA), weight, A.to(CUDA), B.to(CUDA), 0.5, bias.to(CUDA))
    x64 = x.double()
    y64 = x64 @ w32.double().t() + 0.5 * (x64 @ A.double().t()) @ B.double().t() + bias.double()
    check_rule("y", y, y64, y_torch, torch.bfloat16)


def test_lora_partial_gradients_and_fp32_adapters_on_bf16():
    M, K, N, r = 5, 128, 200, 8
    x, w, A, B, bias, _, dy = lora_problem(M, K, N, r, torch.bfloat16, torch.float32, seed=1)
    x, A, B, bias, dy = (t.to(CUDA) for t in (x, A, B, bias, dy))
    weight, _ = make_weight("nf4-dq-64", w)
    check_partial_gradients(EXT, x, weight, A, B, bias, dy, assert_bit_equal)


# (x dtype, A/B dtype), cycled over M: each accumulator bucket of the fused kernel sees fp32, fp16 and bf16 x,
# with fp32 and low-precision adapters.
DTYPE_PAIRS = [
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("M", range(1, 17))
def test_lora_forward_every_fused_m(M):
    """Every M the fused kernel takes: K = 528 (a full 512-column tile, then a 16-column one), N = 37 (not a
    multiple of the 16 rows per CTA), rank 64 on even M and 8 on odd M, bias on odd M, dropout on every third M.
    The rule against fp64, with lowrank's torch backend on the same device as the same-precision result."""
    K, N, r, scale = 528, 37, 64 if M % 2 == 0 else 8, 1.5
    dtype, lora_dtype = DTYPE_PAIRS[M % 4]
    x, w, A, B, bias, dropout, _ = lora_problem(M, K, N, r, dtype, lora_dtype, seed=100 + M)
    bias = bias if M % 2 == 1 else None
    dropout = dropout if M % 3 == 0 else None
    weight, w32 = make_weight(WEIGHTS[M % 3], w)  # the 4-bit kinds only: a dense weight never takes the kernel
    xg, Ag, Bg, biasg = (None if t is None else t.to(CUDA) for t in (x, A, B, bias))

    y, xa = EXT.lora_forward(xg, weight, Ag, Bg, scale, biasg, dropout)
    y_torch, xa_torch = lora_forward_torch(xg, weight, Ag, Bg, scale, biasg, dropout)

    xa64 = kept(x, dropout).double() @ A.double().t()
    s64 = D.lora_scale(scale, dropout)
    y64 = x.double() @ w32.double().t() + s64 * xa64 @ B.double().t() + (0 if bias is None else bias.double())
    check_rule("y", y, y64, y_torch, dtype)
    check_rule("xa", xa, xa64, xa_torch, torch.float32)


def packed_at_offset(weight: lowrank.NF4Weight, offset: int) -> lowrank.NF4Weight:
    """The same weight with its packed bytes in a view starting `offset` bytes into a fresh allocation."""
    storage = torch.zeros(weight.packed.numel() + 16, dtype=torch.uint8, device=weight.packed.device)
    view = storage[offset : offset + weight.packed.numel()].view(weight.packed.shape)
    view.copy_(weight.packed)
    return dataclasses.replace(weight, packed=view)


@pytest.mark.parametrize("M", [3, 40], ids=["fused", "dequant_mm"])
def test_lora_strided_inputs_and_packed_views(M):
    """Non-contiguous x, A, B, bias and dy (with dropout), and a packed weight that is a view at byte offset 8 (8-
    but not 16-byte aligned: the fused kernel's 64-bit loads still apply) or 4 (not 8-byte aligned: dequantize + mm).
    Offsets 0 and 8 give the same bits; every result passes the rule against fp64."""
    K, N, r, scale, dtype = 96, 50, 8, 2.0, torch.bfloat16
    x, w, A, B, bias, dropout, dy = lora_problem(M, K, N, r, dtype, torch.float32, seed=7)
    weight, w32 = make_weight("nf4-dq-64", w)

    def strided(t: torch.Tensor) -> torch.Tensor:
        """The same values on the device in a non-contiguous layout (column-major, or every other element)."""
        t = t.to(CUDA)
        strided_t = t.t().contiguous().t() if t.dim() == 2 else torch.stack([t, t], dim=1)[:, 0]
        assert not strided_t.is_contiguous() and torch.equal(strided_t, t)
        return strided_t

    xs, As, Bs, biass, dys = (strided(t) for t in (x, A, B, bias, dy))
    xg, Ag, Bg, biasg, dyg = (t.to(CUDA) for t in (x, A, B, bias, dy))
    y_torch, xa_torch = lora_forward_torch(xg, weight, Ag, Bg, scale, biasg, dropout)
    grads_torch = lora_backward_torch(dyg, xg, weight, Ag, Bg, scale, xa_torch, dropout)

    x64, xl64, A64, B64, dy64, w64 = (t.double() for t in (x, kept(x, dropout), A, B, dy, w32))
    s64 = D.lora_scale(scale, dropout)
    xa64 = xl64 @ A64.t()
    y64 = x64 @ w64.t() + s64 * xa64 @ B64.t() + bias.double()
    g64 = s64 * dy64 @ B64
    grads64 = (dy64 @ w64 + kept(g64 @ A64, dropout), g64.t() @ xl64, s64 * dy64.t() @ xa64)

    results = {}
    for offset in (0, 8, 4):
        view = packed_at_offset(weight, offset)
        y, xa = EXT.lora_forward(xs, view, As, Bs, scale, biass, dropout)
        grads = EXT.lora_backward(dys, xs, view, As, Bs, scale, xa, dropout)
        check_rule(f"y (packed at +{offset})", y, y64, y_torch, dtype)
        for name, got, ref, low in zip(("dx", "dA", "dB"), grads, grads64, grads_torch, strict=True):
            check_rule(f"{name} (packed at +{offset})", got, ref, low, dtype)
        results[offset] = (y, xa, *grads)
    for got, want in zip(results[8], results[0], strict=True):
        assert_bit_equal(got, want, "packed at byte offset 8 vs 0")


@needs_real_gpu
def test_ops_run_on_the_current_stream_and_capture_in_a_cuda_graph():
    """Every launch goes to the current stream with no host synchronisation: the ops capture in a CUDA graph (a
    launch on another stream, or a sync, makes the capture fail) and a replay reproduces the eager results."""
    x, w, A, B, bias, dropout, dy = lora_problem(40, 96, 50, 8, torch.bfloat16, torch.float32, seed=9)
    weight, _ = make_weight("nf4-dq-64", w)
    x, A, B, bias, dy = (t.to(CUDA) for t in (x, A, B, bias, dy))
    drop = (dropout.p, dropout.seed_int64)
    quant = (weight.packed, weight.absmax, weight.nested_absmax, weight.nested_offset)
    weight_args = (*quant, 64, "nf4", torch.float32)
    ops = torch.ops.lowrank_ext

    def run() -> dict[str, torch.Tensor]:
        out = torch.empty(50, 96, dtype=torch.float16, device=CUDA)
        ops.dequantize_4bit_out(*weight_args, out)
        y_fused, xa_fused = ops.lora_forward(x[:3], *weight_args, A, B, 2.0, bias, *drop)
        y, xa = ops.lora_forward(x, *weight_args, A, B, 2.0, bias, *drop)
        dx, dA, dB = ops.lora_backward(dy, x, *weight_args, A, B, 2.0, xa, *drop, True, True, True)
        mask = torch.empty(40, 96, dtype=torch.uint8, device=CUDA)
        ops.dropout_mask_out(mask, 0, *drop)
        return {
            "dequantize_4bit": ops.dequantize_4bit(*quant, [50, 96], torch.bfloat16, 64, "nf4", torch.float32),
            "dequantize_4bit_out": out,
            "double_dequantize": ops.double_dequantize(*quant[1:], torch.bfloat16),
            "y fused": y_fused, "xa fused": xa_fused, "y": y, "xa": xa, "dx": dx, "dA": dA, "dB": dB, "mask": mask,
        }  # fmt: skip

    eager = run()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS handles and workspaces)
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    for name, want in eager.items():
        if name.startswith("dequantize") or name == "double_dequantize":
            assert_bit_equal(captured[name], want, f"{name} replayed")
        else:  # cuBLAS may pick another algorithm inside a capture
            torch.testing.assert_close(captured[name], want, msg=f"{name} replayed")


@pytest.mark.parametrize("seed", [0, 7, 2**62 + 5, -3])
@pytest.mark.parametrize("rows,cols,row_offset", [(67, 45, 0), (5, 333, 12), (3, 33, 2**32 // 33)])
def test_dropout_mask_matches_the_reference_bit_for_bit(rows, cols, row_offset, seed):
    """csrc/dropout.h on the device drops exactly the elements of the torch reference (odd K, M not a multiple
    of any tile, row offsets, an index range crossing 2^32)."""
    for p in (0.1, 0.5):
        dropout = D.Dropout(p, seed)
        got = EXT.dropout_mask(rows, cols, dropout, row_offset, device=CUDA)
        assert got.device.type == CUDA.type
        assert torch.equal(got.cpu(), D.dropout_mask_ref(rows, cols, dropout, row_offset))


def test_lora_dispatch_picks_ext_when_asked():
    assert dispatch.resolve("lora_forward", CUDA.type, "ext") == "ext"
    assert dispatch.resolve("lora_backward", CUDA.type, "ext") == "ext"


# ---------------------------------------------------------------------------------------------------
# Clear errors and opcheck.
# ---------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    packed, absmax = K.quantize_4bit_ref(sample((4, 64), seed=3), 64, "nf4")
    packed_g, absmax_g = packed.to(CUDA), absmax.to(CUDA)
    ops = torch.ops.lowrank_ext
    with pytest.raises(RuntimeError, match="blocksize must be one of .* got 48"):
        ops.dequantize_4bit(packed_g, absmax_g, None, None, [4, 64], torch.float32, 48, "nf4", torch.float32)
    with pytest.raises(RuntimeError, match="quant_type must be 'nf4' or 'fp4', got 'int4'"):
        ops.dequantize_4bit(packed_g, absmax_g, None, None, [4, 64], torch.float32, 64, "int4", torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be float32, float16 or bfloat16, got Int"):
        ops.dequantize_4bit(packed_g, absmax_g, None, None, [4, 64], torch.int32, 64, "nf4", torch.float32)
    with pytest.raises(RuntimeError, match="packed must be uint8 with 64 bytes for 128 elements, got Byte with 128"):
        ops.dequantize_4bit(packed_g, absmax_g, None, None, [2, 64], torch.float32, 64, "nf4", torch.float32)
    with pytest.raises(RuntimeError, match="absmax must be float32 with 4 entries"):
        ops.dequantize_4bit(packed_g, absmax_g[:3], None, None, [4, 64], torch.float32, 64, "nf4", torch.float32)
    with pytest.raises(RuntimeError, match="nested_absmax and nested_offset must be given together"):
        ops.dequantize_4bit(packed_g, absmax_g, absmax_g, None, [4, 64], torch.float32, 64, "nf4", torch.float32)
    with pytest.raises(RuntimeError, match="nested_dtype must be float32, float16 or bfloat16, got Int"):
        ops.dequantize_4bit(packed_g, absmax_g, None, None, [4, 64], torch.float32, 64, "nf4", torch.int32)
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        out = torch.empty(64, 4, device=CUDA).t()
        ops.dequantize_4bit_out(packed_g, absmax_g, None, None, 64, "nf4", torch.float32, out)
    with pytest.raises(RuntimeError, match="out dtype must be float32, float16 or bfloat16, got Double"):
        out = torch.empty(4, 64, dtype=torch.float64, device=CUDA)
        ops.dequantize_4bit_out(packed_g, absmax_g, None, None, 64, "nf4", torch.float32, out)

    x, w, A, B, *_ = lora_problem(4, 64, 32, 4, torch.float32, torch.float32, seed=2)
    x, w, A, B = (t.to(CUDA) for t in (x, w, A, B))
    with pytest.raises(RuntimeError, match="A must have shape"):
        ops.lora_forward(x, w, None, None, None, 64, "nf4", torch.float32, A[:, :32], B, 1.0, None, 0.0, 0)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16, got Double"):
        ops.lora_forward(x.double(), w, None, None, None, 64, "nf4", torch.float32, A, B, 1.0, None, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(32\)"):
        ops.lora_forward(x, w, None, None, None, 64, "nf4", torch.float32, A, B, 1.0, x[0, :31], 0.0, 0)
    with pytest.raises(RuntimeError, match="xa must be float32 of shape"):
        ops.lora_backward(x[:, :32], x, w, None, None, None, 64, "nf4", torch.float32, A, B, 1.0, x[:, :3], 0.0, 0,
                          True, True, True)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"dropout must be a probability in \[0, 1\), got 1"):
        ops.lora_forward(x, w, None, None, None, 64, "nf4", torch.float32, A, B, 1.0, None, 1.0, 0)


@needs_real_gpu
def test_cpu_tensors_are_rejected_by_name():
    packed, absmax = K.quantize_4bit_ref(sample((4, 64), seed=3), 64, "nf4")
    ops = torch.ops.lowrank_ext
    with pytest.raises(RuntimeError, match="absmax must be a CUDA tensor .* got cpu"):
        ops.dequantize_4bit(packed.to(CUDA), absmax, None, None, [4, 64], torch.float32, 64, "nf4", torch.float32)
    x, w, A, B, *_ = lora_problem(4, 64, 32, 4, torch.float32, torch.float32, seed=2)
    with pytest.raises(RuntimeError, match="A must be a CUDA tensor for the ext CUDA kernels, got cpu"):
        ops.lora_forward(x.to(CUDA), w.to(CUDA), None, None, None, 64, "nf4", torch.float32, A, B.to(CUDA), 1.0, None,
                         0.0, 0)  # fmt: skip


def test_opcheck_cuda_ops():
    packed, absmax = K.quantize_4bit_ref(sample((33, 96), seed=4), 64, "nf4")
    qabsmax, nested_absmax, nested_offset = (t.to(CUDA) for t in K.double_quantize_ref(absmax))
    packed = packed.to(CUDA)
    ops = torch.ops.lowrank_ext
    torch.library.opcheck(
        ops.dequantize_4bit,
        (packed, qabsmax, nested_absmax, nested_offset, [33, 96], torch.bfloat16, 64, "nf4", torch.float32),
    )
    torch.library.opcheck(ops.double_dequantize, (qabsmax, nested_absmax, nested_offset, torch.bfloat16))
    out = torch.empty(33, 96, dtype=torch.float16, device=CUDA)
    torch.library.opcheck(
        ops.dequantize_4bit_out, (packed, qabsmax, nested_absmax, nested_offset, 64, "nf4", torch.float32, out)
    )

    x, w, A, B, bias, dropout, dy = lora_problem(6, 64, 40, 4, torch.bfloat16, torch.float32, 3)
    x, w, A, B, bias, dy = (t.to(CUDA) for t in (x, w, A, B, bias, dy))
    drop = (dropout.p, dropout.seed_int64)
    qw, _ = make_weight("nf4-dq-64", w.cpu())
    quant = (qw.packed, qw.absmax, qw.nested_absmax, qw.nested_offset, 64, "nf4", torch.float32)
    dense = (w, None, None, None, 64, "nf4", torch.float32)
    for weight_args in (quant, dense):
        torch.library.opcheck(ops.lora_forward, (x, *weight_args, A, B, 2.0, bias, *drop))
        y, xa = ops.lora_forward(x, *weight_args, A, B, 2.0, bias, *drop)
        torch.library.opcheck(ops.lora_backward, (dy, x, *weight_args, A, B, 2.0, xa, *drop, True, True, True))
        torch.library.opcheck(ops.lora_backward, (dy, x, *weight_args, A, B, 2.0, xa, 0.0, 0, True, False, True))
    mask = torch.empty(7, 33, dtype=torch.uint8, device=CUDA)
    torch.library.opcheck(ops.dropout_mask_out, (mask, 5, *drop))
