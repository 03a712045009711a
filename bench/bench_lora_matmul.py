"""LoRA linear over a frozen NF4 weight: forward, backward and forward+backward, against the baselines the
goals are stated at, the pure-torch path (eager and compiled) and PEFT + bitsandbytes.

Problem: ``y = x·dequant(W)ᵀ + s·(x·Aᵀ)·Bᵀ``; x (M, K) bf16, W (N, K) NF4 with double quant (blocksize 64),
A (r, K) and B (N, r) fp32 (PEFT's default), s = 2 (alpha = 2r). Shapes "KxN" from the registry,
M ∈ {1, 16, 64, 2048, 8192}, r ∈ {16, 64} (the ``goal`` suite: r = 16).

Work and traffic (what the floor is computed from; adapters fp32, activations bf16):
  forward   flops 2MNK + 2Mr(K+N); bytes 0.516·NK (W) + 2MK (x) + 2MN (y) + 4r(K+N) (A, B) + 4Mr (xa)
  backward  flops 2MNK + 4Mr(K+N); bytes 0.516·NK + 2MN (dy) + 2MK (x) + 2MK (dx) + 4Mr (xa) + 8r(K+N)
Dense baselines move 2 B per weight element instead of 0.516. ``fraction_of_limit`` is the roofline floor
(copy bandwidth or bf16 GEMM peak, whichever bounds) over the measured time.

Goals on H100 (docs/bench.md, "Where the goals come from"): forward at M ≤ 64 ≥ 3× faster than ``dequant_gemm``
(dequantize + cuBLAS); at M ≥ 2048 within ~10 % of ``gemm_dense`` (cuBLAS bf16 GEMM on a pre-dequantized
W: ~5 % GEMM + < 5 % LoRA overhead); backward (dX + dA + dB) ≤ 1.1× ``gemm_dx`` (the dX GEMM alone).

Providers: ``triton`` (lowrank.kernels.lora_matmul launchers; ``triton:<path>`` forces one forward path),
``lowrank_op`` (the autograd op ``lowrank.ops.lora_linear_nf4``, forward+backward), ``torch`` (reference
dequant + matmuls, autograd for the gradients), ``torch_compiled`` (the same function under
``torch.compile(dynamic=True)``), ``peft_bnb`` (PEFT LoRA on a bitsandbytes ``Linear4bit``), and the
baselines ``gemm_dense``, ``dequant_gemm``, ``gemm_dx``, ``gemm_fwd_dx``. Forward-only runs under
``torch.no_grad()``; gradients are taken with ``torch.autograd.grad`` (nothing accumulates in ``.grad``).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from _harness import (
    BLOCKSIZE,
    DEVICE,
    DTYPE,
    LORA_GOAL_RANKS,
    LORA_M,
    LORA_RANKS,
    LORA_SHAPES,
    SHAPES,
    SUITE,
    nf4_weight_bytes,
    optional_module,
    rows,
    skip_reason,
)
from lowrank.kernels import lora_matmul as LM
from lowrank.kernels import nf4 as K

import lowrank.nf4
import lowrank.ops
from lowrank.ops import dispatch

ALPHA_PER_RANK = 2  # alpha = 2r, the common QLoRA setting: s = 2
FORWARD_PATHS = ("fused_small_m", "fused_tiled", "dequant_matmul")
SMALL_M_PATH_MAX = 2048  # the weight-streaming path is not meant for more rows; do not spend time on it
DENSE_BASELINES = ("gemm_dense", "gemm_dx", "gemm_fwd_dx")


@dataclasses.dataclass(frozen=True)
class Case:
    mode: str  # "fwd" | "bwd" | "fwd_bwd"
    shape: str
    m: int
    r: int | None  # None: a baseline that has no adapter
    provider: str
    tier: int  # run order: 0 what the goals compare, 1 path variants and competitors, 2 compiled, 3 the larger rank

    @property
    def id(self) -> str:
        rank = f"r{self.r}" if self.r is not None else "base"
        return f"{self.mode}-{self.shape}-M{self.m}-{rank}-{self.provider}"


def _cases() -> list:
    ranks = LORA_GOAL_RANKS if SUITE == "goal" else LORA_RANKS
    ours = {"fwd": "triton", "bwd": "triton", "fwd_bwd": "lowrank_op"}
    baselines = {"fwd": ("gemm_dense", "dequant_gemm"), "bwd": ("gemm_dx",), "fwd_bwd": ("gemm_fwd_dx",)}
    cases = []
    for mode in ("fwd", "bwd", "fwd_bwd"):
        for shape in LORA_SHAPES:
            for m in LORA_M:
                for r in ranks:
                    first = r == ranks[0]
                    cases.append(Case(mode, shape, m, r, ours[mode], 0 if first else 3))
                    if mode == "fwd":
                        paths = [p for p in FORWARD_PATHS if p != "fused_small_m" or m <= SMALL_M_PATH_MAX]
                        cases += [Case(mode, shape, m, r, f"triton:{p}", 1 if first else 3) for p in paths]
                    cases += [Case(mode, shape, m, r, p, 1 if first else 3) for p in ("peft_bnb", "torch")]
                    cases.append(Case(mode, shape, m, r, "torch_compiled", 2 if first else 3))
                cases += [Case(mode, shape, m, None, p, 0) for p in baselines[mode]]
    order = {"fwd": 0, "bwd": 1, "fwd_bwd": 2}
    cases.sort(
        key=lambda c: (c.tier, order[c.mode], LORA_SHAPES.index(c.shape), c.m, c.r or 0)
    )  # stable: keeps provider order
    return [pytest.param(c, id=c.id) for c in cases]


# ----------------------------------------------------------------------------------------------------
# The problem and the pure-torch path.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    x: torch.Tensor  # (M, K) bf16
    dy: torch.Tensor  # (M, N) bf16
    qw: lowrank.nf4.NF4Weight  # (N, K), NF4 + double quant
    w_dense: torch.Tensor  # (N, K) bf16, the dequantized weight (dense baselines, PEFT's base)
    A: torch.Tensor | None  # (r, K) fp32
    B: torch.Tensor | None  # (N, r) fp32
    scale: float


def make_problem(shape_name: str, m: int, r: int | None) -> Problem:
    k, n = SHAPES[shape_name].dims
    m = rows(m)
    torch.manual_seed(0)
    w = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k**-0.5
    qw = lowrank.nf4.quantize(w, BLOCKSIZE, double_quant=True)
    w_dense = lowrank.nf4.dequantize(qw, DTYPE)
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    dy = torch.randn(m, n, device=DEVICE, dtype=DTYPE) * n**-0.5
    A = B = None
    if r is not None:  # B is nonzero so that the adapter term is really computed
        A = torch.randn(r, k, device=DEVICE) * k**-0.5
        B = torch.randn(n, r, device=DEVICE) * r**-0.5
    return Problem(x, dy, qw, w_dense, A, B, float(ALPHA_PER_RANK))


def torch_lora_forward(x, packed, absmax, nested_absmax, nested_offset, n: int, k: int, A, B, scale: float):
    """Reference dequantize + bf16 matmul + PEFT-style adapter term (adapter math in A's dtype)."""
    w = K.dequantize_4bit_ref(
        packed, K.double_dequantize_ref(absmax, nested_absmax, nested_offset), (n, k), x.dtype, BLOCKSIZE, "nf4"
    )
    lora = (x.to(A.dtype) @ A.t()) @ B.t()
    return x @ w.t() + (scale * lora).to(x.dtype)


@functools.cache
def _compiled_forward():
    # The backward-only benchmark replays one graph (retain_graph=True), which a compiled backward with
    # donated buffers refuses; donation only saves memory, so it is switched off for every compiled case.
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False
    return torch.compile(torch_lora_forward, dynamic=True)


def _torch_callable(p: Problem, compiled: bool):
    fn = _compiled_forward() if compiled else torch_lora_forward
    qw = p.qw
    n, k = qw.shape
    return lambda x, A, B: fn(x, qw.packed, qw.absmax, qw.nested_absmax, qw.nested_offset, n, k, A, B, p.scale)


def _peft_layer(p: Problem):
    """A PEFT LoRA layer (r, alpha = 2r, no dropout) on a bitsandbytes NF4 + double-quant Linear4bit of W."""
    bnb = optional_module("bitsandbytes")[0]
    peft = optional_module("peft")[0]
    n, k = p.w_dense.shape
    r = p.A.shape[0]
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=DTYPE, compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(
        p.w_dense.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=BLOCKSIZE
    )
    holder = torch.nn.Module()
    holder.proj = base.to(DEVICE)  # Params4bit quantizes when moved to the device
    config = peft.LoraConfig(r=r, lora_alpha=ALPHA_PER_RANK * r, lora_dropout=0.0, target_modules=["proj"], bias="none")
    model = peft.get_peft_model(holder, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(p.A)
        layer.lora_B["default"].weight.copy_(p.B)
    return layer, (layer.lora_A["default"].weight, layer.lora_B["default"].weight)


# ----------------------------------------------------------------------------------------------------
# Work and traffic.
# ----------------------------------------------------------------------------------------------------


def traffic(mode: str, provider: str, m: int, k: int, n: int, r: int | None) -> tuple[float, float]:
    """(bytes moved, flops) of the problem a provider solves; see the module docstring."""
    gemm_flops, dense_w, w4 = 2.0 * m * n * k, 2.0 * n * k, nf4_weight_bytes(n * k)
    if provider in ("gemm_dense", "gemm_dx"):
        return dense_w + 2.0 * m * k + 2.0 * m * n, gemm_flops
    if provider == "gemm_fwd_dx":
        return 2 * (dense_w + 2.0 * m * k + 2.0 * m * n), 2 * gemm_flops
    if provider == "dequant_gemm":
        return w4 + 2 * dense_w + 2.0 * m * k + 2.0 * m * n, gemm_flops
    adapters = 4.0 * r * (k + n)
    fwd = (w4 + 2.0 * m * k + 2.0 * m * n + adapters + 4.0 * m * r, gemm_flops + 2.0 * m * r * (k + n))
    bwd = (w4 + 2.0 * m * n + 4.0 * m * k + 4.0 * m * r + 2 * adapters, gemm_flops + 4.0 * m * r * (k + n))
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


def _max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------------
# The benchmark.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases())
def test_lora(bench, case: Case) -> None:
    reason = skip_reason(case.provider)
    if reason:
        pytest.skip(f"{case.provider}: {reason}")
    p = make_problem(case.shape, case.m, case.r)
    m, k = p.x.shape
    n = p.w_dense.shape[0]
    fn, extra = BUILDERS[case.mode](case.provider, p)
    bytes_moved, flops = traffic(case.mode, case.provider, m, k, n, case.r)
    bench.run(
        fn,
        op=f"lora_{case.mode}",
        case={"shape": SHAPES[case.shape].label, "M": m, "r": case.r, "dtype": "bf16"},
        provider=case.provider,
        bytes_moved=bytes_moved,
        flops=flops,
        ours=case.provider in ("triton", "lowrank_op"),
        extra=extra,
    )


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


def _forward(provider: str, p: Problem):
    x, A, B, s = p.x, p.A, p.B, p.scale
    if provider in DENSE_BASELINES:
        return (lambda: x @ p.w_dense.t()), {}
    if provider == "dequant_gemm":
        backend = lowrank.ops.resolve("dequantize_4bit", DEVICE)
        return (lambda: x @ lowrank.nf4.dequantize(p.qw, DTYPE).t()), {"dequantize_backend": backend}
    reference = torch_lora_forward(
        x, p.qw.packed, p.qw.absmax, p.qw.nested_absmax, p.qw.nested_offset, *p.qw.shape, A, B, s
    )
    if provider.startswith("triton"):
        path = provider.partition(":")[2] or dispatch.choose_forward_path(
            x.shape[0], p.w_dense.shape[0], x.shape[1], x.device
        )

        def fn():
            return LM.lora_forward(x, p.qw, A, B, s, path=path)[0]

        return fn, {"path": path, "max_rel_err_vs_torch": _max_rel_err(fn(), reference)}
    if provider == "peft_bnb":
        layer, _ = _peft_layer(p)
        fn = _no_grad(lambda: layer(x))
    else:
        forward = _torch_callable(p, compiled=provider == "torch_compiled")
        fn = _no_grad(lambda: forward(x, A, B))
    return fn, {"max_rel_err_vs_torch": _max_rel_err(fn(), reference)}


def _graph(provider: str, p: Problem):
    """(forward with grad enabled, the tensors to differentiate) for the autograd-based providers."""
    x = p.x.detach().requires_grad_()
    if provider == "peft_bnb":
        layer, (A, B) = _peft_layer(p)
        return (lambda: layer(x)), (x, A, B)
    A, B = p.A.detach().requires_grad_(), p.B.detach().requires_grad_()
    if provider == "lowrank_op":
        backend = "triton"
        return (lambda: lowrank.ops.lora_linear_nf4(x, p.qw, A, B, p.scale, backend=backend)), (x, A, B)
    forward = _torch_callable(p, compiled=provider == "torch_compiled")
    return (lambda: forward(x, A, B)), (x, A, B)


def _reference_grads(p: Problem) -> tuple[torch.Tensor, ...]:
    forward, inputs = _graph("torch", p)
    return torch.autograd.grad(forward(), inputs, p.dy)


def _backward(provider: str, p: Problem):
    if provider in DENSE_BASELINES:
        return (lambda: p.dy @ p.w_dense), {}
    reference = _reference_grads(p)
    if provider == "triton":
        paths = _triton_paths(p)
        _, xa = LM.lora_forward(p.x, p.qw, p.A, p.B, p.scale, path=paths["path"])

        def fn():
            return LM.lora_backward(p.dy, p.x, p.qw, p.A, p.B, p.scale, xa, path=paths["backward_path"])

        return fn, {**_grad_errors(fn(), reference), **paths}
    forward, inputs = _graph(provider, p)
    y = forward()

    def fn():
        return torch.autograd.grad(y, inputs, p.dy, retain_graph=True)

    return fn, _grad_errors(fn(), reference)


def _triton_paths(p: Problem) -> dict:
    """The forward and backward paths the dispatch point (lowrank.ops.dispatch) chooses for this problem."""
    (m, k), n, r = p.x.shape, p.w_dense.shape[0], p.A.shape[0]
    return {
        "path": dispatch.choose_forward_path(m, n, k, p.x.device),
        "backward_path": dispatch.choose_backward_path(m, n, k, r, p.x.device),
    }


def _forward_backward(provider: str, p: Problem):
    if provider in DENSE_BASELINES:
        return (lambda: (p.x @ p.w_dense.t(), p.dy @ p.w_dense)), {}
    reference = _reference_grads(p)
    forward, inputs = _graph(provider, p)

    def fn():
        return torch.autograd.grad(forward(), inputs, p.dy)

    paths = _triton_paths(p) if provider == "lowrank_op" else {}
    return fn, {**_grad_errors(fn(), reference), **paths}


def _grad_errors(got, reference) -> dict:
    return {
        f"max_rel_err_{name}_vs_torch": _max_rel_err(g, r)
        for name, g, r in zip(("dx", "dA", "dB"), got, reference, strict=True)
    }


BUILDERS = {"fwd": _forward, "bwd": _backward, "fwd_bwd": _forward_backward}
