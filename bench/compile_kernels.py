"""Ahead-of-time compile of every Triton kernel in ``kernels/`` for a GPU this machine does not have.

Run from the repository root, in an environment WITHOUT ``TRITON_INTERPRET=1``::

    python -P bench/compile_kernels.py                       # full sweep, sm_90 and sm_80; exit 1 on any error
    python -P bench/compile_kernels.py --quick --arch 90     # one representative variant per kernel
    python -P bench/compile_kernels.py --out bench/results/<date>-compile-sm90   # + results.json, table.md

How the variants are found (nothing is copied from the launchers):

1. Every launcher of ``lowrank.kernels.nf4`` and ``lowrank.kernels.lora_matmul`` (which launches the
   reductions of ``lora_reduce``) is called on meta tensors (no memory, no device) over inputs that span
   its configuration space; the inputs are read from the kernel modules' own constants (``BLOCKSIZES``,
   ``QUANT_TYPES``, ``FLOAT_DTYPES``, ``NESTED_DTYPES``, ``FORWARD_PATHS``, ``BACKWARD_PATHS``,
   ``FUSED_DX_SMALL_M_MAX``, ``SMALL_BLOCK_M_MAX``, ``FUSED_RANK_MAX``) and from the path thresholds of
   ``lowrank.ops.dispatch`` (``SMALL_M_MAX``, ``TILED_M_MAX``, ``FUSED_BACKWARD_M_MAX``) so that a changed
   threshold moves the sweep with it.
2. ``JITFunction.run`` is replaced for the duration of the recording: each ``kernel[grid](...)`` launch is
   recorded (kernel, arguments, launch options) instead of run. An ``@triton.autotune`` kernel records one
   launch per candidate config (``Autotuner.configs``), so autotune candidates are compiled too.
3. Each launch is specialized exactly as ``JITFunction.run`` would on a GPU (triton's own binder: pointer
   element types, 16-byte alignment, integers equal to 1 or divisible by 16, constexprs, options), against a
   backend made for ``GPUTarget("cuda", arch, 32)``; identical specializations are compiled once.
4. ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(...))`` runs the whole
   pipeline through ptxas (shipped in the triton wheel) to a cubin. ptxas's ``-v`` log gives registers per
   thread, spill bytes and static shared memory; ``compiled.metadata.shared`` the dynamic shared memory.
   (``compiled.n_regs`` / ``n_spills`` exist only after the binary is loaded by a CUDA driver.)

The occupancy on an H200 (sm_90) or A100 (sm_80) follows the CUDA occupancy calculator's rules; see
``occupancy``. A variant that spills or cannot keep two CTAs resident per SM is flagged.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import io
import itertools
import multiprocessing
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import jit as triton_jit

REPO_ROOT = Path(__file__).resolve().parent.parent
ARCHES = (90, 80)

# ----------------------------------------------------------------------------------------------------
# Occupancy (the CUDA occupancy calculator's rules; limits from the CUDA programming guide's table of
# compute capabilities).
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SMLimits:
    name: str
    registers_per_sm: int = 65536
    max_registers_per_thread: int = 255
    register_unit: int = 256  # registers are allocated per warp in units of 256
    sub_partitions: int = 4  # the register file is split over 4 schedulers; warps do not straddle them
    shared_per_sm: int = 228 * 1024
    shared_per_block: int = 227 * 1024  # opt-in maximum for one CTA
    shared_unit: int = 128
    shared_reserved_per_block: int = 1024  # the driver reserves 1 KB per resident CTA (sm_80 and later)
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32


LIMITS = {
    90: SMLimits("H200 (sm_90)"),
    80: SMLimits("A100 (sm_80)", shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
}


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(registers: int, shared_bytes: int, num_warps: int, num_ctas: int = 1, arch: int = 90) -> dict:
    """Resident CTAs per SM allowed by registers, shared memory, threads and the block limit.

    ``registers`` per thread, ``shared_bytes`` per CTA (dynamic + static). Returns the CTAs per SM, the
    limit per resource, the limiting resource(s) and the resulting warp occupancy (fraction of 64 warps).
    """
    lim = LIMITS[arch]
    if registers < 1 or registers > lim.max_registers_per_thread:
        raise ValueError(f"registers per thread must be in [1, {lim.max_registers_per_thread}], got {registers}")
    if num_warps < 1:
        raise ValueError(f"num_warps must be >= 1, got {num_warps}")
    threads = num_warps * 32
    by_threads = lim.max_threads_per_sm // threads
    regs_per_warp = _round_up(registers * 32, lim.register_unit)
    warps_per_sub_partition = (lim.registers_per_sm // lim.sub_partitions) // regs_per_warp
    by_registers = (warps_per_sub_partition * lim.sub_partitions) // num_warps
    shared = _round_up(shared_bytes, lim.shared_unit) + lim.shared_reserved_per_block
    if shared_bytes > lim.shared_per_block:
        by_shared = 0
    else:
        by_shared = lim.shared_per_sm // shared
    by_blocks = lim.max_blocks_per_sm
    limits = {"registers": by_registers, "shared": by_shared, "threads": by_threads, "blocks": by_blocks}
    ctas = min(limits.values())
    if num_ctas > 1:  # a cluster of num_ctas CTAs is scheduled together on num_ctas SMs: same per-SM bound
        ctas = min(ctas, lim.max_blocks_per_sm)
    limiter = sorted(name for name, value in limits.items() if value == ctas)
    warps = ctas * num_warps
    return {
        "ctas_per_sm": ctas,
        "limits": limits,
        "limiter": limiter,
        "warps_per_sm": warps,
        "warp_occupancy": warps / (lim.max_threads_per_sm // 32),
    }


# ----------------------------------------------------------------------------------------------------
# Recording the launches the launchers make.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    kernel: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    case: str  # which launcher call made it


@contextlib.contextmanager
def recording(into: list, case: Callable[[], str]):
    """Within the block, ``kernel[grid](...)`` appends a Launch to ``into`` instead of running the kernel."""
    jit_run = triton_jit.JITFunction.run
    autotuner = getattr(triton.runtime.autotuner, "Autotuner", None)
    tuner_run = autotuner.run if autotuner is not None else None

    def record(self, *args, grid, warmup, **kwargs):
        into.append(Launch(self, args, dict(kwargs), case()))

    def record_candidates(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        for config in self.configs:  # every candidate, not only the one the tuner would pick
            merged = {**kwargs, **config.all_kwargs()}
            target = self.fn
            while not isinstance(target, triton_jit.JITFunction):  # e.g. @autotune over @heuristics
                target = target.fn
            into.append(Launch(target, args, merged, f"{case()} [autotune {config}]"))

    triton_jit.JITFunction.run = record
    if autotuner is not None:
        autotuner.run = record_candidates
    try:
        yield
    finally:
        triton_jit.JITFunction.run = jit_run
        if autotuner is not None:
            autotuner.run = tuner_run


def _allow_meta_device(module) -> contextlib.AbstractContextManager:
    """The LoRA launchers accept CUDA tensors only; let them see meta tensors as the device they stand for."""
    check = getattr(module, "_check_device", None)
    if check is None:
        raise RuntimeError(
            f"{module.__name__} has no _check_device: the compile sweep expects the launchers' device check "
            "there (update bench/compile_kernels.py where it moved)"
        )

    @contextlib.contextmanager
    def patched():
        def check_or_meta(device):
            if device.type != "meta":
                check(device)

        module._check_device = check_or_meta
        try:
            yield
        finally:
            module._check_device = check

    return patched()


# ----------------------------------------------------------------------------------------------------
# The launcher calls that span the configuration space (inputs from the kernel modules' constants).
# ----------------------------------------------------------------------------------------------------

META = torch.device("meta")
#: Multiples of 16 as in every model shape; N and K also divide the largest block size (FAST_DECODE).
BASE_N, BASE_K = 4096, 4096
#: A K that no block size divides (the general decode path) but 16 does (the alignment of real shapes).
RAGGED_K = 4096 + 16


def _nf4_cases(nf4, quick: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    n = BASE_N * BASE_K
    dtypes, blocksizes = nf4.FLOAT_DTYPES, nf4.BLOCKSIZES
    if quick:
        dtypes, blocksizes = (torch.bfloat16,), (64,)
    for dtype, blocksize, quant_type in itertools.product(dtypes, blocksizes, nf4.QUANT_TYPES):
        x = torch.empty(n, dtype=dtype, device=META)
        yield (
            f"quantize_4bit({_dt(dtype)}, blocksize={blocksize}, {quant_type})",
            lambda x=x, b=blocksize, q=quant_type: nf4.quantize_4bit(x, b, q),
        )
    for blocksize, quant_type, nested, dtype in itertools.product(
        blocksizes, nf4.QUANT_TYPES, (None, *nf4.NESTED_DTYPES), dtypes
    ):
        nb = nf4.num_blocks(n, blocksize)
        packed = torch.empty(nf4.packed_shape(n), dtype=torch.uint8, device=META)
        if nested is None:
            absmax, nested_absmax, nested_offset = torch.empty(nb, device=META), None, None
        else:
            absmax = torch.empty(nb, dtype=torch.uint8, device=META)
            nested_absmax = torch.empty(nf4.num_blocks(nb, nf4.NESTED_BLOCKSIZE), device=META)
            nested_offset = torch.empty((), device=META)
        label = f"dequantize_4bit({quant_type}, blocksize={blocksize}, dq={_dt(nested)}, out={_dt(dtype)})"
        yield (
            label,
            lambda a=(packed, absmax, nested_absmax, nested_offset), b=blocksize, q=quant_type, d=dtype, nd=nested: (
                nf4.dequantize_4bit(*a, (BASE_N, BASE_K), d, b, q, nd or torch.float32)
            ),
        )
    nb = nf4.num_blocks(n, 64)
    yield "double_quantize", lambda: nf4.double_quantize(torch.empty(nb, device=META))
    for nested in nf4.NESTED_DTYPES:
        q = torch.empty(nb, dtype=torch.uint8, device=META)
        nested_absmax = torch.empty(nf4.num_blocks(nb, nf4.NESTED_BLOCKSIZE), device=META)
        nested_offset = torch.empty((), device=META)
        yield (
            f"double_dequantize(nested={_dt(nested)})",
            lambda a=(q, nested_absmax, nested_offset), nd=nested: nf4.double_dequantize(*a, nd),
        )
    # Sizes that 16 does not divide (no divisibility hint on n): one case per launcher.
    odd = 4096 * 33 + 2 * 7
    yield "quantize_4bit(odd numel)", lambda: nf4.quantize_4bit(torch.empty(odd, dtype=torch.bfloat16, device=META))
    packed = torch.empty(nf4.packed_shape(odd), dtype=torch.uint8, device=META)
    yield (
        "dequantize_4bit(odd numel)",
        lambda: nf4.dequantize_4bit(
            packed, torch.empty(nf4.num_blocks(odd, 64), device=META), None, None, (odd,), torch.bfloat16
        ),
    )


def _dt(dtype) -> str:
    return "none" if dtype is None else {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _lora_weight(nf4, kind: str, N: int, K: int, blocksize: int = 64, nested=torch.float32):
    """A dense (N, K) tensor (kind fp32/fp16/bf16) or an NF4Weight of meta tensors (kind nf4/fp4, +dq)."""
    if kind in ("fp32", "fp16", "bf16"):
        return torch.empty(
            (N, K), dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[kind], device=META
        )
    quant_type, _, dq = kind.partition("+")
    n = N * K
    nb = nf4.num_blocks(n, blocksize)
    from lowrank.nf4_format import NF4Weight

    return NF4Weight.trusted(
        torch.empty(nf4.packed_shape(n), dtype=torch.uint8, device=META),
        torch.empty(nb, dtype=torch.uint8 if dq else torch.float32, device=META),
        (N, K),
        torch.bfloat16,
        blocksize,
        quant_type,
        torch.empty(nf4.num_blocks(nb, nf4.NESTED_BLOCKSIZE), device=META) if dq else None,
        torch.empty((), device=META) if dq else None,
        nested,
    )


@dataclasses.dataclass(frozen=True)
class LoraCase:
    """One launcher input: the axes of the LoRA kernels' configuration space."""

    direction: str  # "forward" or "backward"
    path: str  # one of FORWARD_PATHS / BACKWARD_PATHS
    M: int
    r: int
    x: str = "bf16"  # x / dy dtype
    weight: str = "nf4+dq"  # dense fp32/fp16/bf16, or nf4 / fp4 (+dq)
    blocksize: int = 64
    nested: str = "fp32"
    K: int = BASE_K
    adapters: str = "x"  # A and B dtype: "x" (= x's dtype) or fp32/fp16/bf16
    bias: str = "none"  # forward only: none or a dtype
    dropout: bool = False  # LoRA dropout (the keep-mask generated in the kernels)
    need: str = "dx,dA,dB"  # backward only

    def label(self) -> str:
        parts = [f"{self.direction}/{self.path}", f"M={self.M}", f"r={self.r}", f"x={self.x}", f"W={self.weight}"]
        if self.weight not in ("fp32", "fp16", "bf16"):
            parts.append(f"bs={self.blocksize}")
            if "+dq" in self.weight:
                parts.append(f"nested={self.nested}")
        if self.K != BASE_K:
            parts.append(f"K={self.K}")
        if self.adapters != "x":
            parts.append(f"AB={self.adapters}")
        if self.bias != "none":
            parts.append(f"bias={self.bias}")
        if self.dropout:
            parts.append("dropout")
        if self.direction == "backward" and self.need != "dx,dA,dB":
            parts.append(f"need={self.need}")
        return " ".join(parts)


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _run_lora_case(lora, nf4, case: LoraCase) -> None:
    import lowrank.kernels.dropout as lora_dropout

    x_dtype = _DTYPES[case.x]
    ab_dtype = x_dtype if case.adapters == "x" else _DTYPES[case.adapters]
    N, K, M, r = BASE_N, case.K, case.M, case.r
    weight = _lora_weight(nf4, case.weight, N, K, case.blocksize, _DTYPES[case.nested])
    x = torch.empty((M, K), dtype=x_dtype, device=META)
    A = torch.empty((r, K), dtype=ab_dtype, device=META)
    B = torch.empty((N, r), dtype=ab_dtype, device=META)
    dropout = lora_dropout.Dropout.of(0.1, 1234) if case.dropout else None
    if case.direction == "forward":
        bias = None if case.bias == "none" else torch.empty(N, dtype=_DTYPES[case.bias], device=META)
        lora.lora_forward(x, weight, A, B, 2.0, bias, dropout, path=case.path)
    else:
        dy = torch.empty((M, N), dtype=x_dtype, device=META)
        xa = torch.empty((M, r), dtype=torch.float32, device=META)
        need = case.need.split(",")
        lora.lora_backward(
            dy, x, weight, A, B, 2.0, xa, dropout, "dx" in need, "dA" in need, "dB" in need, path=case.path
        )


def lora_cases(lora, nf4, quick: bool, widest_tile: int | None = None) -> list[LoraCase]:
    """The LoRA launcher inputs: a core cross product, and every other axis varied against it.

    Core (full cross product): direction x path x M x r x input dtype x weight format (dense in the input
    dtype, NF4, NF4 + double quant), where M runs over the values around every threshold of the module (so
    every row tile, shrink/grad block and split the launchers derive from M is reached) and r over the
    ranks around FUSED_RANK_MAX (every BLOCK_R, both FUSE_LOW choices). Secondary axes, each value crossed
    with every direction x path x M x r of the core at the default input dtype (bf16) and weight (NF4 + DQ):
    the block sizes up to the widest tile the launchers pick (``widest_tile``: they change DECODE_SUB, the
    decode's structure), ragged K (the general decode path), nested dtypes, adapter dtypes, bias dtypes,
    a separate LoRA input, partial backward outputs, dense fp32/fp16 weights, FP4 (+DQ). The larger block
    sizes (same structure, another divisor) are crossed with one (M, r) per direction and path, aligned and
    ragged. Identical specializations are compiled once, so the dedup decides the final count.
    """
    from lowrank.ops import dispatch as policy  # the path thresholds live with the dispatch point

    ms = {1, 3, 2048}
    thresholds = (policy.SMALL_M_MAX, policy.TILED_M_MAX, policy.FUSED_BACKWARD_M_MAX)
    for t in (*thresholds, lora.FUSED_DX_SMALL_M_MAX, lora.SMALL_BLOCK_M_MAX):
        ms.update({t, t + 1})
    ms.update(1 << k for k in range(4, 12) if (1 << k) <= lora.SMALL_BLOCK_M_MAX)
    ms = sorted(ms)
    rs = sorted({8, 16, 32, lora.FUSED_RANK_MAX, lora.FUSED_RANK_MAX + 1, 2 * lora.FUSED_RANK_MAX})
    directions = [("forward", p) for p in lora.FORWARD_PATHS] + [("backward", p) for p in lora.BACKWARD_PATHS]
    if quick:
        return [LoraCase("forward", "fused_small_m", 16, 16), LoraCase("forward", "fused_tiled", 128, 16)] + [
            LoraCase("backward", "fused", 16, 16)
        ]
    xs = [_dt(d) for d in nf4.FLOAT_DTYPES]
    grid = [(d, p, m, r) for (d, p), m, r in itertools.product(directions, ms, rs)]
    core = [LoraCase(*g, x=x, weight=w) for g, x, w in itertools.product(grid, xs, ["bf16", "nf4", "nf4+dq"])]
    if widest_tile is None:
        return core
    small_bs = [b for b in nf4.BLOCKSIZES if b <= widest_tile]
    large_bs = [b for b in nf4.BLOCKSIZES if b > widest_tile]
    variants: list[dict] = [{"blocksize": b} for b in small_bs] + [{"blocksize": b, "K": RAGGED_K} for b in small_bs]
    variants += [{"nested": _dt(d)} for d in nf4.NESTED_DTYPES]
    variants += [{"adapters": _dt(d)} for d in nf4.FLOAT_DTYPES]
    variants += [{"weight": w} for w in ("fp32", "fp16", *(f"{q}{s}" for q in nf4.QUANT_TYPES for s in ("", "+dq")))]
    variants += [{"dropout": True}]
    secondary = [LoraCase(*g, **v) for g, v in itertools.product(grid, variants)]
    secondary += [
        LoraCase("forward", p, m, r, bias=_dt(b))
        for p, m, r, b in itertools.product(lora.FORWARD_PATHS, ms, rs, nf4.FLOAT_DTYPES)
    ]
    needs = ("dx", "dA", "dB", "dx,dA", "dx,dB", "dA,dB")
    secondary += [
        LoraCase("backward", p, m, r, need=n) for p, m, r, n in itertools.product(lora.BACKWARD_PATHS, ms, rs, needs)
    ]
    one_each = [
        (d, p, policy.SMALL_M_MAX if "small" in p or p == "fused" else policy.TILED_M_MAX, 16) for d, p in directions
    ]
    secondary += [
        LoraCase(*g, blocksize=b, K=k) for g, b, k in itertools.product(one_each, large_bs, (BASE_K, RAGGED_K))
    ]
    return core + secondary


def _nf4_calls(quick: bool):
    import lowrank.kernels.nf4 as nf4

    yield from _nf4_cases(nf4, quick)


def _lora_calls(cases):
    import lowrank.kernels.dropout as dropout
    import lowrank.kernels.lora_checks as lora_checks
    import lowrank.kernels.lora_matmul as lora
    import lowrank.kernels.nf4 as nf4

    with _allow_meta_device(lora_checks), _allow_meta_device(dropout):
        for case in cases:
            yield case.label(), (lambda c=case: _run_lora_case(lora, nf4, c))


def _dropout_calls():
    """The stand-alone dropout launchers (mask and in-place apply) in every input dtype."""
    import lowrank.kernels.dropout as dropout

    keep = dropout.Dropout.of(0.1, 1234)
    with _allow_meta_device(dropout):
        yield "dropout_mask", lambda: dropout.dropout_mask(64, 96, keep, device=META)
        for name, dtype in _DTYPES.items():
            t = torch.empty((64, 96), dtype=dtype, device=META)
            yield f"apply_dropout_({name})", lambda t=t: dropout.apply_dropout_(t, keep)


def _record(calls, launches: list[Launch]) -> None:
    current = [""]
    with recording(launches, lambda: current[0]):
        for label, call in calls:
            current[0] = label
            call()


def _check_not_interpreting() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "the compile sweep compiles for a GPU: run it without TRITON_INTERPRET=1 (under the interpreter "
            "@triton.jit makes interpreted functions, which cannot be compiled)"
        )


def kernel_modules() -> list:
    """Every module of ``lowrank.kernels`` (one per file in kernels/)."""
    import importlib

    import lowrank.kernels

    root = Path(lowrank.kernels.__file__).parent
    return [
        importlib.import_module(f"lowrank.kernels.{p.stem}") for p in sorted(root.glob("*.py")) if p.stem != "__init__"
    ]


def all_kernels() -> dict[str, object]:
    """``module.name -> JITFunction`` for every launched kernel: the jit functions named ``*_kernel``
    (the project's convention; jit helpers called from kernels have other names)."""
    found = {}
    for module in kernel_modules():
        for name, value in vars(module).items():
            if isinstance(value, triton_jit.JITFunction) and name.endswith("_kernel"):
                found[f"{module.__name__}.{name}"] = value
    return found


def record_launches(quick: bool = False) -> list[Launch]:
    """Every launch the launchers make over the sweep's inputs (recorded, not run)."""
    _check_not_interpreting()
    import lowrank.kernels.lora_matmul as lora
    import lowrank.kernels.nf4 as nf4

    launches: list[Launch] = []
    _record(_nf4_calls(quick), launches)
    _record(_dropout_calls(), launches)
    core: list[Launch] = []
    _record(_lora_calls(lora_cases(lora, nf4, quick)), core)
    launches += core
    if not quick:
        # The widest weight tile along K the launchers chose in the core: block sizes up to it change the
        # decode's structure (DECODE_SUB) and are crossed with every tile configuration.
        widths = [
            launch.kwargs.get(name, 0)
            for launch in core
            if "BLOCKSIZE" in launch.kwargs
            for name in ("BLOCK_T", "BLOCK_C")
        ]
        widest = max(widths, default=max(nf4.BLOCKSIZES))
        secondary = lora_cases(lora, nf4, quick, widest_tile=widest)[len(lora_cases(lora, nf4, quick)) :]
        _record(_lora_calls(secondary), launches)
    return launches


# ----------------------------------------------------------------------------------------------------
# Specialize and compile.
# ----------------------------------------------------------------------------------------------------


def _stand_in(value):
    """A meta tensor becomes a tiny CPU tensor with the same dtype and the same alignment of its first
    element (what triton's binder looks at); everything else is passed through."""
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        offset = value.storage_offset()
        return torch.empty(offset + 1, dtype=value.dtype)[offset:]
    return value


def _run_options(kernel, kwargs: dict) -> dict:
    """The options JITFunction.run adds from triton's knobs before binding (version dependent)."""
    kwargs = dict(kwargs)
    knobs = getattr(triton, "knobs", None)
    debug_knob = getattr(getattr(knobs, "runtime", None), "debug", False) if knobs else False
    kwargs["debug"] = kwargs.get("debug", getattr(kernel, "debug", None)) or debug_knob
    compilation = getattr(knobs, "compilation", None)
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if compilation is not None and hasattr(compilation, name):
            kwargs[name] = getattr(compilation, name)
    return kwargs


@dataclasses.dataclass
class Variant:
    kernel: object
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: list

    @property
    def name(self) -> str:
        return self.kernel.__name__


def specialize(launch: Launch, arch: int, backend=None) -> Variant:
    kernel = launch.kernel
    backend = backend or make_backend(GPUTarget("cuda", arch, 32))
    binder = triton_jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = _run_options(kernel, launch.kwargs)
    args = [_stand_in(a) for a in launch.args]
    kwargs = {k: _stand_in(v) for k, v in kwargs.items()}
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return Variant(kernel, arch, signature, constexprs, attrs, dict(options.__dict__), [launch.case])


def _key(v: Variant) -> tuple:
    """What makes a compiled variant distinct: the launcher's choices (constexprs, options) and the pointer
    element types. Integer specializations (sizes divisible by 16, or equal to 1) are triton's, not the
    launchers': launches that differ only there compile once (see ``variants``)."""
    d = _describe(v)
    return (
        v.kernel.__module__,
        v.name,
        v.arch,
        repr(sorted(d["constexprs"].items())),
        repr(sorted(d["pointer_dtypes"].items())),
        repr(sorted(v.options.items(), key=str)),
    )


def _specialized(v: Variant) -> int:
    return len(v.attrs and [a for a in v.attrs.values() if a]) + len(_describe(v)["ints_equal_1"])


def variants(launches: list[Launch], arches) -> list[Variant]:
    """The distinct variants (see _key), each compiled at the most specialized of its launches (the first
    one on a tie: the sweep's M runs upwards, so a small-M tile compiles at M = 1, the batch-1 launch;
    otherwise sizes divisible by 16, as in every model shape)."""
    out: dict[tuple, Variant] = {}
    for arch in arches:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for launch in launches:
            v = specialize(launch, arch, backend)
            key = _key(v)
            if key not in out:
                out[key] = v
            elif _specialized(v) > _specialized(out[key]):
                v.cases = out[key].cases + v.cases
                out[key] = v
            else:
                out[key].cases.append(launch.case)
    return list(out.values())


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "static_shared": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas_log(log: str) -> dict:
    """Registers, spill bytes, stack and static shared memory from one kernel's ``ptxas -v`` log."""
    if not _PTXAS["registers"].search(log):
        raise ValueError(f"no 'Used N registers' line in the ptxas log:\n{log[-2000:]}")
    out = {}
    for name, pattern in _PTXAS.items():
        found = pattern.findall(log)
        out[name] = int(found[-1]) if found else 0
    return out


def _describe(v: Variant) -> dict:
    """The human-readable parts of a variant: constexprs by name, pointer dtypes, specialized integers."""
    names = v.kernel.arg_names
    constexprs = {}
    for path, value in v.constexprs.items():
        name = names[path[0]]
        if v.signature.get(name) == "constexpr" and name in {p.name for p in v.kernel.params if p.is_constexpr}:
            constexprs[name] = str(value) if not isinstance(value, (bool, int, float)) else value
    specialized = {
        names[path[0]]: value
        for path, value in v.constexprs.items()
        if v.signature.get(names[path[0]]) == "constexpr" and names[path[0]] not in constexprs
    }
    pointers = {k: t[1:] for k, t in v.signature.items() if t.startswith("*")}
    divisible = sorted(
        names[path[0]] for path, attr in v.attrs.items() if attr and v.signature[names[path[0]]][:1] != "*"
    )
    return {
        "constexprs": constexprs,
        "pointer_dtypes": pointers,
        "ints_equal_1": sorted(specialized),
        "ints_div16": divisible,
    }


def compile_variant(v: Variant) -> dict:
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # the ptxas -v log, printed by triton's make_cubin
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas (and its log)
    target = GPUTarget("cuda", v.arch, 32)
    log = io.StringIO()
    start = time.perf_counter()
    row = {"kernel": v.name, "module": v.kernel.__module__, "arch": v.arch, **_describe(v)}
    row["num_warps"], row["num_stages"] = v.options.get("num_warps"), v.options.get("num_stages")
    row["num_ctas"] = v.options.get("num_ctas", 1)
    row["cases"], row["first_case"] = len(v.cases), v.cases[0]
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(v.kernel, v.signature, v.constexprs, v.attrs), target=target, options=v.options
            )
        usage = parse_ptxas_log(log.getvalue())
    except Exception as err:  # noqa: BLE001 - every compile error is reported, then the sweep fails
        row.update(
            ok=False, error=f"{type(err).__name__}: {err}"[-4000:], seconds=round(time.perf_counter() - start, 2)
        )
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    meta = compiled.metadata
    shared = int(getattr(meta, "shared", 0)) + usage["static_shared"]
    row.update(ok=True, cubin_bytes=len(compiled.asm["cubin"]), shared_bytes=shared, **usage)
    row["num_warps"] = meta.num_warps
    row["occupancy"] = occupancy(usage["registers"], shared, meta.num_warps, getattr(meta, "num_ctas", 1), v.arch)
    row["spills"] = usage["spill_stores"] + usage["spill_loads"] > 0
    row["flagged"] = row["spills"] or row["occupancy"]["ctas_per_sm"] < 2
    return row


_VARIANTS: list[Variant] = []


def _compile_index(i: int) -> dict:
    return compile_variant(_VARIANTS[i])


def compile_all(vs: list[Variant], jobs: int, progress: Callable[[dict], None] | None = None) -> list[dict]:
    global _VARIANTS
    _VARIANTS = vs
    rows: list[dict | None] = [None] * len(vs)
    if jobs <= 1:
        for i in range(len(vs)):
            rows[i] = _compile_index(i)
            if progress:
                progress(rows[i])
        return rows  # type: ignore[return-value]
    context = multiprocessing.get_context("fork")  # the workers inherit the recorded variants
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(_compile_index, i): i for i in range(len(vs))}
        for future in concurrent.futures.as_completed(futures):
            rows[futures[future]] = future.result()
            if progress:
                progress(rows[futures[future]])
    return rows  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------------


def _config_text(row: dict) -> str:
    cx = ", ".join(
        f"{k}={v}" for k, v in row["constexprs"].items() if k != "ROUND_BY_BITS" and k != "ROUND_BF16_BY_BITS"
    )
    ptrs = ",".join(sorted(set(row["pointer_dtypes"].values())))
    return f"{cx}; w{row['num_warps']} s{row['num_stages']}; ptrs {ptrs}" + (
        f"; =1: {','.join(row['ints_equal_1'])}" if row["ints_equal_1"] else ""
    )


def _reason(row: dict) -> str:
    occ = row["occupancy"]
    reasons = []
    if row["spills"]:
        reasons.append("spills")
    if occ["ctas_per_sm"] < 2:
        reasons.append(f"{occ['ctas_per_sm']} CTA/SM ({'+'.join(occ['limiter'])})")
    return ", ".join(reasons)


#: Constexprs besides the BLOCK_* tile shape that the flagged groups are split by (decode path, dot dtype).
_GROUP_BY = ("DOT_DTYPE", "W_QUANT", "FAST_DECODE", "FUSE_LOW", "T_IS_K")


def flagged_groups(rows: list[dict]) -> list[dict]:
    """The flagged variants grouped by architecture, kernel, tile shape (the BLOCK_* constexprs), the
    constexprs in _GROUP_BY, warps, stages and reason, with the register / spill / shared ranges."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if not (row["ok"] and row["flagged"]):
            continue
        tile = tuple((k, v) for k, v in row["constexprs"].items() if k.startswith("BLOCK_") or k in _GROUP_BY)
        key = (row["arch"], row["kernel"], tile, row["num_warps"], row["num_stages"], _reason(row))
        groups.setdefault(key, []).append(row)
    out = []
    for (arch, kernel, tile, warps, stages, reason), members in sorted(groups.items(), key=str):

        def span(name, members=members):
            values = [m[name] if name != "spill" else m["spill_stores"] + m["spill_loads"] for m in members]
            return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"

        out.append(
            {
                "arch": arch,
                "kernel": kernel,
                "tile": ", ".join(f"{k}={v}" for k, v in tile) + f"; w{warps} s{stages}",
                "reason": reason,
                "variants": len(members),
                "registers": span("registers"),
                "spill_bytes": span("spill"),
                "shared_bytes": span("shared_bytes"),
                "example": members[0]["first_case"],
            }
        )
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Ahead-of-time compile of kernels/ (triton {meta['triton']})",
        "",
        f"{meta['date']} · commit {meta['commit']} · {meta['variants']} variants from {meta['launches']} recorded "
        f"launches · {meta['seconds']:.0f} s with {meta['jobs']} jobs on {meta['machine']}",
        "",
        "Occupancy: resident CTAs per SM on an H200 (sm_90: 64K registers, 228 KB shared, 2048 threads, 32 CTAs)"
        " / A100 (sm_80: 164 KB shared). ⚠ = spills or fewer than 2 CTAs per SM.",
        "",
        "## Flagged variants (spills, or fewer than 2 CTAs per SM), grouped",
        "",
        "| arch | kernel | tile | reason | variants | regs | spill B | shared B | example launcher case |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in flagged_groups(rows):
        lines.append(
            f"| sm_{g['arch']} | {g['kernel']} | {g['tile']} | {g['reason']} | {g['variants']} | {g['registers']} "
            f"| {g['spill_bytes']} | {g['shared_bytes']} | {g['example']} |"
        )
    lines.append("")
    for arch in sorted({r["arch"] for r in rows}, reverse=True):
        arch_rows = [r for r in rows if r["arch"] == arch]
        lines += [
            f"## sm_{arch}",
            "",
            "| kernel | configuration | regs | spill B | shared B | CTAs/SM | limited by | warps/SM "
            "| first launcher case | cases |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(arch_rows, key=lambda r: (r["kernel"], _config_text(r))):
            if not r["ok"]:
                lines.append(
                    f"| {r['kernel']} | {_config_text(r)} | COMPILE ERROR | | | | | "
                    f"| {r['first_case']} | {r['cases']} |"
                )
                continue
            occ = r["occupancy"]
            mark = " ⚠" if r["flagged"] else ""
            lines.append(
                f"| {r['kernel']}{mark} | {_config_text(r)} | {r['registers']} "
                f"| {r['spill_stores'] + r['spill_loads']} | "
                f"{r['shared_bytes']} | {occ['ctas_per_sm']} | {'+'.join(occ['limiter'])} | {occ['warps_per_sm']} | "
                f"{r['first_case']} | {r['cases']} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return os.environ.get("LOWRANK_COMMIT", "unknown")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHES), choices=sorted(LIMITS))
    parser.add_argument("--quick", action="store_true", help="one representative variant per kernel")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, help="folder for results.json and table.md")
    parser.add_argument("--only", help="compile only the kernels whose name matches this regular expression")
    parser.add_argument("--sample", type=int, default=1, help="compile every N-th variant (timing estimates)")
    parser.add_argument("--list", action="store_true", help="print the variants and exit without compiling")
    parser.add_argument("--table", type=Path, metavar="RESULTS_JSON", help="only rewrite table.md next to it")
    args = parser.parse_args(argv)
    if args.table:
        from lowrank.files import read_json, write_text

        data = read_json(args.table, what="compile results")
        write_text(args.table.parent / "table.md", markdown(data["rows"], data["meta"]))
        print(f"wrote {args.table.parent / 'table.md'}")
        return 0
    # A private cache: the sweep must not fill ~/.triton/cache with a thousand kernels nobody launches.
    cache = tempfile.TemporaryDirectory(prefix="lowrank-compile-")
    os.environ["TRITON_CACHE_DIR"] = cache.name

    start = time.perf_counter()
    launches = record_launches(args.quick)
    vs = variants(launches, args.arch)
    reached = {f"{launch.kernel.__module__}.{launch.kernel.__name__}" for launch in launches}
    missing = sorted(set(all_kernels()) - reached)
    if missing:
        print(
            f"ERROR: no launcher case of the sweep reaches {', '.join(missing)}: add its launcher's inputs to "
            "bench/compile_kernels.py (record_launches)",
            flush=True,
        )
        return 1
    if args.only:
        vs = [v for v in vs if re.search(args.only, v.name)]
    vs = vs[:: args.sample]
    print(
        f"compile_kernels: triton {triton.__version__}, {len(launches)} launches -> {len(vs)} variants "
        f"for sm_{'/sm_'.join(map(str, args.arch))} ({time.perf_counter() - start:.1f} s to record)",
        flush=True,
    )
    if args.list:
        for v in vs:
            print(
                v.arch,
                v.name,
                _config_text(
                    {**_describe(v), "num_warps": v.options.get("num_warps"), "num_stages": v.options.get("num_stages")}
                ),
                "|",
                v.cases[0],
            )
        return 0
    done = [0]

    def progress(row):
        done[0] += 1
        if not row["ok"]:
            print(f"COMPILE ERROR sm_{row['arch']} {row['kernel']} ({row['first_case']}):\n{row['error']}", flush=True)
        if done[0] % 50 == 0 or done[0] == len(vs):
            print(f"  {done[0]}/{len(vs)} compiled, {time.perf_counter() - start:.0f} s", flush=True)

    rows = compile_all(vs, args.jobs, progress)
    seconds = time.perf_counter() - start
    errors = [r for r in rows if not r["ok"]]
    flagged = [r for r in rows if r["ok"] and r["flagged"]]
    meta = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "arches": args.arch,
        "quick": args.quick,
        "launches": len(launches),
        "variants": len(vs),
        "seconds": round(seconds, 1),
        "jobs": args.jobs,
        "machine": f"{platform.machine()} x{os.cpu_count()} CPUs",
        "errors": len(errors),
        "flagged": len(flagged),
    }
    if args.out:
        from lowrank.files import write_json, write_text

        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "results.json", {"meta": meta, "rows": rows})
        write_text(args.out / "table.md", markdown(rows, meta))
        print(f"wrote {args.out / 'results.json'} and {args.out / 'table.md'}")
    print(
        f"compile_kernels: {len(rows)} variants compiled in {seconds:.0f} s: {len(errors)} errors, "
        f"{len(flagged)} flagged (spills or < 2 CTAs/SM)"
    )
    for r in flagged:
        occ = r["occupancy"]
        print(
            f"  flagged sm_{r['arch']} {r['kernel']}: regs {r['registers']}, "
            f"spill {r['spill_stores'] + r['spill_loads']} B, shared {r['shared_bytes']} B, "
            f"{occ['ctas_per_sm']} CTAs/SM ({'+'.join(occ['limiter'])}) :: {_config_text(r)}"
        )
    cache.cleanup()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
