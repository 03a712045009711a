"""LoRA ops (``lowrank.ops.lora``): forward and gradients against fp64 references, dropout, multi-projection,
multi-adapter serving, op registration (opcheck, torch.compile) and input validation.

Tolerance rule: ``max|out - ref64| <= 2 * max|out_torch_same_precision - ref64| + atol(dtype)``, where the
PyTorch comparison is PEFT's computation at x's precision: base ``F.linear`` in x.dtype on the dequantized
weight, LoRA branch in the adapters' fp32, summed in x.dtype; gradients by autograd through it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within_torch_error as assert_within_rule
from lowrank.kernels import dropout as D
from lowrank.kernels import lora_matmul as LK

from lowrank.nf4 import dequantize, quantize
from lowrank.nf4_format import TENSOR_FIELDS
from lowrank.ops import dispatch, lora_linear, lora_linear_multi, lora_linear_multi_adapter, lora_linear_nf4
from lowrank.ops import lora as L

N, KDIM, RANK = 40, 96, 5  # K = 96 with blocksize 64: quantization blocks span two rows of W; odd rank
ALPHA = 16.0


def usable(backend: str) -> bool:
    return backend in dispatch.usable_backends("lora_forward", "cpu") and backend in dispatch.usable_backends(
        "lora_backward", "cpu"
    )


def make_problem(M, dtype, kind="nf4", bias=True, seed=0, lead=None, n=N, k=KDIM, r=RANK):
    gen = torch.Generator().manual_seed(seed)
    w32 = torch.randn(n, k, generator=gen) * 0.2
    if kind == "nf4":
        w = quantize(w32, blocksize=64, double_quant=True, backend="torch")
        dense = dequantize(w, torch.float32, backend="torch")
    else:
        w = w32.to(dtype)
        dense = w.float()
    shape = (M, k) if lead is None else (*lead, M, k)
    x = torch.randn(shape, generator=gen).to(dtype)
    A = torch.randn(r, k, generator=gen) * 0.1
    B = torch.randn(n, r, generator=gen) * 0.1
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return w, dense, x, A, B, b


def peft_style(x, dense, A, B, scale, bias, keep, p, dtype):
    """PEFT's forward at ``dtype`` (or fp64): y and grads (x, A, B, bias) for the loss sum(y * g)."""
    x = x.detach().to(dtype).requires_grad_(True)
    A = A.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(True)
    B = B.detach().to(A.dtype).requires_grad_(True)
    b = None if bias is None else bias.detach().to(dtype).requires_grad_(True)
    base = F.linear(x, dense.to(dtype), b)
    x_l = x.to(A.dtype)
    if keep is not None:
        x_l = x_l * keep / (1.0 - p)
    y = base + (scale * F.linear(F.linear(x_l, A), B)).to(dtype)
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(dtype)
    (y * g).sum().backward()
    return y, x.grad, A.grad, B.grad, (None if b is None else b.grad)


def run_and_check(M, dtype, kind, bias, p, rslora, backend, lead=None, seed=0, n=N, k=KDIM, dropout_seed=1234):
    w, dense, x, A, B, b = make_problem(M, dtype, kind, bias, seed=seed, lead=lead, n=n, k=k)
    scale = ALPHA / math.sqrt(RANK) if rslora else ALPHA / RANK
    # the reference mask (pure torch): every backend must drop exactly these elements
    keep = L.dropout_mask(x.reshape(-1, k).shape, p, dropout_seed, "cpu").reshape(x.shape) if p else None
    xs, As, Bs = x.clone().requires_grad_(True), A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    bs = None if b is None else b.clone().requires_grad_(True)
    fn = lora_linear_nf4 if kind == "nf4" else lora_linear
    y = fn(xs, w, As, Bs, scale, bs, dropout=p, backend=backend, dropout_seed=dropout_seed)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], n)
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(dtype)
    (y * g).sum().backward()
    ref = peft_style(x, dense.double(), A.double(), B.double(), scale, b, keep, p, torch.float64)
    same = peft_style(x, dense, A, B, scale, b, keep, p, dtype)
    ours = (y, xs.grad, As.grad, Bs.grad, None if bs is None else bs.grad)
    for name, o, s, r in zip(("y", "dx", "dA", "dB", "dbias"), ours, same, ref, strict=True):
        if r is None:
            assert o is None
            continue
        assert o.dtype == s.dtype, f"{name} dtype {o.dtype} != {s.dtype}"
        assert_within_rule(o, s, r, dtype, f"{name} ({backend}, M={M}, {dtype}, {kind})")


# ---------------------------------------------------------------------------------------------------
# Forward and gradients
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 3, 16, 67])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["nf4", "dense"])
def test_torch_backend_matches_reference(M, dtype, kind):
    run_and_check(M, dtype, kind, bias=True, p=0.0, rslora=False, backend="torch")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("rslora", [False, True])
def test_torch_backend_bias_dropout_rslora(bias, p, rslora):
    run_and_check(16, torch.bfloat16, "nf4", bias, p, rslora, backend="torch", lead=(2,))


@pytest.mark.parametrize("backward_path", LK.BACKWARD_PATHS)
@pytest.mark.parametrize(
    "M,dtype,kind,bias,p,rslora,n,k",
    [
        (1, torch.float32, "nf4", True, 0.0, True, N, KDIM),
        (3, torch.bfloat16, "nf4", False, 0.3, False, 37, 45),  # odd N and K
        (67, torch.float16, "nf4", True, 0.25, True, N, KDIM),
        (67, torch.bfloat16, "nf4", True, 0.0, False, 37, 45),
        (3, torch.float32, "dense", True, 0.0, True, N, KDIM),
        (67, torch.bfloat16, "dense", False, 0.2, True, 37, 45),
    ],
)
def test_triton_backend_matches_reference(M, dtype, kind, bias, p, rslora, n, k, backward_path, monkeypatch):
    if not usable("triton"):
        pytest.skip("the triton backend of lora_forward/lora_backward is not registered or not usable here")
    monkeypatch.setenv(dispatch.LORA_BACKWARD_PATH_ENV, backward_path)
    run_and_check(M, dtype, kind, bias=bias, p=p, rslora=rslora, backend="triton", n=n, k=k)


@pytest.mark.parametrize("M,dtype,p", [(3, torch.float32, 0.0), (67, torch.bfloat16, 0.2)])
def test_ext_backend_matches_reference(M, dtype, p):
    if not usable("ext"):
        pytest.skip("the C++ extension is not built or has no CPU lora kernels")
    run_and_check(M, dtype, "nf4", bias=True, p=p, rslora=False, backend="ext")


def test_non_contiguous_x_is_handled():
    w, dense, x, A, B, b = make_problem(8, torch.float32, "nf4")
    xt = x.t().contiguous().t()  # same values, column-major strides
    assert not xt.is_contiguous()
    y = lora_linear_nf4(xt, w, A, B, 2.0, b, backend="torch")
    torch.testing.assert_close(y, lora_linear_nf4(x, w, A, B, 2.0, b, backend="torch"), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------


def test_dropout_mask_is_seeded_and_has_rate_p():
    m1 = L.dropout_mask((64, 96), 0.3, 7, "cpu")
    assert torch.equal(m1, L.dropout_mask((64, 96), 0.3, 7, "cpu"))
    assert not torch.equal(m1, L.dropout_mask((64, 96), 0.3, 8, "cpu"))
    assert abs((~m1).float().mean().item() - 0.3) < 0.03


BACKENDS = ["torch", "triton", "ext"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "M,dtype,kind,p,dropout_seed,k",
    [
        (67, torch.float32, "nf4", 0.1, 2**62 + 7, 45),  # odd K, M not a multiple of any tile
        (3, torch.bfloat16, "nf4", 0.5, 5, KDIM),
        (17, torch.float16, "dense", 0.3, -11, 45),
    ],
)
def test_every_backend_drops_the_reference_elements(backend, M, dtype, kind, p, dropout_seed, k):
    """Forward and gradients with dropout, against the fp64 reference built from the pure-torch mask: a
    backend that dropped other elements would miss the rule by far more than rounding."""
    if not usable(backend):
        pytest.skip(f"the {backend} backend of lora_forward/lora_backward is not usable here")
    run_and_check(M, dtype, kind, True, p, False, backend, lead=(1,), k=k, n=37, dropout_seed=dropout_seed)


def test_torch_backend_row_chunks_cross_rows(monkeypatch):
    """The torch backend builds the mask in row chunks: with chunks of 2 rows the result still follows the
    whole-tensor reference mask."""
    monkeypatch.setattr(D, "REF_CHUNK_ELEMENTS", 2 * 45)
    run_and_check(67, torch.float32, "nf4", True, 0.3, False, "torch", k=45, n=37, dropout_seed=9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_uses_the_forward_mask(backend):
    """y is linear in x, in A and in B separately, so <grad, v> must equal the change of sum(y * g) along v
    with the SAME seed; a backward that regenerated another mask would not."""
    if not usable(backend):
        pytest.skip(f"the {backend} backend of lora_forward/lora_backward is not usable here")
    w, _, x, A, B, b = make_problem(29, torch.float32, "nf4", k=KDIM)
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(29, N, generator=gen)
    vx, vA, vB = (
        torch.randn(x.shape, generator=gen),
        torch.randn(A.shape, generator=gen),
        torch.randn(B.shape, generator=gen),
    )

    def loss(x_, A_, B_):
        return (lora_linear_nf4(x_, w, A_, B_, 2.0, b, dropout=0.4, backend=backend, dropout_seed=77) * g).sum()

    xs, As, Bs = (t.clone().requires_grad_(True) for t in (x, A, B))
    loss(xs, As, Bs).backward()
    with torch.no_grad():
        base = loss(x, A, B).double()
        for name, grad, change in (
            ("x", xs.grad, loss(x + vx, A, B).double() - base),
            ("A", As.grad, loss(x, A + vA, B).double() - base),
            ("B", Bs.grad, loss(x, A, B + vB).double() - base),
        ):
            v = {"x": vx, "A": vA, "B": vB}[name]
            predicted = (grad.double() * v.double()).sum()
            assert abs(predicted - change) <= 1e-4 * (abs(change) + 1), f"d/d{name}: {predicted} vs {change}"


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan"), True, "0.2"])
def test_bad_dropout_probability_raises_naming_it(p):
    w, _, x, A, B, b = make_problem(3, torch.float32, "nf4")
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got"):
        lora_linear_nf4(x, w, A, B, 1.0, dropout=p)
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got"):
        lora_linear_multi(x, [(w, A, B, 1.0, b)], dropout=p)


def test_dropout_unseeded_follows_torch_manual_seed_and_only_touches_lora_branch():
    w, dense, x, A, B, b = make_problem(16, torch.float32, "nf4")
    torch.manual_seed(3)
    y1 = lora_linear_nf4(x, w, A, B, 2.0, b, dropout=0.5, backend="torch")
    torch.manual_seed(3)
    y2 = lora_linear_nf4(x, w, A, B, 2.0, b, dropout=0.5, backend="torch")
    y3 = lora_linear_nf4(x, w, A, B, 2.0, b, dropout=0.5, backend="torch")
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    # With B = 0 the LoRA branch is zero: dropout must not change the output at all.
    zero_b = torch.zeros_like(B)
    base = lora_linear_nf4(x, w, A, zero_b, 2.0, b, backend="torch")
    torch.testing.assert_close(
        lora_linear_nf4(x, w, A, zero_b, 2.0, b, dropout=0.5, backend="torch"), base, rtol=0, atol=0
    )


# ---------------------------------------------------------------------------------------------------
# What autograd keeps, and what it never touches
# ---------------------------------------------------------------------------------------------------


def saved_tensors_of(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize(
    "backend,backward_path", [("torch", None), ("triton", "fused"), ("triton", "dequant"), ("ext", None)]
)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_saves_packed_weight_x_and_adapters_only(p, backend, backward_path, monkeypatch):
    if backend != "torch" and not usable(backend):
        pytest.skip("the triton backend of lora_forward/lora_backward is not registered or not usable here")
    w, dense, x, A, B, b = make_problem(67, torch.float32, "nf4")
    x.requires_grad_(True)
    A.requires_grad_(True)
    dequantized = []
    if backward_path is not None:
        monkeypatch.setenv(dispatch.LORA_BACKWARD_PATH_ENV, backward_path)
        original = LK._dequantize
        monkeypatch.setattr(LK, "_dequantize", lambda *a, **kw: dequantized.append(1) or original(*a, **kw))
    y, saved = saved_tensors_of(
        lambda: lora_linear_nf4(x, w, A, B.requires_grad_(True), 2.0, b, dropout=p, backend=backend)
    )
    assert not dequantized, "the forward at M = 67 runs a fused path: it must not dequantize W"
    y.sum().backward()
    # The dequant backward decodes W once, inside the backward (dx only), from the saved packed bytes.
    assert len(dequantized) == (1 if backward_path == "dequant" else 0)
    for t in saved:
        assert not (t.dtype.is_floating_point and t.shape == (N, KDIM)), "a dense copy of W was saved"
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), "only x itself may be saved at (M, K) size (no drop(x))"
    assert any(t.dtype == torch.uint8 and t.data_ptr() == w.packed.data_ptr() for t in saved)


def test_no_gradient_reaches_the_base_weight():
    w, dense, x, A, B, b = make_problem(4, torch.float32, "dense")
    w.requires_grad_(True)
    with pytest.raises(ValueError, match="requires grad.*frozen"):
        lora_linear(x, w, A, B, 1.0)
    w.requires_grad_(False)
    A.requires_grad_(True)
    lora_linear(x, w, A, B, 1.0, backend="torch").sum().backward()
    assert w.grad is None and A.grad is not None
    qw, *_ = make_problem(4, torch.float32, "nf4")
    before = qw.packed.clone()
    lora_linear_nf4(x, qw, A, B, 1.0, backend="torch").sum().backward()
    assert torch.equal(qw.packed, before) and qw.packed.grad is None


# ---------------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "dense"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck_lora_linear(kind, p):
    w, dense, x, A, B, b = make_problem(5, torch.float32, kind)
    seed = torch.tensor(11) if p else None
    projection = (w, A.requires_grad_(True), B.requires_grad_(True), 0.7, b)
    args = L.lora_op_args(x.requires_grad_(True), [projection], p, seed, "torch")
    torch.library.opcheck(L.LORA.op, L.LORA.positional(args))


def test_opcheck_base_only_and_several_projections():
    w1, _, x, A1, B1, b1 = make_problem(5, torch.float32, "nf4", seed=1)
    w2, _, _, A2, B2, _ = make_problem(5, torch.float32, "dense", seed=2, n=24)
    base_only = L.lora_op_args(x.clone().requires_grad_(True), [(w1, None, None, 0.0, b1)], 0.0, None, "torch")
    torch.library.opcheck(L.LORA.op, L.LORA.positional(base_only))
    projections = [
        (w1, A1.requires_grad_(True), B1.requires_grad_(True), 0.5, b1.requires_grad_(True)),
        (w2, A2.requires_grad_(True), B2, 2.0, None),
    ]
    args = L.lora_op_args(x.requires_grad_(True), projections, 0.1, torch.tensor(5), "torch")
    torch.library.opcheck(L.LORA.op, L.LORA.positional(args))


def test_the_op_arguments_are_declared_once():
    # the backward op is derived from the forward op; the weight fields come from NF4Weight's
    fwd, bwd = L.LORA, L.LORA_BACKWARD
    assert bwd.names == ("dy", *(n for n in fwd.names if n != "bias"), "xa", "need_dx", "need_dA", "need_dB")
    assert [n for n in fwd.names if n.startswith("w_")][:4] == [f"w_{f}" for f in TENSOR_FIELDS]
    assert str(torch.ops.lowrank.lora_linear.default._schema).endswith(fwd.schema.split("(", 1)[1].split(")")[1])
    with pytest.raises(TypeError, match="missing arguments \\['seed'\\]"):
        fwd.positional({n: None for n in fwd.names if n != "seed"})


def test_torch_compile_fullgraph_matches_eager():
    w, dense, x, A, B, b = make_problem(6, torch.float32, "nf4", lead=(2,))

    def step(x, A, B):
        return lora_linear_nf4(x, w, A, B, 2.0, b, dropout=0.1, backend="torch", dropout_seed=torch.tensor(9))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for f in (step, compiled):
        xs, As, Bs = (t.clone().requires_grad_(True) for t in (x, A, B))
        y = f(xs, As, Bs)
        y.square().sum().backward()
        grads.append((y, xs.grad, As.grad, Bs.grad))
    for eager, comp in zip(*grads, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Several projections of one input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_multi_equals_separate_calls(p):
    x = torch.randn(2, 7, KDIM)
    projections = []
    for i, (kind, n) in enumerate([("nf4", 40), ("nf4", 24), ("dense", 24)]):
        w, _, _, A, B, b = make_problem(1, torch.float32, kind, bias=(i != 1), seed=i, n=n)
        projections.append((w, A.requires_grad_(True), B.requires_grad_(True), 0.5 + i, b))
    xm = x.clone().requires_grad_(True)
    outs, saved = saved_tensors_of(
        lambda: lora_linear_multi(xm, projections, dropout=p, backend="torch", dropout_seed=21)
    )
    sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
    assert sum(t.data_ptr() == xm.data_ptr() for t in saved) == 1, "x must be saved exactly once"
    multi_grads = [(A.grad.clone(), B.grad.clone()) for _, A, B, _, _ in projections]
    for _, A, B, _, _ in projections:
        A.grad = B.grad = None
    xs = x.clone().requires_grad_(True)
    for i, (w, A, B, s, b) in enumerate(projections):
        fn = lora_linear if isinstance(w, torch.Tensor) else lora_linear_nf4
        y = fn(xs, w, A, B, s, b, dropout=p, backend="torch", dropout_seed=21 + i)
        torch.testing.assert_close(outs[i], y, rtol=1e-6, atol=1e-6)
        (y * (i + 1)).sum().backward()
    torch.testing.assert_close(xm.grad, xs.grad, rtol=1e-5, atol=1e-5)
    for (dA, dB), (_, A, B, _, _) in zip(multi_grads, projections, strict=True):
        torch.testing.assert_close(dA, A.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dB, B.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backward_path", LK.BACKWARD_PATHS)
@pytest.mark.parametrize("M,dtype,p", [(3, torch.float32, 0.3), (67, torch.bfloat16, 0.0), (1, torch.float16, 0.2)])
def test_multi_triton_matches_reference(M, dtype, p, backward_path, monkeypatch):
    if not usable("triton"):
        pytest.skip("the triton backend of lora_forward/lora_backward is not registered or not usable here")
    monkeypatch.setenv(dispatch.LORA_BACKWARD_PATH_ENV, backward_path)
    check_multi(M, dtype, p, "triton", f"triton multi, {backward_path}")


@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("M,dtype,p", [(67, torch.bfloat16, 0.3), (5, torch.float32, 0.1)])
def test_multi_with_dropout_matches_reference(M, dtype, p, backend):
    if not usable(backend):
        pytest.skip(f"the {backend} backend of lora_forward/lora_backward is not usable here")
    check_multi(M, dtype, p, backend, f"{backend} multi")


def check_multi(M, dtype, p, backend, label):
    # q/k/v-style: two NF4 projections (one with odd N) and a dense one in ONE op, dx summed over them; with
    # dropout, projection i drops the elements of the reference mask of seed 21 + i.
    problems, projections = [], []
    x = make_problem(M, dtype)[2]
    for i, (kind, n, bias) in enumerate([("nf4", 40, True), ("nf4", 23, False), ("dense", 24, True)]):
        w, dense, _, A, B, b = make_problem(M, dtype, kind, bias, seed=i, n=n)
        scale = ALPHA / math.sqrt(RANK) if i == 0 else ALPHA / RANK
        problems.append((dense, A, B, scale, b))
        projections.append((w, A.clone().requires_grad_(True), B.clone().requires_grad_(True), scale, b))
    xm = x.clone().requires_grad_(True)
    outs = lora_linear_multi(xm, projections, dropout=p, backend=backend, dropout_seed=21)
    grads = [torch.linspace(-1, 1, o.numel(), dtype=torch.float64).reshape(o.shape).to(dtype) for o in outs]
    sum((o * g).sum() for o, g in zip(outs, grads, strict=True)).backward()
    refs = {torch.float64: [], dtype: []}
    for i, (dense, A, B, scale, b) in enumerate(problems):
        keep = L.dropout_mask(x.shape, p, 21 + i, "cpu") if p else None
        ref64 = peft_style(x, dense.double(), A.double(), B.double(), scale, b, keep, p, torch.float64)
        refs[torch.float64].append(ref64)
        refs[dtype].append(peft_style(x, dense, A, B, scale, b, keep, p, dtype))
    what = f"({label}, M={M}, {dtype})"
    for i, (_, A, B, _, _) in enumerate(projections):
        ref, same = refs[torch.float64][i], refs[dtype][i]
        assert_within_rule(outs[i], same[0], ref[0], dtype, f"y[{i}] {what}")
        assert_within_rule(A.grad, same[2], ref[2], dtype, f"dA[{i}] {what}")
        assert_within_rule(B.grad, same[3], ref[3], dtype, f"dB[{i}] {what}")
    dx_same = sum(r[1].float() for r in refs[dtype]).to(dtype)  # summed in fp32 like the op
    assert_within_rule(xm.grad, dx_same, sum(r[1] for r in refs[torch.float64]), dtype, f"dx {what}")


def test_multi_with_unused_output_and_errors():
    w, _, x, A, B, b = make_problem(3, torch.float32, "nf4")
    A.requires_grad_(True)
    q, k = lora_linear_multi(x, [(w, A, B, 1.0, b), (w, A, B, 1.0, None)], backend="torch")
    q.sum().backward()  # k never reaches the loss
    assert A.grad is not None
    with pytest.raises(ValueError, match="empty"):
        lora_linear_multi(x, [])
    with pytest.raises(ValueError, match=r"projections\[0\] must be"):
        lora_linear_multi(x, [(w, A, B)])
    with pytest.raises(ValueError, match=r"A\[1\] must be"):
        lora_linear_multi(x, [(w, A, B, 1.0, b), (w, A[:, :10], B, 1.0, None)])


# ---------------------------------------------------------------------------------------------------
# Multi-adapter serving forward
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "dense"])
def test_multi_adapter_matches_per_sequence_loop(kind):
    w, _, _, _, _, b = make_problem(1, torch.float32, kind)
    gen = torch.Generator().manual_seed(5)
    n_adapters, r = 3, 4
    x = torch.randn(5, 6, KDIM, generator=gen)
    A_stack = torch.randn(n_adapters, r, KDIM, generator=gen) * 0.1
    B_stack = torch.randn(n_adapters, N, r, generator=gen) * 0.1
    scales = [0.5, 1.0, 4.0]
    ids = torch.tensor([2, 0, -1, 2, 1])
    y = lora_linear_multi_adapter(x, w, A_stack, B_stack, scales, ids, b, backend="torch")
    fn = lora_linear if kind == "dense" else lora_linear_nf4
    for i, a in enumerate(ids.tolist()):
        if a < 0:
            ref = fn(x[i], w, A_stack[0], torch.zeros_like(B_stack[0]), 1.0, b, backend="torch")
        else:
            ref = fn(x[i], w, A_stack[a], B_stack[a], scales[a], b, backend="torch")
        torch.testing.assert_close(y[i], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="adapter_ids must be in"):
        lora_linear_multi_adapter(x, w, A_stack, B_stack, scales, torch.tensor([0, 1, 3, 0, 0]))
    with pytest.raises(ValueError, match="scales must have one entry"):
        lora_linear_multi_adapter(x, w, A_stack, B_stack, [1.0], ids)


# ---------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the value
# ---------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    w, _, x, A, B, b = make_problem(3, torch.float32, "nf4")
    with pytest.raises(ValueError, match="expects 96"):
        lora_linear_nf4(x[:, :50], w, A, B, 1.0)
    with pytest.raises(ValueError, match=r"rank r=0"):
        lora_linear_nf4(x, w, A[:0], B[:, :0], 1.0)
    with pytest.raises(ValueError, match=r"rank r=41"):
        lora_linear_nf4(x, w, torch.randn(41, KDIM), torch.randn(N, 41), 1.0)
    with pytest.raises(ValueError, match=r"B must be \(out, r\)"):
        lora_linear_nf4(x, w, A, B.t(), 1.0)
    with pytest.raises(TypeError, match="x dtype"):
        lora_linear_nf4(x.to(torch.int32), w, A, B, 1.0)
    with pytest.raises(TypeError, match="A dtype"):
        lora_linear_nf4(x, w, A.double(), B, 1.0)
    with pytest.raises(ValueError, match="bias must have 40"):
        lora_linear_nf4(x, w, A, B, 1.0, torch.zeros(39))
    with pytest.raises(ValueError, match="dropout must be"):
        lora_linear_nf4(x, w, A, B, 1.0, dropout=1.0)
    with pytest.raises(ValueError, match="scale must be a finite"):
        lora_linear_nf4(x, w, A, B, float("nan"))
    with pytest.raises(ValueError, match="is on meta"):
        lora_linear_nf4(x, w, A.to("meta"), B, 1.0)
    with pytest.raises(TypeError, match="use lora_linear_nf4"):
        lora_linear(x, w, A, B, 1.0)
    with pytest.raises(TypeError, match="expects an NF4Weight"):
        lora_linear_nf4(x, torch.randn(N, KDIM), A, B, 1.0)
    with pytest.raises(ValueError, match="'gpu' is not a backend"):
        lora_linear_nf4(x, w, A, B, 1.0, backend="gpu")


@pytest.mark.parametrize(
    "setting, expected", [("fused", "fused"), ("dequant", "dequant"), ("auto", None), (None, None)]
)
def test_backward_path_variable_is_read_by_the_dispatch_point(setting, expected, monkeypatch):
    if not usable("triton"):
        pytest.skip("the triton backend of lora_backward is not registered or not usable here")
    if setting is None:
        monkeypatch.delenv(dispatch.LORA_BACKWARD_PATH_ENV, raising=False)
    else:
        monkeypatch.setenv(dispatch.LORA_BACKWARD_PATH_ENV, setting)
    seen = []
    monkeypatch.setattr(LK, "lora_backward_unchecked", lambda *args, path=None, **kwargs: seen.append(path))
    dispatch.implementation("lora_backward", "triton")("dy", "x", "w", "A", "B", 2.0, "xa")
    assert seen == [expected]
    monkeypatch.setenv(dispatch.LORA_BACKWARD_PATH_ENV, "cublas")
    with pytest.raises(ValueError, match="LOWRANK_LORA_BACKWARD_PATH must be one of .*'cublas'"):
        dispatch.implementation("lora_backward", "triton")("dy", "x", "w", "A", "B", 2.0, "xa")
