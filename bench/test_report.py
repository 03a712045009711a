"""Self-test of bench/report.py on synthetic records: ``pytest bench/test_report.py`` (no GPU, < 1 s)."""

from __future__ import annotations

import json

import report


def _record(op: str, provider: str, time_s: float, ours: bool = False, **case) -> dict:
    info = {
        "op": op,
        "case": case,
        "provider": provider,
        "provider_label": provider,
        "ours": ours,
        "time_s": time_s,
        "kernel_median_s": time_s,
        "wall_median_s": time_s * 1.5,
        "fraction_of_limit": 49.2e-6 / time_s if op == "nf4_dequantize" else 0.5,
    }
    nodeid = f"bench/x.py::test[{op}-{provider}-{'-'.join(map(str, case.values()))}]"
    return {"type": "benchmark", "nodeid": nodeid, "stats": {"median": time_s * 1.5}, "extra_info": info}


MACHINE = {"type": "machine", "env": {"device": "H100", "device_type": "cuda", "tiny_shapes": False}, "limits": {}}


def _write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_goals_are_judged_on_a_full_size_cuda_run(tmp_path) -> None:
    records = [
        MACHINE,
        _record("nf4_dequantize", "triton", 52e-6, True, shape="4096x14336", double_quant=True),
        _record("nf4_dequantize", "triton", 250e-6, True, shape="8192x28672", double_quant=True),
        _record("lora_fwd", "triton", 10e-6, True, shape="4096x4096", M=16, r=16),
        _record("lora_fwd", "dequant_gemm", 25e-6, shape="4096x4096", M=16, r=None),
        _record("lora_bwd", "triton", 100e-6, True, shape="4096x4096", M=2048, r=16),
        _record("lora_bwd", "gemm_dx", 100e-6, shape="4096x4096", M=2048, r=None),
    ]
    _write_jsonl(tmp_path / "r.jsonl", records)
    text = report.render(report.load([tmp_path / "r.jsonl"]))
    assert "| 2. NF4+DQ dequant ≤ 55 µs | shape=4096x14336 | 52.0 µs | met |" in text
    assert "| 2. NF4+DQ dequant ≤ 220 µs | shape=8192x28672 | 250.0 µs | **not met** |" in text
    assert (
        "| 3. fwd, M ≤ 64: ≥ 3× faster than dequant + GEMM | shape=4096x4096 M=16 r=16 | 2.50× | **not met** |" in text
    )
    assert "| 5. bwd (dX, dA, dB) ≤ 1.1× dX GEMM time | shape=4096x4096 M=2048 r=16 | 1.00× | met |" in text
    assert "| 2.50× |" in text  # the dequant + GEMM row: 2.5 times lowrank's time


def test_cpu_runs_are_not_judged_and_a_cut_line_is_tolerated(tmp_path) -> None:
    machine = {**MACHINE, "env": {"device": "CPU", "device_type": "cpu", "tiny_shapes": True}}
    path = tmp_path / "r.jsonl"
    _write_jsonl(path, [machine, _record("nf4_dequantize", "triton", 1e-3, True, shape="128x448", double_quant=True)])
    with path.open("a") as handle:
        handle.write('{"type": "benchmark", "nodeid": "cut')  # a run killed mid-write
    text = report.render(report.load([path]))
    assert "n/a (not an H100 run)" in text and "**not met**" not in text


def test_a_later_success_supersedes_a_failure_and_pytest_benchmark_json_merges(tmp_path) -> None:
    ok = _record("lora_fwd", "torch", 2e-3, shape="4096x4096", M=1, r=16)
    _write_jsonl(
        tmp_path / "a.jsonl", [MACHINE, {"type": "error", "nodeid": ok["nodeid"], "when": "call", "message": "boom"}]
    )
    pb = {
        "machine_info": {"lowrank": {"device": "H100"}},
        "benchmarks": [{"fullname": ok["nodeid"], "name": "x", "stats": ok["stats"], "extra_info": ok["extra_info"]}],
    }
    (tmp_path / "b.json").write_text(json.dumps(pb))
    merged = report.load([tmp_path / "a.jsonl", tmp_path / "b.json"])
    assert list(merged["benchmarks"]) == [ok["nodeid"]] and not merged["errors"]
    out = tmp_path / "out"
    assert (
        report.main(
            [str(tmp_path / "a.jsonl"), str(tmp_path / "b.json"), "--out", f"{out}.md", "--json-out", f"{out}.json"]
        )
        == 0
    )
    again = report.load([tmp_path / "out.json"])
    assert list(again["benchmarks"]) == [ok["nodeid"]]


def _side_by_side_record(test: str, group: str, provider: str, role: str, seconds: float, **extra) -> dict:
    """One pytest-benchmark record of bench_ext_cpu.py's shape: every statistic ``seconds``."""
    stats = {"min": seconds, "max": seconds, "mean": seconds, "median": seconds, "stddev": 0.0, "rounds": 3}
    return {
        "name": f"{test}[{provider}]",
        "fullname": f"bench/bench_ext_cpu.py::{test}[{provider}]",
        "group": group,
        "stats": stats,
        "extra_info": {"provider": provider, "role": role, **extra},
    }


def test_cpu_side_by_side_groups_compare_with_competitor_and_memcpy(tmp_path) -> None:
    def bench(provider: str, role: str, seconds: float, **extra) -> dict:
        return _side_by_side_record("test_dequantize", "dequantize 4096x4096", provider, role, seconds, **extra)

    data = {
        "machine_info": {"lowrank": {"device": "CPU", "tiny_shapes": True}},
        "benchmarks": [
            bench("ext_out", "lowrank", 0.5e-3, bytes_moved=40e6),
            bench("bnb_cpu", "competitor", 6.0e-3, bytes_moved=40e6),
            bench("memcpy_same_output_bytes", "limit", 1.0e-3, bytes_moved=64e6),
        ],
    }
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    markdown = report.render(report.load([path]))
    assert "## dequantize 4096x4096 (side by side, one run)" in markdown
    # 40 MB in 0.5 ms = 80 GB/s = 125 % of memcpy's 64 GB/s; bitsandbytes takes 12x as long
    assert "| ext_out | lowrank | 0.500 | 0.500 | 80.0 GB/s | 125 % | 12.00× | – | – |" in markdown
    assert "| bnb_cpu | competitor | 6.000 |" in markdown and "full size" in markdown


def test_cpu_side_by_side_rows_compare_with_their_own_dropout_variant(tmp_path) -> None:
    """A ``-p0.1`` row is compared with the ``-p0.1`` competitor and floors, a plain row with the plain ones."""

    def bench(provider: str, role: str, seconds: float) -> dict:
        return _side_by_side_record("test_lora", "lora step", provider, role, seconds, flops=1e9)

    data = {
        "machine_info": {"lowrank": {"device": "CPU"}},
        "benchmarks": [
            bench("lowrank_ext", "lowrank", 0.050),
            bench("lowrank_ext-p0.1", "lowrank", 0.060),
            bench("dense_bf16_floor", "floor", 0.040),
            bench("dense_bf16_floor-p0.1", "floor", 0.080),
            bench("peft_bnb", "competitor", 0.100),
            bench("peft_bnb-p0.1", "competitor", 0.090),
        ],
    }
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    markdown = report.render(report.load([path]))
    assert (
        "| lowrank_ext | lowrank | 50.000 | 50.000 | 20 GFLOP/s | – | 2.00× | 1.25× dense_bf16_floor | – |" in markdown
    )
    assert (
        "| lowrank_ext-p0.1 | lowrank | 60.000 | 60.000 | 17 GFLOP/s | – | 1.50× | 0.75× dense_bf16_floor-p0.1 | – |"
        in markdown
    )
