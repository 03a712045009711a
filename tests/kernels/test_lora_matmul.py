"""Fused low-rank matmul kernels (``lowrank.kernels.lora_matmul``) against fp64 references.

Tolerance rule (matmuls): ``max|out - ref64| <= 2 * max|out_torch_same_precision - ref64| + atol(dtype)``,
where the PyTorch comparison dequantizes W to x.dtype and runs every product in x.dtype. Under the
interpreter the kernels upcast bf16 dot operands to fp32 (triton 3.9's interpreter breaks bf16 tl.dot).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_within_torch_error as assert_close_by_rule
from helpers import kept
from lowrank.kernels import dropout as D
from lowrank.kernels import lora_matmul as L
from lowrank.kernels import nf4 as K

from lowrank.nf4 import NF4Weight

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (quant_type, double_quant) or None for a dense weight
WEIGHT_KINDS = {
    "dense": None,
    "nf4": ("nf4", False),
    "nf4_dq": ("nf4", True),
    "fp4": ("fp4", False),
    "fp4_dq": ("fp4", True),
}
N, KDIM, RANK = 40, 96, 8  # K = 96 with blocksize 64: quantization blocks span two rows of W
RSLORA_SCALE = 16 / math.sqrt(RANK)


def make_weight(kind: str, n: int, k: int, device, blocksize: int = 64, seed: int = 0, nested_dtype=torch.float32):
    """(weight argument, its values in fp32 as the kernels decode them before rounding to x.dtype)."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.2).to(device)
    spec = WEIGHT_KINDS[kind]
    if spec is None:
        return w, w
    quant_type, double_quant = spec
    packed, absmax = K.quantize_4bit_ref(w, blocksize, quant_type)
    nested_absmax = offset = None
    constants = absmax
    if double_quant:
        absmax, nested_absmax, offset = K.double_quantize_ref(absmax)
        constants = K.double_dequantize_ref(absmax, nested_absmax, offset, nested_dtype)
    dense = K.dequantize_4bit_ref(packed, constants, (n, k), torch.float32, blocksize, quant_type)
    qw = NF4Weight(packed, absmax, (n, k), torch.float32, blocksize, quant_type, nested_absmax, offset, nested_dtype)
    return qw, dense


def make_operands(M, dtype, device, bias, with_dropout, seed=1, k=KDIM, n=N, r=RANK):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, k, generator=gen).to(dtype).to(device)
    A = (torch.randn(r, k, generator=gen) * 0.1).to(device)
    B = (torch.randn(n, r, generator=gen) * 0.1).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    dropout = D.Dropout(0.25, 1000 + seed) if with_dropout else None  # PEFT's lora_dropout, counter-based mask
    return x, A, B, b, dropout


def forward_in(dtype_compute, x, w, A, B, s, b, dropout):
    """The forward computed with every operand in ``dtype_compute`` (W already rounded to x.dtype)."""
    c = dtype_compute
    xl = kept(x, dropout)
    s = D.lora_scale(s, dropout)
    w = w.to(x.dtype).to(c)
    xa = xl.to(c) @ A.to(x.dtype).to(c).T
    y = x.to(c) @ w.T + s * (xa.to(x.dtype).to(c) @ B.to(x.dtype).to(c).T)
    if b is not None:
        y = y + b.to(c)
    return y, xa


def backward_in(dtype_compute, dy, x, w, A, B, s, dropout):
    c = dtype_compute
    xl = kept(x, dropout)
    s = D.lora_scale(s, dropout)
    A_, B_ = A.to(x.dtype).to(c), B.to(x.dtype).to(c)
    ds = dy.to(c) @ B_
    dx = dy.to(c) @ w.to(x.dtype).to(c) + s * kept(ds.to(x.dtype).to(c) @ A_, dropout)
    dA = s * (ds.to(x.dtype).to(c).T @ xl.to(c))
    xa = xl.to(c) @ A_.T
    dB = s * (dy.to(c).T @ xa.to(x.dtype).to(c))
    return dx, dA, dB


def check_forward(M, dtype, kind, device, bias, dropout, path=None, k=KDIM, n=N, blocksize=64):
    weight, dense = make_weight(kind, n, k, device, blocksize)
    x, A, B, b, dropout = make_operands(M, dtype, device, bias, dropout, k=k, n=n)
    y, xa = L.lora_forward(x, weight, A, B, RSLORA_SCALE, b, dropout, path=path)
    assert y.dtype == dtype and y.shape == (M, n) and xa.dtype == torch.float32 and xa.shape == (M, RANK)
    y64, xa64 = forward_in(torch.float64, x, dense, A, B, RSLORA_SCALE, b, dropout)
    y_t, xa_t = forward_in(dtype, x, dense, A, B, RSLORA_SCALE, b, dropout)
    assert_close_by_rule(y, y_t, y64, dtype, f"y ({kind}, {dtype}, M={M}, path={path})")
    assert_close_by_rule(xa, xa_t, xa64, dtype, f"xa ({kind}, {dtype}, M={M})")
    return y, xa


def check_backward(M, dtype, kind, device, dropout, k=KDIM, n=N, blocksize=64, path=None):
    weight, dense = make_weight(kind, n, k, device, blocksize)
    x, A, B, _, dropout = make_operands(M, dtype, device, False, dropout, k=k, n=n)
    _, xa = L.lora_forward(x, weight, A, B, RSLORA_SCALE, None, dropout)
    dy = torch.randn(M, n, generator=torch.Generator().manual_seed(7)).to(dtype).to(device)
    dx, dA, dB = L.lora_backward(dy, x, weight, A, B, RSLORA_SCALE, xa, dropout, path=path)
    assert (dx.dtype, dA.dtype, dB.dtype) == (dtype, A.dtype, B.dtype)
    ref = backward_in(torch.float64, dy, x, dense, A, B, RSLORA_SCALE, dropout)
    same = backward_in(dtype, dy, x, dense, A, B, RSLORA_SCALE, dropout)
    for name, out, t, r in zip(("dx", "dA", "dB"), (dx, dA, dB), same, ref, strict=True):
        assert_close_by_rule(out, t, r, dtype, f"{name} ({kind}, {dtype}, M={M}, path={path})")
    return dx, dA, dB


# -- forward and backward over weight formats, dtypes and M -----------------------------------------


@pytest.mark.parametrize("M", [1, 3, 16, 67])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(WEIGHT_KINDS))
def test_forward(kind, dtype, M, device):
    # bias and dropout of the LoRA input alternate over the grid so every combination occurs
    check_forward(M, dtype, kind, device, bias=M % 2 == 1, dropout=kind in ("dense", "nf4_dq", "fp4") or M == 16)


@pytest.mark.parametrize("path", L.BACKWARD_PATHS)
@pytest.mark.parametrize("M", [1, 3, 16, 67])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4", "nf4_dq", "fp4_dq"])
def test_backward(kind, dtype, M, path, device):
    check_backward(M, dtype, kind, device, dropout=M in (3, 67), path=path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 3, 67])
@pytest.mark.parametrize("path", L.BACKWARD_PATHS)
def test_backward_paths_odd_n_and_k(path, M, dtype, device):
    # N = 23 and K = 35 odd: 4-bit blocks span rows and a packed byte holds the end of one row and the
    # start of the next, for the tile decoder (fused) and the dequantize kernel (dequant) alike.
    check_backward(M, dtype, "nf4_dq", device, dropout=M != 1, k=35, n=23, blocksize=32, path=path)


def test_adapter_grads_do_not_depend_on_the_backward_path(device):
    # The paths differ only in how dX is computed: dA and dB come from the same reductions, bit for bit.
    fused = check_backward(67, torch.bfloat16, "nf4_dq", device, dropout=True, path="fused")
    dequant = check_backward(67, torch.bfloat16, "nf4_dq", device, dropout=True, path="dequant")
    assert torch.equal(fused[1], dequant[1]) and torch.equal(fused[2], dequant[2])


def _record_calls(monkeypatch, calls):
    """Wrap the fused dX launcher and the dequantize helper so a test sees which backward path ran."""
    for attr, label in (("_matmul", "fused"), ("_dequantize", "dequant")):
        original = getattr(L, attr)

        def wrapper(*args, _original=original, _label=label, **kwargs):
            calls.append(_label)
            return _original(*args, **kwargs)

        monkeypatch.setattr(L, attr, wrapper)


@pytest.mark.parametrize(
    "path, M, expected",
    [
        ("fused", 3, "fused"),
        ("dequant", 3, "dequant"),
        (None, 3, "fused"),
        (None, L.FUSED_BACKWARD_M_MAX + 1, "dequant"),
        ("dequant", L.FUSED_BACKWARD_M_MAX + 1, "dequant"),
    ],
)
def test_backward_path_selects_the_kernel(path, M, expected, device, monkeypatch):
    # The launchers never read the environment: `path=` forces, else choose_backward_path decides by M
    # (LOWRANK_LORA_BACKWARD_PATH is read by lowrank.ops.dispatch; tests/lowrank/ops/test_lora.py).
    weight, _ = make_weight("nf4_dq", N, KDIM, device)
    x, A, B, _, _ = make_operands(M, torch.float16, device, False, False)
    _, xa = L.lora_forward(x, weight, A, B, 2.0)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(4)).to(torch.float16).to(device)
    monkeypatch.setenv("LOWRANK_LORA_BACKWARD_PATH", "fused" if expected == "dequant" else "dequant")  # ignored
    calls = []
    _record_calls(monkeypatch, calls)
    L.lora_backward(dy, x, weight, A, B, 2.0, xa, path=path)
    assert calls == [expected]


def test_choose_backward_path_threshold():
    assert L.choose_backward_path(1, 4096, 4096, 16, "cuda") == "fused"
    assert L.choose_backward_path(L.FUSED_BACKWARD_M_MAX, 4096, 4096, 16, "cuda") == "fused"
    assert L.choose_backward_path(L.FUSED_BACKWARD_M_MAX + 1, 4096, 4096, 16, "cuda") == "dequant"
    assert L.choose_backward_path(8192, 4096, 4096, 16, "cuda") == "dequant"


@pytest.mark.parametrize("path", L.FORWARD_PATHS)
@pytest.mark.parametrize("M", [5, 67])
@pytest.mark.parametrize("kind", ["dense", "nf4_dq"])
def test_every_forward_path(path, M, kind, device):
    check_forward(M, torch.float16, kind, device, bias=True, dropout=True, path=path)


def test_odd_k_block_spanning_rows(device):
    # K odd: a packed byte holds the last element of one row and the first of the next.
    for M in (2, 20):
        check_forward(M, torch.float16, "nf4_dq", device, bias=True, dropout=True, k=35, n=24, blocksize=32)
        check_backward(M, torch.float16, "nf4_dq", device, dropout=True, k=35, n=24, blocksize=32)


def test_large_rank_is_chunked(device):
    # r > FUSED_RANK_MAX: the shrink runs as its own kernel and the expand loops over rank chunks.
    n, k, r = 80, 96, 72
    weight, dense = make_weight("nf4_dq", n, k, device)
    x, A, B, b, _ = make_operands(3, torch.float32, device, True, False, k=k, n=n, r=r)
    y, xa = L.lora_forward(x, weight, A, B, 0.5, b)
    y64, _ = forward_in(torch.float64, x, dense, A, B, 0.5, b, None)
    y32, _ = forward_in(torch.float32, x, dense, A, B, 0.5, b, None)
    assert_close_by_rule(y, y32, y64, torch.float32, "y with r=72")
    dy = torch.randn(3, n, generator=torch.Generator().manual_seed(3)).to(device)
    grads = L.lora_backward(dy, x, weight, A, B, 0.5, xa)
    for name, g, t, r64 in zip(
        ("dx", "dA", "dB"),
        grads,
        backward_in(torch.float32, dy, x, dense, A, B, 0.5, None),
        backward_in(torch.float64, dy, x, dense, A, B, 0.5, None),
        strict=True,
    ):
        assert_close_by_rule(g, t, r64, torch.float32, f"{name} with r=72")


@pytest.mark.parametrize("M", [3, 67])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_aligned_fast_decode(blocksize, M, device):
    # K % blocksize == 0: rows decode through contiguous byte loads and per-run block constants,
    # for runs shorter than, equal to and longer than the kernel's K tile.
    kind = "fp4" if blocksize == 128 else "nf4_dq"
    check_forward(M, torch.float16, kind, device, bias=True, dropout=True, k=128, n=40, blocksize=blocksize)
    check_backward(M, torch.float16, kind, device, dropout=M == 3, k=128, n=40, blocksize=blocksize)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_small_path_several_row_tiles(dtype, device):
    # M = 64 on the small-M path runs two 32-row tiles; each writes its own rows of xa / dS.
    check_forward(64, dtype, "nf4_dq", device, bias=True, dropout=True)
    check_backward(64, dtype, "nf4_dq", device, dropout=True)
    check_backward(64, dtype, "nf4", device, dropout=False, k=128)


@pytest.mark.parametrize("M", [3, 20])
def test_unfused_shrink_small_m(M, device, monkeypatch):
    # The small-M kernels with xa / dS from the split shrink launch instead of their own loop.
    monkeypatch.setattr(L, "FUSE_SHRINK_SMALL_M", False)
    check_forward(M, torch.float16, "nf4_dq", device, bias=True, dropout=True)
    check_backward(M, torch.float16, "nf4_dq", device, dropout=True)


@pytest.mark.parametrize("path", L.BACKWARD_PATHS)
def test_split_reductions(path, device):
    # K = 600 splits the shrink over 2 programs' partials; M = 1100 splits the dA / dB reductions.
    check_forward(3, torch.float32, "nf4", device, bias=False, dropout=True, k=600, n=24)
    check_backward(1100, torch.float32, "dense", device, dropout=True, k=600, n=24, path=path)


@pytest.mark.parametrize("nested_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_nested_constants(nested_dtype, device):
    weight, dense = make_weight("nf4_dq", N, KDIM, device, nested_dtype=nested_dtype)
    x, A, B, b, _ = make_operands(3, torch.float32, device, True, False)
    y, _ = L.lora_forward(x, weight, A, B, 2.0, b)
    y64, _ = forward_in(torch.float64, x, dense, A, B, 2.0, b, None)
    y32, _ = forward_in(torch.float32, x, dense, A, B, 2.0, b, None)
    assert_close_by_rule(y, y32, y64, torch.float32, f"y with nested_dtype={nested_dtype}")


def one_hot_rows(M: int, width: int, stride: int, dtype, device) -> torch.Tensor:
    """(M, width): row m holds one nonzero, ±2^(m % 5 - 2) at column (m * stride + 5) % width."""
    out = torch.zeros(M, width)
    m = torch.arange(M)
    sign = 1.0 - 2.0 * (m % 2).float()
    out[m, (m * stride + 5) % width] = sign * torch.exp2((m % 5 - 2).float())
    return out.to(dtype).to(device)


@pytest.mark.parametrize("k", [KDIM, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("M", [3, 67])
def test_decoded_tiles_equal_dequantized_weight(M, dtype, k, device):
    """The 4-bit decode in the tile loop (generic, and aligned for k = 128) gives exactly dequantize_4bit's
    values: the kernel on the 4-bit weight and on its dequantized dense copy return the same bits.

    x and dy have one nonzero (a signed power of two) per row, so ``x · Wᵀ`` and ``dy · W`` are exact in
    any summation order: the main products pick decoded weight values (y: columns k_m of W for every n;
    dx: whole rows n_m of W) and every bit of them must agree. Random x and dy would also compare the
    summation order, which is not the property here and not the same in the interpreter: its tl.dot is
    numpy's matmul, whose fp32 (BLAS) order depends on the operands' memory layout, and the aligned decode
    hands tl.dot a transposed tile where a dense W is a fresh row-major one (M = 3, fp32, k = 128 differed
    in the last bit). No bias and B = 0, so nothing is added to the main products that could round a
    one-ulp decode difference away (the shrink with dropout still runs: xa must agree too).
    """
    weight, _ = make_weight("nf4_dq", N, k, device)
    dense = K.dequantize_4bit(
        weight.packed, weight.absmax, weight.nested_absmax, weight.nested_offset, (N, k), dtype, 64, "nf4"
    )
    _, A, B, _, dropout = make_operands(M, dtype, device, False, True, k=k)
    B = torch.zeros_like(B)
    x = one_hot_rows(M, k, 37, dtype, device)  # 37 is prime to 96 and 128: M distinct columns
    y_q, xa_q = L.lora_forward(x, weight, A, B, 2.0, None, dropout)
    y_d, xa_d = L.lora_forward(x, dense, A, B, 2.0, None, dropout)
    assert torch.equal(y_q, y_d) and torch.equal(xa_q, xa_d)
    dy = one_hot_rows(M, N, 7, dtype, device)  # 7 is prime to N = 40: every row of W when M >= 40
    for g_q, g_d in zip(
        L.lora_backward(dy, x, weight, A, B, 2.0, xa_q, dropout),
        L.lora_backward(dy, x, dense, A, B, 2.0, xa_d, dropout),
        strict=True,
    ):
        assert torch.equal(g_q, g_d)


def test_reference_matches_peft_formula(device):
    weight, _ = make_weight("dense", N, KDIM, device)
    x, A, B, b, dropout = make_operands(4, torch.float32, device, True, True)
    keep = D.dropout_mask_ref(4, KDIM, dropout).to(device)
    expected = x @ weight.T + b + 2.0 / (1 - dropout.p) * (((x * keep) @ A.T) @ B.T)
    torch.testing.assert_close(L.lora_matmul_ref(x, weight, A, B, 2.0, b, dropout), expected)


# -- partial gradients, empty batches, non-contiguous input -----------------------------------------


@pytest.mark.parametrize("path", L.BACKWARD_PATHS)
def test_need_flags_skip_work(path, device):
    weight, dense = make_weight("nf4", N, KDIM, device)
    x, A, B, _, _ = make_operands(3, torch.float32, device, False, False)
    _, xa = L.lora_forward(x, weight, A, B, 2.0)
    dy = torch.randn(3, N, generator=torch.Generator().manual_seed(2)).to(device)
    full = L.lora_backward(dy, x, weight, A, B, 2.0, xa, path=path)
    for flags in [(False, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        got = L.lora_backward(
            dy, x, weight, A, B, 2.0, xa, need_dx=flags[0], need_dA=flags[1], need_dB=flags[2], path=path
        )
        for wanted, g, f in zip(flags, got, full, strict=True):
            if wanted:
                torch.testing.assert_close(g, f, rtol=0, atol=1e-5)
            else:
                assert g is None


def test_empty_batch(device):
    weight, _ = make_weight("nf4", N, KDIM, device)
    x, A, B, _, _ = make_operands(0, torch.float16, device, False, False)
    y, xa = L.lora_forward(x, weight, A, B, 2.0)
    assert y.shape == (0, N) and xa.shape == (0, RANK)
    dx, dA, dB = L.lora_backward(y, x, weight, A, B, 2.0, xa)
    assert dx.shape == (0, KDIM) and bool((dA == 0).all()) and bool((dB == 0).all())


def test_non_contiguous_x(device):
    weight, _ = make_weight("nf4_dq", N, KDIM, device)
    x, A, B, b, _ = make_operands(5, torch.float16, device, True, False)
    strided = torch.empty(KDIM, 5, dtype=x.dtype, device=device).T
    strided.copy_(x)
    assert not strided.is_contiguous()
    assert torch.equal(L.lora_forward(strided, weight, A, B, 2.0, b)[0], L.lora_forward(x, weight, A, B, 2.0, b)[0])


def test_choose_forward_path_is_monotone_in_M():
    paths = [L.choose_forward_path(m, 4096, 4096, "cuda") for m in (1, L.SMALL_M_MAX, L.SMALL_M_MAX + 1, 10**6)]
    assert paths[0] == paths[1] == "fused_small_m"
    assert paths[2] in ("fused_tiled", "dequant_matmul") and paths[3] == "dequant_matmul"


# -- validation: clear errors naming the value --------------------------------------------------------


def _valid(device):
    weight, _ = make_weight("nf4_dq", N, KDIM, device)
    x, A, B, b, _ = make_operands(3, torch.float32, device, True, False)
    return dict(x=x, weight=weight, A=A, B=B, scale=2.0, bias=b)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda v: {"x": v["x"][:, :-1]}, "K = 95"),
        (lambda v: {"x": v["x"].reshape(-1)}, "2-D"),
        (lambda v: {"x": v["x"].to(torch.int32)}, "int32"),
        (lambda v: {"A": v["A"][:, :-1]}, r"A must be \(r, K\)"),
        (lambda v: {"B": v["B"][:-1]}, r"B must be \(N, r\)"),
        (lambda v: {"A": v["A"][:0], "B": v["B"][:, :0]}, "rank r = 0"),
        (lambda v: {"A": torch.zeros(41, KDIM), "B": torch.zeros(N, 41)}, "rank r = 41"),
        (lambda v: {"scale": float("nan")}, "scale"),
        (lambda v: {"bias": v["bias"][:-1]}, "bias"),
        (lambda v: {"A": v["A"].to("meta")}, "device"),
        (lambda v: {"weight": SimpleNamespace(shape=(N, KDIM))}, "dense tensor or an NF4Weight, got SimpleNamespace"),
        (lambda v: {"weight": torch.zeros(N, KDIM, dtype=torch.int8)}, "int8"),
    ],
)
def test_bad_input_is_rejected(change, match, device):
    args = _valid(device)
    args.update(change(args))
    with pytest.raises((ValueError, TypeError), match=match):
        L.lora_forward(args["x"], args["weight"], args["A"], args["B"], args["scale"], args["bias"])


def test_bad_backward_input_and_path(device):
    v = _valid(device)
    x, w, A, B = v["x"], v["weight"], v["A"], v["B"]
    _, xa = L.lora_forward(x, w, A, B, 2.0)
    with pytest.raises(ValueError, match="dy must be"):
        L.lora_backward(torch.zeros(3, N + 1, device=device), x, w, A, B, 2.0, xa)
    with pytest.raises(ValueError, match="xa must be"):
        L.lora_backward(torch.zeros(3, N, device=device), x, w, A, B, 2.0, xa.half())
    with pytest.raises(TypeError, match="dropout must be a lowrank.kernels.dropout.Dropout"):
        L.lora_forward(x, w, A, B, 2.0, dropout=x[:2])
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got 1.0"):
        D.Dropout.of(1.0, 3)
    with pytest.raises(ValueError, match="path must be"):
        L.lora_forward(x, w, A, B, 2.0, path="fastest")
    with pytest.raises(ValueError, match="path must be one of .*'fastest'"):
        L.lora_backward(torch.zeros(3, N, device=device), x, w, A, B, 2.0, xa, path="fastest")
