"""CPU benchmarks of the C++ extension against torch, bitsandbytes' CPU backend and PEFT (the three CPU goals).

Goals (4096 x 4096 bf16 weight, NF4, blocksize 64, double quantization):
  1. dequantize to bf16: >= 10x faster than ``bitsandbytes.functional.dequantize_4bit`` on CPU and >= 50 %
     of memcpy bandwidth (bytes moved: 0.5 B codes + 1/64 B nested codes + 2 B output per element, against
     a ``copy_`` of the same number of output bytes, counted read + write). Two ext figures: ``ext`` returns
     a fresh tensor (like bitsandbytes, whose CPU backend has no ``out=``), ``ext_out`` writes a buffer the
     caller reuses (``lowrank.dequantize(w, out=buf)``); the memcpy also writes a reused buffer. A fresh
     32 MiB output can cost page faults that dominate on this VM, so the allocator's regime is fixed for
     every provider (see ``_fix_allocator_regime``);
  2. quantize with double quantization: >= 20x faster than ``bitsandbytes.functional.quantize_4bit``;
  3. LoRA linear on the NF4 weight, forward + backward, M = 512, r = 16, bf16 activations, fp32 adapters:
     >= 2x faster than PEFT on a bitsandbytes ``Linear4bit``, with peak memory no higher; and within 1.10x of
     the same layer on an unquantized bf16 weight, without dropout and with LoRA dropout p = 0.1 (the
     ``-p0.1`` providers), all in one group. Two unquantized layers: ``dense_bf16_floor`` is that layer in
     plain torch (PEFT's arithmetic: ``F.linear`` plus the fp32 LoRA term, dropout by
     ``torch.nn.functional.dropout``); ``ext_dense_bf16`` is lowrank's own ext kernels on the unquantized
     weight (the same counter-based mask), so ``lowrank_ext`` / ``ext_dense_bf16`` is the cost of the 4-bit
     weight alone.

Run (all providers side by side, one session):
    pytest bench/bench_ext_cpu.py --benchmark-enable --benchmark-only -p no:cacheprovider
On a machine shared with other jobs, wall time mostly measures the other jobs (every OpenMP barrier can
wait a scheduler slice); a steadier comparison is one thread and CPU time:
    LOWRANK_BENCH_THREADS=1 pytest bench/bench_ext_cpu.py --benchmark-enable --benchmark-only \
        -p no:cacheprovider --benchmark-timer=time.process_time
Peak memory is measured per provider in a fresh subprocess (``python bench/bench_ext_cpu.py peak <provider>``):
glibc is told to map every large allocation separately (MALLOC_MMAP_THRESHOLD_), the RSS high-water mark is
reset after the set-up (/proc/self/clear_refs), and the peak is the high-water mark over two steps minus the
RSS before the first: one-time allocations (lowrank's per-thread scratch, oneDNN's caches) count too. It is
stored in ``extra_info["peak_extra_mib"]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import lowrank
from lowrank import _ext
from lowrank.ops import nf4 as nf4_ops  # noqa: F401  (registers the torch backend)
from lowrank.ops.dispatch import implementation

EXT = _ext.load()
if EXT is None and __name__ != "__main__":
    pytest.skip(f"C++ extension unavailable: {_ext.load_error()}", allow_module_level=True)

M, K, N, R = 512, 4096, 4096, 16
BLOCKSIZE = 64
SCALE = 2.0  # lora_alpha / r = 32 / 16
ROUNDS = int(os.environ.get("LOWRANK_BENCH_ROUNDS", "7"))


def _fix_allocator_regime() -> str:
    """Every provider allocates 32 MiB outputs; whether their pages are fresh depends on glibc: a block at or
    above its mmap threshold is a new mapping whose pages fault in on first touch (~6 ms for 32 MiB on this
    VM, more than any decode), a smaller one is reused from the heap, already faulted. The threshold grows
    as blocks are freed, so results depended on test order. LOWRANK_BENCH_MALLOC fixes it:

    * ``steady`` (default): the threshold at glibc's own maximum, 32 MiB, where a long-running process ends
      up: blocks >= 32 MiB (a 4096x4096 bf16 weight, just) are fresh mappings, smaller ones are reused;
    * ``warm``: every block reused from the heap -- the regime that favours bitsandbytes, which dequantizes
      into a new tensor on every call;
    * ``default``: glibc as it starts (order-dependent).
    """
    regime = os.environ.get("LOWRANK_BENCH_MALLOC", "steady")
    thresholds = {"steady": 32 << 20, "warm": 1 << 30}
    if regime == "default":
        return "glibc default (order-dependent)"
    if regime not in thresholds:
        raise ValueError(f"LOWRANK_BENCH_MALLOC must be steady, warm or default, got {regime!r}")
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc.mallopt(m_mmap_threshold, thresholds[regime]) != 1 or libc.mallopt(m_trim_threshold, 1 << 30) != 1:
        raise RuntimeError("mallopt refused the allocator settings; run with LOWRANK_BENCH_MALLOC=default")
    if regime == "steady":
        return "steady (mmap threshold 32 MiB: blocks >= 32 MiB are fresh mappings)"
    return "warm heap (every block reused, already faulted in)"


MEMORY_REGIME = _fix_allocator_regime()
if "LOWRANK_BENCH_THREADS" in os.environ:  # e.g. 1, with --benchmark-timer=time.process_time on a busy machine
    torch.set_num_threads(int(os.environ["LOWRANK_BENCH_THREADS"]))


def _bnb():
    warnings.filterwarnings("ignore")
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError as err:
        pytest.skip(f"bitsandbytes is not installed: {err}")
    return bitsandbytes


def weight(n: int = N) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, K, generator=gen) * K**-0.5).to(torch.bfloat16)


# What each provider is to the report (bench/report.py): the competitor every row is compared with, the
# hardware limit the memory-bound rows are a fraction of, the compute floor, or a reference point.
ROLES = {
    "bnb_cpu": "competitor",
    "peft_bnb": "competitor",
    "memcpy_same_output_bytes": "limit",
    "dense_bf16_floor": "floor",
    "ext_dense_bf16": "floor",
    "torch_ref": "reference",
    "lowrank_torch": "reference",
}


def _machine() -> str:
    """The CPU model and core count, as the results must say which machine they come from."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({model})"


MACHINE = _machine()


def run(benchmark, fn, **extra):
    fn()  # warm-up: first-touch of buffers, oneDNN primitive creation
    provider = benchmark.name.partition("[")[2].rstrip("]")
    benchmark.extra_info.update(
        extra,
        provider=provider,
        role=ROLES.get(provider.partition("-p")[0], "lowrank"),
        memory_regime=MEMORY_REGIME,
        threads=torch.get_num_threads(),
        machine=MACHINE,
    )
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)


# ---------------------------------------------------------------------------------------------------
# 1. Dequantize NF4 + DQ -> bf16, and the memcpy it is compared with.
# ---------------------------------------------------------------------------------------------------

DEQUANT_BYTES = N * K * (0.5 + 1 / BLOCKSIZE + 2)


@pytest.mark.benchmark(group="dequantize 4096x4096 nf4+dq -> bf16")
@pytest.mark.parametrize("provider", ["ext", "ext_out", "torch_ref", "bnb_cpu", "memcpy_same_output_bytes"])
def test_dequantize(benchmark, provider):
    qw = lowrank.quantize(weight(), blocksize=BLOCKSIZE, backend="ext")
    args = (qw.packed, qw.absmax, qw.nested_absmax, qw.nested_offset, (N, K), torch.bfloat16, BLOCKSIZE, "nf4")
    if provider == "ext":
        fn = lambda: EXT.dequantize_4bit(*args)  # noqa: E731
    elif provider == "ext_out":
        buffer = torch.empty(N, K, dtype=torch.bfloat16)
        fn = lambda: lowrank.dequantize(qw, out=buffer, backend="ext")  # noqa: E731
    elif provider == "torch_ref":
        fn = lambda: implementation("dequantize_4bit", "torch")(*args)  # noqa: E731
    elif provider == "bnb_cpu":
        F = _bnb().functional
        packed, state = F.quantize_4bit(weight(), blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        fn = lambda: F.dequantize_4bit(packed, state)  # noqa: E731
    else:
        src = torch.ones(N * K * 2, dtype=torch.uint8)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
        return run(benchmark, fn, bytes_moved=2 * src.numel())
    run(benchmark, fn, bytes_moved=DEQUANT_BYTES)


# ---------------------------------------------------------------------------------------------------
# 2. Quantize with double quantization.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="quantize 4096x4096 bf16 -> nf4+dq")
@pytest.mark.parametrize("provider", ["ext", "torch_ref", "bnb_cpu", "lowrank_api_ext"])
def test_quantize_double_quant(benchmark, provider):
    """ext / torch_ref: the quantize + double-quantize ops; lowrank_api_ext: ``lowrank.quantize`` on the ext
    backend, which also scans the input for non-finite values and validates the result."""
    w = weight()
    if provider == "bnb_cpu":
        F = _bnb().functional
        fn = lambda: F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)  # noqa: E731
    elif provider == "lowrank_api_ext":
        fn = lambda: lowrank.quantize(w, blocksize=BLOCKSIZE, backend="ext")  # noqa: E731
    else:
        quantize = implementation("quantize_4bit", "ext" if provider == "ext" else "torch")
        double_quantize = implementation("double_quantize", "ext" if provider == "ext" else "torch")
        fn = lambda: double_quantize(quantize(w, BLOCKSIZE, "nf4")[1])  # noqa: E731
    run(benchmark, fn, bytes_moved=N * K * (2 + 0.5 + 1 / BLOCKSIZE))


# ---------------------------------------------------------------------------------------------------
# 3. LoRA linear on the NF4 weight: forward + backward (dx, dA, dB).
# ---------------------------------------------------------------------------------------------------


def lora_step(provider: str, n: int = N):
    """A zero-argument training step (forward + backward) for ``provider`` on a (n, K) weight, after its set-up.

    ``<provider>-p0.1`` is the same step with LoRA dropout p = 0.1 on the LoRA input.
    """
    provider, _, p_text = provider.partition("-p")
    p = float(p_text) if p_text else 0.0
    gen = torch.Generator().manual_seed(1)
    w = weight(n)
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(M, n, generator=gen).to(torch.bfloat16)
    A = (torch.randn(R, K, generator=gen) * K**-0.5).requires_grad_(True)
    B = (torch.randn(n, R, generator=gen) * 0.1).requires_grad_(True)
    if provider == "peft_bnb":
        bnb = _bnb()
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            pytest.skip(f"peft is not installed: {err}")

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = bnb.nn.Linear4bit(K, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")

            def forward(self, inp):
                return self.lin(inp)

        net = Net()
        net.lin.weight = bnb.nn.Params4bit(
            w, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=BLOCKSIZE
        )
        net = net.to("cpu")
        model = get_peft_model(net, LoraConfig(r=R, lora_alpha=32, target_modules=["lin"], lora_dropout=p))
        model.train()
        lin = model.base_model.model.lin
        with torch.no_grad():
            lin.lora_A["default"].weight.copy_(A)
            lin.lora_B["default"].weight.copy_(B)

        def step():
            x.grad = None
            model.zero_grad(set_to_none=True)
            model(x).backward(dy)

        return step
    if provider == "dense_bf16_floor":  # no 4-bit weight at all: the two bf16 GEMMs + the LoRA term in torch
        dense = w.clone()

        def step():
            x.grad = A.grad = B.grad = None
            x_lora = torch.nn.functional.dropout(x.float(), p) if p else x.float()  # PEFT: dropout(x.to(A.dtype))
            lora = ((x_lora @ A.t()) @ B.t() * SCALE).to(torch.bfloat16)
            (torch.nn.functional.linear(x, dense) + lora).backward(dy)

        return step
    if provider == "ext_dense_bf16":  # lowrank's own ext kernels on the unquantized weight: the 4-bit cost alone
        from lowrank.ops import lora_linear

        dense = w.clone()

        def step():
            x.grad = A.grad = B.grad = None
            lora_linear(x, dense, A, B, SCALE, dropout=p, backend="ext").backward(dy)

        return step
    qw = lowrank.quantize(w, blocksize=BLOCKSIZE, backend="ext")
    if provider == "ext_ops":  # the raw ops, what the autograd Function calls
        from lowrank.kernels.dropout import Dropout

        drop = Dropout.of(p, 12345)

        def step():
            y, xa = EXT.lora_forward(x.detach(), qw, A.detach(), B.detach(), SCALE, None, drop)
            EXT.lora_backward(dy, x.detach(), qw, A.detach(), B.detach(), SCALE, xa, drop)

        return step
    from lowrank.ops import lora_linear_nf4

    backend = "ext" if provider == "lowrank_ext" else "torch"

    def step():
        x.grad = A.grad = B.grad = None
        lora_linear_nf4(x, qw, A, B, SCALE, dropout=p, backend=backend).backward(dy)

    return step


LORA_PROVIDERS = [
    "lowrank_ext",
    "lowrank_ext-p0.1",
    "ext_ops",
    "ext_ops-p0.1",
    "peft_bnb",
    "peft_bnb-p0.1",
    "lowrank_torch",
    "dense_bf16_floor",
    "dense_bf16_floor-p0.1",
    "ext_dense_bf16",
    "ext_dense_bf16-p0.1",
]


@pytest.mark.benchmark(group="lora linear fwd+bwd M512 4096x4096 r16 bf16")
@pytest.mark.parametrize("provider", LORA_PROVIDERS)
def test_lora_forward_backward(benchmark, provider):
    step = lora_step(provider)
    run(benchmark, step, flops=3 * 2 * M * K * N, peak_extra_mib=peak_extra_mib(provider))


GATE_UP_N = 14336  # Llama-3-8B gate_proj / up_proj: a dequantized copy (112 MiB) is far above glibc's threshold


@pytest.mark.benchmark(group="lora linear fwd+bwd M512 4096->14336 r16 bf16")
@pytest.mark.parametrize("provider", ["lowrank_ext", "peft_bnb", "dense_bf16_floor"])
def test_lora_forward_backward_gate_up(benchmark, provider):
    step = lora_step(provider, GATE_UP_N)
    run(benchmark, step, flops=3 * 2 * M * K * GATE_UP_N, peak_extra_mib=peak_extra_mib(provider, GATE_UP_N))


def peak_extra_mib(provider: str, n: int = N) -> float:
    """Peak memory above the set-up of one training step, measured in a fresh subprocess (MiB)."""
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        LOWRANK_BENCH_MALLOC="default",
        LOWRANK_BENCH_THREADS=str(torch.get_num_threads()),
    )
    out = subprocess.run(
        [sys.executable, __file__, "peak", provider, str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_peak(provider: str, n: int) -> None:
    step = lora_step(provider, n)
    with open("/proc/self/clear_refs", "w") as refs:  # reset VmHWM to the current RSS
        refs.write("5")
    before = _rss_kib("VmRSS")
    step()
    step()
    print((_rss_kib("VmHWM") - before) / 1024)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "peak":
    _measure_peak(sys.argv[2], int(sys.argv[3]))


# ---------------------------------------------------------------------------------------------------
# Interleaved ratios: on a shared or virtualised machine the speed of the host drifts during a run, and
# pytest-benchmark measures the providers one after another. Here every round times each provider once, in
# turn, and the ratios are taken per round (median over rounds), so a slow stretch of the host slows
# every provider of a round alike.
#   python bench/bench_ext_cpu.py interleaved OUT.json [ROUNDS]   (threads: LOWRANK_BENCH_THREADS)
# ---------------------------------------------------------------------------------------------------

INTERLEAVED = {
    f"M512 {K}x{N} r16 bf16": (N, ["lowrank_ext", "dense_bf16_floor", "ext_dense_bf16", "peft_bnb"]),
    f"M512 {K}x{N} r16 bf16, dropout 0.1": (
        N,
        ["lowrank_ext-p0.1", "dense_bf16_floor-p0.1", "ext_dense_bf16-p0.1", "peft_bnb-p0.1"],
    ),
    f"M512 {K}->{GATE_UP_N} r16 bf16": (GATE_UP_N, ["lowrank_ext", "dense_bf16_floor", "ext_dense_bf16"]),
}


def _interleaved(out_path: str, rounds: int) -> None:
    import json
    import statistics
    import time

    timer = time.perf_counter  # wall time: process CPU time also counts other threads of the process (bnb's)
    results = {}
    for case, (n, providers) in INTERLEAVED.items():
        steps = {p: lora_step(p, n) for p in providers}
        for step in steps.values():
            step()  # warm-up
        times = {p: [] for p in providers}
        for _ in range(rounds):
            for p, step in steps.items():
                start = timer()
                step()
                times[p].append(timer() - start)
        ours = providers[0]
        results[case] = {
            p: {
                "min_ms": 1e3 * min(t),
                "median_ms": 1e3 * statistics.median(t),
                f"{ours}_over_this": statistics.median(a / b for a, b in zip(times[ours], t, strict=True)),
            }
            for p, t in times.items()
        }
        for p, r in results[case].items():
            print(f"{case:40s} {p:24s} min {r['min_ms']:8.2f} ms  median {r['median_ms']:8.2f} ms  "
                  f"{ours} ÷ this: {r[f'{ours}_over_this']:.3f}")  # fmt: skip
    record = {
        "machine": MACHINE,
        "threads": torch.get_num_threads(),
        "timer": timer.__name__,
        "rounds": rounds,
        "memory_regime": MEMORY_REGIME,
        "torch": torch.__version__,
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "results": results,
    }
    with open(out_path, "w") as out:
        json.dump(record, out, indent=1)


if __name__ == "__main__" and len(sys.argv) in (3, 4) and sys.argv[1] == "interleaved":
    _interleaved(sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 15)
