"""Shared benchmark harness: shape registry, providers, measured limits, timing, and result records.

Timing (docs/bench.md, "What is measured")
-------------------------------------------
* **Wall time** — pytest-benchmark's ``benchmark.pedantic`` times ``fn(); synchronize()``, so every round
  ends with the GPU idle. Compilation, autotuning and warm-up run before the timed rounds. The number of
  rounds is chosen from one probe call so that each benchmark spends about ``TARGET_TIMED_S`` timed.
* **Kernel time** (CUDA only) — ``triton.testing.do_bench``: CUDA events around each call, L2 flushed
  between calls, median. A synchronised wall time of a 50 µs kernel is mostly Python launch overhead and
  the sync, so throughput and fraction of the limit are computed from the kernel time where there is one,
  else from the wall median. Both are recorded.

Limits (measured once per session, or once per ``LOWRANK_BENCH_LIMITS`` file)
-------------------------------------------------------------------------
* copy bandwidth: a 1 GiB device-to-device ``copy_`` on GPU (bytes read + written), a 64 MiB ``copy_`` on CPU;
* matmul peak: bf16 GEMM 8192³ on GPU, 1024³ on CPU.
``floor = max(flops / peak, bytes / copy bandwidth)``; ``fraction of limit = floor / time``.

Environment switches
--------------------
``LOWRANK_BENCH_TINY=1|0`` shrink shapes (default: 1 without CUDA) · ``LOWRANK_BENCH_SUITE=full|goal`` which
cases run (``goal``: the cases the H100 goals are stated at, what ``bench/gpu/run.sh`` runs) ·
``LOWRANK_BENCH_COMPILE=0`` skip the ``torch.compile`` providers · ``LOWRANK_BENCH_JSONL=path`` append one
JSON record per finished, skipped or failed benchmark as it happens (survives a killed run) ·
``LOWRANK_BENCH_LIMITS=path`` cache the measured limits across sessions · ``LOWRANK_COMMIT`` commit label when
the tree has no ``.git``. Under ``TRITON_INTERPRET=1`` on CPU with tiny shapes the Triton provider runs in the
interpreter (a logic check of the benchmark code, not a performance figure).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lowrank import files

REPO_ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------------
# Configuration from the environment.
# ----------------------------------------------------------------------------------------------------

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TINY = os.environ.get("LOWRANK_BENCH_TINY", "0" if ON_GPU else "1") == "1"
SUITE = os.environ.get("LOWRANK_BENCH_SUITE", "full")
if SUITE not in ("full", "goal"):
    raise ValueError(f"LOWRANK_BENCH_SUITE must be 'full' or 'goal', got {SUITE!r}")
COMPILE_ENABLED = os.environ.get("LOWRANK_BENCH_COMPILE", "1") != "0"
INTERPRETER = importlib.import_module("lowrank.ops.dispatch").triton_interpreter()  # the one interpreter check
DTYPE = torch.bfloat16  # activations and the dequantized weight: the QLoRA compute dtype

TARGET_TIMED_S = 0.15  # timed seconds per benchmark in pytest-benchmark (the wall-time cross-check)
# The Triton interpreter takes seconds per call: there the rounds only check that the code runs.
SLOW_CPU_CHECK = INTERPRETER and not ON_GPU
MIN_ROUNDS, MAX_ROUNDS = (1 if SLOW_CPU_CHECK else 3), 200
DO_BENCH_WARMUP_MS, DO_BENCH_REP_MS = 10, 40

# ----------------------------------------------------------------------------------------------------
# Shape registry: real model dimensions, each with a CPU-sized twin (same aspect, odd stays odd).
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearShape:
    """A linear layer ``in_features × out_features`` (name ``"KxN"``); its weight is stored ``(N, K)``."""

    name: str
    k: int
    n: int
    tiny_k: int
    tiny_n: int
    source: str

    @property
    def dims(self) -> tuple[int, int]:
        """``(K, N)`` at the active size (tiny on CPU)."""
        return (self.tiny_k, self.tiny_n) if TINY else (self.k, self.n)

    @property
    def weight_shape(self) -> tuple[int, int]:
        k, n = self.dims
        return (n, k)

    @property
    def label(self) -> str:
        k, n = self.dims
        return f"{k}x{n}"


SHAPES: dict[str, LinearShape] = {
    s.name: s
    for s in (
        LinearShape("4096x4096", 4096, 4096, 128, 128, "Llama-3-8B q_proj / o_proj"),
        LinearShape("4096x14336", 4096, 14336, 128, 448, "Llama-3-8B gate_proj / up_proj"),
        LinearShape("14336x4096", 14336, 4096, 448, 128, "Llama-3-8B down_proj"),
        LinearShape("8192x28672", 8192, 28672, 256, 896, "Llama-3-70B gate_proj / up_proj"),
        LinearShape("4095x11001", 4095, 11001, 127, 343, "odd: no dimension a multiple of a tile or quant block"),
    )
}
NF4_SHAPES = tuple(SHAPES)
NF4_GOAL_SHAPES = NF4_SHAPES
LORA_SHAPES = ("4096x4096", "4096x14336")
LORA_RANKS = (16, 64)
LORA_GOAL_RANKS = (16,)
# Rows of x (tokens): decode, small batch, the memory/compute crossover, training micro-batches.
_M_TINY = {1: 1, 16: 16, 64: 64, 2048: 128, 8192: 256}
LORA_M = tuple(_M_TINY)


def rows(m: int) -> int:
    """Rows of x for the nominal ``m`` at the active size."""
    return _M_TINY[m] if TINY else m


# ----------------------------------------------------------------------------------------------------
# Providers: who computes the op, and why one cannot run here.
# ----------------------------------------------------------------------------------------------------

PROVIDER_LABELS = {
    "triton": "lowrank (Triton)",
    "lowrank_op": "lowrank autograd op",
    "torch": "PyTorch eager (reference)",
    "torch_compiled": "torch.compile (reference)",
    "bitsandbytes": "bitsandbytes",
    "peft_bnb": "PEFT + bitsandbytes",
    "gemm_dense": "cuBLAS bf16 GEMM, W pre-dequantized" if ON_GPU else "bf16 GEMM, W pre-dequantized",
    "dequant_gemm": "lowrank dequant + cuBLAS GEMM (no LoRA)" if ON_GPU else "lowrank dequant + GEMM (no LoRA)",
    "gemm_dx": "dX GEMM alone (dy·W, W pre-dequantized)",
    "gemm_fwd_dx": "GEMM fwd + dX GEMM, W pre-dequantized",
    "lowrank": "lowrank (prepare_model)",
    "ext": "lowrank C++/CUDA extension" if ON_GPU else "lowrank C++ extension",
}


def provider_label(provider: str) -> str:
    """``triton:<path>`` is a forced forward path; ``lowrank:<backend>`` a forced dispatch backend."""
    base, _, variant = provider.partition(":")
    label = PROVIDER_LABELS.get(base, base)
    if not variant:
        return label
    return f"{label}, path {variant}" if base == "triton" else f"{label}, {variant} backend"


@functools.cache
def optional_module(name: str) -> tuple[object | None, str | None]:
    """``(module, None)`` or ``(None, why it cannot be imported)``."""
    try:
        return importlib.import_module(name), None
    except Exception as err:  # an optional competitor may fail in any way on import; say how
        return None, f"`import {name}` failed: {type(err).__name__}: {err}".splitlines()[0]


@functools.cache
def _bitsandbytes_reason() -> str | None:
    bnb, reason = optional_module("bitsandbytes")
    if bnb is None:
        return f"bitsandbytes is not installed here ({reason})"
    try:  # the import succeeds even when its native library for this device failed to load
        probe = torch.randn(64, device=DEVICE, dtype=DTYPE)
        packed, state = bnb.functional.quantize_4bit(probe, blocksize=64, quant_type="nf4")
        bnb.functional.dequantize_4bit(packed, state)
    except Exception as err:
        return f"bitsandbytes {bnb.__version__} cannot run 4-bit ops on {DEVICE.type}: {type(err).__name__}: {err}"
    return None


def skip_reason(provider: str) -> str | None:
    """None if ``provider`` can run on this machine, else a sentence saying why not."""
    if provider in ("torch", "gemm_dense", "gemm_dx", "gemm_fwd_dx", "dequant_gemm"):
        return None
    if provider == "torch_compiled":
        if not COMPILE_ENABLED:
            return "torch.compile providers disabled by LOWRANK_BENCH_COMPILE=0"
        return None
    if provider.split(":")[0] in ("triton", "lowrank_op"):
        if optional_module("triton")[0] is None:
            return "triton is not installed"
        if ON_GPU:
            return None
        if INTERPRETER and TINY:
            return None
        return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 with tiny shapes, as a logic check)"
    if provider == "bitsandbytes":
        return _bitsandbytes_reason()
    if provider == "peft_bnb":
        reason = _bitsandbytes_reason()
        if reason is None and optional_module("peft")[0] is None:
            reason = f"peft is not installed here ({optional_module('peft')[1]})"
        return reason
    if provider == "lowrank":
        return None
    if provider == "ext":
        from lowrank import _ext

        if _ext.load() is None:
            return f"the C++ extension is unavailable: {_ext.load_error()}"
        if not _ext.load().supports("dequantize_4bit", torch.device(DEVICE).type):
            return f"the C++ extension has no {torch.device(DEVICE).type} kernels in this build"
        return None
    raise KeyError(f"unknown provider {provider!r}; known: {sorted(PROVIDER_LABELS)} (and triton:<forward path>)")


# ----------------------------------------------------------------------------------------------------
# Measured limits.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Limits:
    device: str
    copy_gbps: float  # bytes read + bytes written per second / 1e9
    copy_method: str
    matmul_tflops: float
    matmul_method: str

    def floor_s(self, bytes_moved: float, flops: float) -> tuple[float, str]:
        """The roofline time for the given traffic and work, and which side bounds it."""
        memory_s = bytes_moved / (self.copy_gbps * 1e9)
        compute_s = flops / (self.matmul_tflops * 1e12)
        return (memory_s, "memory") if memory_s >= compute_s else (compute_s, "compute")


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def kernel_time_s(fn: Callable[[], object]) -> float | None:
    """Median GPU time of ``fn`` from CUDA events with L2 flushed between calls; None on CPU."""
    if not ON_GPU:
        return None
    from triton.testing import do_bench

    return do_bench(fn, warmup=DO_BENCH_WARMUP_MS, rep=DO_BENCH_REP_MS, return_mode="median") * 1e-3


def _cpu_median_s(fn: Callable[[], object], repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_limits() -> Limits:
    """Copy bandwidth and matmul peak of this device, measured now (about 2 s on an H100)."""
    if ON_GPU:
        src = torch.empty(1 << 29, dtype=torch.int16, device=DEVICE).random_(-100, 100)
        dst = torch.empty_like(src)
        copy_s = kernel_time_s(lambda: dst.copy_(src))
        copy_gbps = 2 * src.numel() * src.element_size() / copy_s / 1e9
        del src, dst
        size = 8192
        a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
        b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
        gemm_s = kernel_time_s(lambda: a @ b)
        copy_method = "device-to-device copy_ of 1 GiB (read + write), CUDA events"
    else:
        src = torch.randn(1 << 24)  # 64 MiB of fp32
        dst = torch.empty_like(src)
        copy_s = _cpu_median_s(lambda: dst.copy_(src))
        copy_gbps = 2 * src.numel() * src.element_size() / copy_s / 1e9
        size = 1024
        a = torch.randn(size, size, dtype=torch.bfloat16)
        b = torch.randn(size, size, dtype=torch.bfloat16)
        gemm_s = _cpu_median_s(lambda: a @ b)
        copy_method = f"copy_ of 64 MiB on CPU (read + write), {torch.get_num_threads()} threads"
    return Limits(
        device=device_name(),
        copy_gbps=round(copy_gbps, 1),
        copy_method=copy_method,
        matmul_tflops=round(2 * size**3 / gemm_s / 1e12, 3),
        matmul_method=f"bf16 GEMM {size}x{size}x{size}, random data",
    )


def load_or_measure_limits() -> Limits:
    """Measure once; with ``LOWRANK_BENCH_LIMITS`` set, share one measurement between pytest sessions."""
    path = os.environ.get("LOWRANK_BENCH_LIMITS")
    if path and Path(path).is_file():
        cached = Limits(**json.loads(Path(path).read_text()))
        if cached.device == device_name():
            return cached
    limits = measure_limits()
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        files.write_text(path, json.dumps(dataclasses.asdict(limits)))
    return limits


# ----------------------------------------------------------------------------------------------------
# Where the numbers come from: device, versions, commit.
# ----------------------------------------------------------------------------------------------------


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        mod = optional_module(dist)[0]
        return getattr(mod, "__version__", None)


@functools.cache
def commit_label() -> str:
    """``LOWRANK_COMMIT``, else ``git describe`` of the checkout (``-dirty`` when modified), else unknown."""
    if os.environ.get("LOWRANK_COMMIT"):
        return os.environ["LOWRANK_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no git; set LOWRANK_COMMIT)"


@functools.cache
def tree_fingerprint() -> str:
    """sha256 (12 hex) of every .py under kernels/, src/ and bench/: identifies the code that ran, even without git."""
    digest = hashlib.sha256()
    for folder in ("kernels", "src", "bench"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@functools.cache
def environment() -> dict:
    """Device, versions, commit and run settings: stored with every result."""
    return {
        "device": device_name(),
        "device_type": DEVICE.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "python": platform.python_version(),
        "commit": commit_label(),
        "tree_sha256": tree_fingerprint(),
        "tiny_shapes": TINY,
        "suite": SUITE,
        "triton_interpreter": INTERPRETER,
    }


# ----------------------------------------------------------------------------------------------------
# Records.
# ----------------------------------------------------------------------------------------------------


def append_record(record: dict) -> None:
    """Append one JSON line to ``LOWRANK_BENCH_JSONL`` (one ``write`` call per line)."""
    path = os.environ.get("LOWRANK_BENCH_JSONL")
    if not path:
        return
    line = json.dumps(record, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)


def _rounds_for(probe_s: float) -> int:
    return max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_TIMED_S / max(probe_s, 1e-6))))


class Bench:
    """What a benchmark test calls: ``bench.run(fn, op=..., case=..., provider=..., bytes_moved=..., flops=...)``.

    Wraps pytest-benchmark's fixture; the conftest writes ``self.record`` out when the test ends.
    """

    def __init__(self, benchmark, limits: Limits, nodeid: str) -> None:
        self.benchmark = benchmark
        self.limits = limits
        self.nodeid = nodeid
        self.record: dict | None = None

    def run(
        self,
        fn: Callable[[], object],
        *,
        op: str,
        case: dict,
        provider: str,
        bytes_moved: float = 0.0,
        flops: float = 0.0,
        ours: bool = False,
        warmup_calls: int = 2,
        rounds: int | None = None,
        kernel_timing: bool = True,
        extra: dict | None = None,
    ) -> dict:
        """Time ``fn`` (wall and, on GPU, kernel time) and fill ``extra_info``. Returns the record."""
        if SLOW_CPU_CHECK:
            warmup_calls = min(warmup_calls, 1)
        for _ in range(warmup_calls):  # compilation, autotuning, allocator warm-up: never timed
            fn()
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        probe_s = time.perf_counter() - start

        def timed() -> None:
            fn()
            synchronize()

        case_label = " ".join(f"{k}={v}" for k, v in case.items())
        self.benchmark.group = f"{op} {case_label}"
        warmup_rounds = 0 if SLOW_CPU_CHECK or warmup_calls == 0 else 1
        self.benchmark.pedantic(timed, rounds=rounds or _rounds_for(probe_s), warmup_rounds=warmup_rounds, iterations=1)
        stats = getattr(self.benchmark, "stats", None)
        wall_s = stats.stats.median if stats is not None else probe_s
        kernel_s = kernel_time_s(fn) if kernel_timing else None
        time_s = kernel_s if kernel_s is not None else wall_s
        floor_s, bound = self.limits.floor_s(bytes_moved, flops)
        info = {
            "op": op,
            "case": case,
            "provider": provider,
            "provider_label": provider_label(provider),
            "ours": ours,
            "bytes_moved": bytes_moved,
            "flops": flops,
            "wall_median_s": wall_s,
            "kernel_median_s": kernel_s,
            "time_s": time_s,
            "time_source": "kernel (do_bench, CUDA events)" if kernel_s is not None else "wall (synchronised)",
            "gbps": bytes_moved / time_s / 1e9 if bytes_moved else None,
            "tflops": flops / time_s / 1e12 if flops else None,
            "floor_s": floor_s,
            "bound": bound,
            "fraction_of_limit": floor_s / time_s if floor_s else None,
            "limits": dataclasses.asdict(self.limits),
            "env": environment(),
            **(extra or {}),
        }
        self.benchmark.extra_info.update(info)
        self.record = {
            "type": "benchmark",
            "nodeid": self.nodeid,
            "group": self.benchmark.group,
            "stats": _stats_dict(stats),
            "extra_info": info,
        }
        return info


def _stats_dict(stats) -> dict | None:
    if stats is None:
        return None
    s = stats.stats
    return {"min": s.min, "max": s.max, "mean": s.mean, "median": s.median, "stddev": s.stddev, "rounds": s.rounds}


# ----------------------------------------------------------------------------------------------------
# NF4 traffic (bitsandbytes layout, blocksize 64, nested blocks of 256).
# ----------------------------------------------------------------------------------------------------

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


def nf4_weight_bytes(numel: int, double_quant: bool = True, blocksize: int = BLOCKSIZE) -> float:
    """Bytes of packed codes + block constants: 0.516 B/param with double quant, 0.5625 without."""
    blocks = -(-numel // blocksize)
    if double_quant:
        return (numel + 1) // 2 + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4
    return (numel + 1) // 2 + 4 * blocks
