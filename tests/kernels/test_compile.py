"""The ahead-of-time compile check (bench/compile_kernels.py): Triton kernels compiled for sm_90 without a GPU.

The default run compiles one representative variant per kernel for sm_90 (about 20 s) and checks the
occupancy arithmetic, the ptxas log parsing, the recording of autotune candidates and that a compile error
fails the check. The full sweep (every launch configuration, sm_90 and sm_80, the installed triton and
triton 3.6) is CI's step after the tests: ``bash scripts/compile_check.sh`` (docs/compile.md).

Compiling needs real ``@triton.jit`` functions, so those parts run in a subprocess without the
``TRITON_INTERPRET=1`` that tests/conftest.py sets for this process.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import compile_kernels as ck
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _compile_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The subprocess imports compile_kernels as a script would (bench/ first, then what this process had).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "bench"), os.environ.get("PYTHONPATH")]))
    return env


def test_occupancy_register_limits_on_h200():
    # 32 registers, 4 warps: 1024 registers per warp, 16 warps per scheduler -> 64 warps = 16 CTAs
    # (the thread limit 2048 / 128 says 16 too).
    occ = ck.occupancy(32, 0, 4, arch=90)
    assert occ["limits"]["registers"] == 16 and occ["limits"]["threads"] == 16 and occ["ctas_per_sm"] == 16
    # 162 registers round up to 5376 per warp: 3 warps per scheduler, 12 per SM, one 8-warp CTA.
    occ = ck.occupancy(162, 67584, 8, arch=90)
    assert occ["ctas_per_sm"] == 1 and occ["limiter"] == ["registers"]
    # 255 registers: 8192 per warp, 2 per scheduler, 8 per SM -> 2 CTAs of 4 warps.
    assert ck.occupancy(255, 0, 4, arch=90)["limits"]["registers"] == 2
    # 33 registers are allocated as 40: 1280 per warp, 12 per scheduler.
    assert ck.occupancy(33, 0, 1, arch=90)["limits"]["registers"] == 48


def test_occupancy_shared_memory_limits():
    # 64 KiB + the 1 KiB the driver reserves per CTA: 3 CTAs in 228 KiB on an H200, 2 in an A100's 164 KiB.
    assert ck.occupancy(32, 65536, 4, arch=90)["limits"]["shared"] == 3
    assert ck.occupancy(32, 65536, 4, arch=80)["limits"]["shared"] == 2
    # 128 KiB: one CTA; above 227 KiB per CTA nothing launches.
    assert ck.occupancy(32, 131072, 4, arch=90)["ctas_per_sm"] == 1
    assert ck.occupancy(32, 228 * 1024, 4, arch=90)["ctas_per_sm"] == 0
    # 32 small CTAs at most, whatever else allows.
    occ = ck.occupancy(16, 0, 1, arch=90)
    assert occ["ctas_per_sm"] == 32 and occ["limiter"] == ["blocks"]


def test_occupancy_rejects_impossible_register_counts():
    with pytest.raises(ValueError, match="registers per thread"):
        ck.occupancy(256, 0, 4)
    with pytest.raises(ValueError, match="num_warps"):
        ck.occupancy(32, 0, 0)


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_lora_grad_kernel' for 'sm_90a'
ptxas info    : Function properties for _lora_grad_kernel
    8 bytes stack frame, 580 bytes spill stores, 612 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem
ptxas info    : Compile time = 75.000 ms
"""


def test_ptxas_log_parsing():
    usage = ck.parse_ptxas_log(PTXAS_LOG)
    assert usage == {"registers": 255, "spill_stores": 580, "spill_loads": 612, "stack": 8, "static_shared": 16}
    with pytest.raises(ValueError, match="Used N registers"):
        ck.parse_ptxas_log("ptxas info    : 0 bytes gmem\n")


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a CUDA machine the GPU tests compile and run every kernel for the device"
)
def test_quick_sweep_compiles_every_kernel_for_sm90(tmp_path):
    """One representative launch configuration of every kernel in kernels/ compiles for sm_90 (cubin and
    ptxas resource usage); the script itself fails when a ``*_kernel`` is reached by no launcher case."""
    result = subprocess.run(
        [sys.executable, "-P", str(ROOT / "bench" / "compile_kernels.py"), "--quick", "--arch", "90", "--jobs", "1"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=_compile_env(),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    kernels = {row["kernel"] for row in rows}
    assert {"_quantize_4bit_kernel", "_dequantize_4bit_kernel", "_lora_matmul_kernel", "_lora_grad_kernel"} <= kernels
    for row in rows:
        assert row["ok"] and row["arch"] == 90, row
        assert 0 < row["registers"] <= 255 and row["cubin_bytes"] > 0, row
        assert row["occupancy"]["ctas_per_sm"] >= 1, row
    assert "| kernel | configuration |" in (tmp_path / "table.md").read_text()


PROBE = """
import triton
import triton.language as tl
import compile_kernels as ck


@triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=2), triton.Config({"BLOCK": 128}, num_warps=4)],
                 key=["n"])
@triton.jit
def tuned_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


@triton.jit
def broken_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)  # BLOCK = 48: arange needs a power of 2


import torch

x = torch.empty(4096, device="meta")
launches = []
with ck.recording(launches, lambda: "probe"):
    tuned_kernel[(1,)](x, 4096)
    broken_kernel[(1,)](x, BLOCK=48)
assert [l.kernel.__name__ for l in launches] == ["tuned_kernel", "tuned_kernel", "broken_kernel"], launches
rows = [ck.compile_variant(v) for v in ck.variants(launches, [90])]
tuned = sorted((r for r in rows if r["kernel"] == "tuned_kernel"), key=lambda r: r["num_warps"])
assert [(r["ok"], r["constexprs"]["BLOCK"], r["num_warps"]) for r in tuned] == [(True, 64, 2), (True, 128, 4)], tuned
broken = [r for r in rows if r["kernel"] == "broken_kernel"]
assert len(broken) == 1 and not broken[0]["ok"] and "power of 2" in broken[0]["error"], broken
print("probe ok")
"""


def test_autotune_candidates_are_recorded_and_compile_errors_fail(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(PROBE))
    result = subprocess.run(
        [sys.executable, "-P", str(script)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=_compile_env()
    )
    assert result.returncode == 0 and "probe ok" in result.stdout, result.stdout[-4000:] + result.stderr[-4000:]


def _row(registers: int, spill: int, shared: int, warps: int, block_m: int) -> dict:
    occupancy = ck.occupancy(registers, shared, warps)
    return {
        "ok": True,
        "arch": 90,
        "kernel": "k",
        "constexprs": {"BLOCK_M": block_m, "W_QUANT": True},
        "num_warps": warps,
        "num_stages": 3,
        "registers": registers,
        "spill_stores": spill,
        "spill_loads": spill,
        "shared_bytes": shared,
        "occupancy": occupancy,
        "spills": spill > 0,
        "flagged": spill > 0 or occupancy["ctas_per_sm"] < 2,
        "first_case": f"M={block_m}",
    }


def test_flagged_variants_are_grouped_by_tile_and_reason():
    rows = [_row(162, 0, 67584, 8, 128), _row(174, 0, 57344, 8, 128), _row(255, 300, 0, 4, 16), _row(32, 0, 0, 4, 16)]
    groups = ck.flagged_groups(rows)
    assert [(g["tile"], g["reason"], g["variants"], g["registers"]) for g in groups] == [
        ("BLOCK_M=128, W_QUANT=True; w8 s3", "1 CTA/SM (registers)", 2, "162-174"),
        ("BLOCK_M=16, W_QUANT=True; w4 s3", "spills", 1, "255"),
    ]
    assert groups[1]["spill_bytes"] == "600"
