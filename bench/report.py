"""Turn benchmark results into the README's markdown performance table (and one combined JSON file).

Usage::

    python bench/report.py RESULTS... [--out report.md] [--json-out results.json]
                           [--stages stages.jsonl] [--tests-xml junit.xml]

RESULTS are pytest-benchmark ``--benchmark-json`` files, the JSON-lines records the harness appends to
``LOWRANK_BENCH_JSONL``, or a ``results.json`` written by this script; they may be mixed (a benchmark seen
twice is kept once). ``--stages`` and ``--tests-xml`` come from ``bench/gpu/run.sh``. Output files are
written atomically; without ``--out`` the markdown goes to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

SECTIONS = (
    ("nf4_dequantize", "NF4 dequantize → bf16"),
    ("nf4_quantize", "NF4 quantize from bf16"),
    ("lora_fwd", "LoRA linear, NF4 base: forward"),
    ("lora_bwd", "LoRA linear, NF4 base: backward (dX, dA, dB)"),
    ("lora_fwd_bwd", "LoRA linear, NF4 base: forward + backward"),
    ("train_step", "QLoRA training step"),
)
BASELINES = ("gemm_dense", "dequant_gemm", "gemm_dx", "gemm_fwd_dx")
GOAL_DEQUANT_US = {"4096x14336": 55.0, "8192x28672": 220.0}


# ----------------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------------


def load(paths: list[Path]) -> dict:
    """Merge result files into ``{"machine", "benchmarks", "skipped", "errors", "stages", "tests"}``."""
    merged = {
        "machine": {}, "benchmarks": {}, "skipped": {}, "errors": {}, "stages": [], "tests": None, "side_by_side": {}
    }  # fmt: skip
    for path in paths:
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            continue
        if path.suffix == ".jsonl":
            for line_no, line in enumerate(text.splitlines(), 1):
                try:
                    _add_record(merged, json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a killed run: keep the others
                    print(f"report: {path}:{line_no} is not JSON, skipped", file=sys.stderr)
            continue
        data = json.loads(text)
        if data.get("generated_by") == "bench/report.py":
            merged["machine"].update(data.get("machine", {}))
            for record in data.get("benchmarks", []):
                _add_record(merged, {"type": "benchmark", **record})
            for key in ("skipped", "errors"):
                for record in data.get(key, []):
                    merged[key][record["nodeid"]] = record
            merged["stages"] += data.get("stages", [])
            merged["tests"] = merged["tests"] or data.get("tests")
        else:  # pytest-benchmark --benchmark-json
            merged["machine"].update(data.get("machine_info", {}).get("lowrank", {}))
            for bench in data.get("benchmarks", []):
                record = {
                    "type": "benchmark",
                    "nodeid": bench.get("fullname", bench["name"]),
                    "group": bench.get("group"),
                }
                record["stats"] = {
                    k: bench["stats"].get(k) for k in ("min", "max", "mean", "median", "stddev", "rounds")
                }
                record["extra_info"] = bench.get("extra_info", {})
                _add_record(merged, record)
    for nodeid in merged["benchmarks"]:  # a later successful run of the same case supersedes a skip or failure
        merged["skipped"].pop(nodeid, None)
        merged["errors"].pop(nodeid, None)
    return merged


def _add_record(merged: dict, record: dict) -> None:
    kind = record.get("type")
    if kind == "machine":
        merged["machine"].update({**record.get("env", {}), "limits": record.get("limits")})
    elif kind == "benchmark" and record.get("extra_info", {}).get("op"):
        merged["benchmarks"][record["nodeid"]] = record
        limits = record["extra_info"].get("limits")
        if limits and not merged["machine"].get("limits"):
            merged["machine"]["limits"] = limits
        for key, value in record["extra_info"].get("env", {}).items():
            merged["machine"].setdefault(key, value)
    elif kind == "benchmark" and record.get("extra_info", {}).get("role"):  # bench_ext_cpu.py's groups
        merged["side_by_side"].setdefault(record.get("group") or "", {})[record["nodeid"]] = record
    elif kind == "skip":
        merged["skipped"][record["nodeid"]] = record
    elif kind == "error":
        merged["errors"][record["nodeid"]] = record


def load_stages(path: Path) -> list[dict]:
    stages = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            stages.append(json.loads(line))
    return stages


def load_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    failed = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            element = case.find(tag)
            if element is not None:
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                failed.append({"test": name, "message": (element.get("message") or "")[:300]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed
    return counts


def merge_test_counts(a: dict | None, b: dict) -> dict:
    """The counts of two JUnit files as one (run.sh's Triton tests and the extension's CUDA tests)."""
    if not a:
        return b
    merged = {k: a.get(k, 0) + b.get(k, 0) for k in ("tests", "failures", "errors", "skipped", "passed")}
    merged["time_s"] = round(a.get("time_s", 0) + b.get("time_s", 0), 1)
    merged["failed_tests"] = a.get("failed_tests", []) + b.get("failed_tests", [])
    return merged


# ----------------------------------------------------------------------------------------------------
# Formatting.
# ----------------------------------------------------------------------------------------------------


def _us(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    us = seconds * 1e6
    return f"{us:,.1f}" if us < 1000 else f"{us:,.0f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _case_text(case: dict, skip: tuple[str, ...] = ("dtype",)) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items() if k not in skip and v is not None)


def _case_key(info: dict) -> tuple:
    case = dict(info["case"])
    case.pop("r", None)
    return (info["op"], tuple(sorted(case.items())))


def _ours_index(records: list[dict]) -> dict:
    """(op, case without r) -> {r: time of lowrank's provider}."""
    index: dict = {}
    for record in records:
        info = record["extra_info"]
        if info.get("ours"):
            index.setdefault(_case_key(info), {})[info["case"].get("r")] = info["time_s"]
    return index


def _speedup(info: dict, ours: dict) -> str:
    """How many times faster lowrank is than this row (same case; a baseline compares with the smallest r)."""
    if info.get("ours"):
        return "—"
    times = ours.get(_case_key(info), {})
    r = info["case"].get("r")
    ours_time = times.get(r) if r is not None else (times[min(times)] if times else None)
    if not ours_time:
        return "–"
    return f"{info['time_s'] / ours_time:.2f}×"


def _row_order(info: dict) -> tuple:
    provider = info["provider"]
    rank = 0 if info.get("ours") else 1 if provider.split(":")[0] in BASELINES else 2 if ":" not in provider else 3
    return (rank, provider)


def _variant(provider: str) -> str:
    """The measured variant a provider name carries after ``-p`` (the dropout probability), else ''."""
    return provider.partition("-p")[2]


def _side_by_side(groups: dict) -> list[str]:
    """Tables of the CPU side-by-side groups: each row against the group's competitor and memcpy rows."""
    out = []
    for group, records in sorted(groups.items()):
        rows = sorted(records.values(), key=lambda r: r["stats"]["min"])
        limit = next((r for r in rows if r["extra_info"]["role"] == "limit"), None)
        out += [
            f"## {group} (side by side, one run)",
            "",
            "| provider | role | min ms | median ms | GB/s or GFLOP/s | % of memcpy | competitor ÷ this "
            "| this ÷ floor (medians) | peak extra MiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        limit_rate = limit["extra_info"]["bytes_moved"] / limit["stats"]["min"] if limit else None
        for r in rows:
            info, best = r["extra_info"], r["stats"]["min"]
            rate, pct = "–", "–"
            if info.get("bytes_moved"):
                rate = f"{info['bytes_moved'] / best / 1e9:,.1f} GB/s"
                if limit_rate and r is not limit:
                    pct = f"{100 * info['bytes_moved'] / best / limit_rate:.0f} %"
            elif info.get("flops"):
                rate = f"{info['flops'] / best / 1e9:,.0f} GFLOP/s"
            # Rows compare with the competitor and floors of their own variant (``-p0.1``: with dropout).
            variant = _variant(info["provider"])
            same = [x for x in rows if _variant(x["extra_info"]["provider"]) == variant]
            competitor = next((x for x in same if x["extra_info"]["role"] == "competitor"), None)
            ratio = f"{competitor['stats']['min'] / best:.2f}×" if competitor else "–"
            floors = [x for x in same if x["extra_info"]["role"] == "floor" and x is not r]
            vs_floor = ", ".join(
                f"{r['stats']['median'] / x['stats']['median']:.2f}× {x['extra_info']['provider']}" for x in floors
            )
            peak = info.get("peak_extra_mib")
            out.append(
                f"| {info['provider']} | {info['role']} | {best * 1e3:,.3f} | {r['stats']['median'] * 1e3:,.3f} | "
                f"{rate} | {pct} | {ratio} | {vs_floor or '–'} | {'–' if peak is None else f'{peak:.1f}'} |"
            )
        out.append("")
    return out


def render(merged: dict) -> str:
    machine = merged["machine"]
    limits = machine.get("limits") or {}
    records = sorted(merged["benchmarks"].values(), key=lambda r: r["nodeid"])
    ours = _ours_index(records)
    out = ["# lowrank performance", ""]
    if not records and merged["side_by_side"]:  # only bench_ext_cpu.py: its shapes are fixed, never tiny
        machine = {**machine, "tiny_shapes": False}
    out += _header(machine, limits)
    out += _goals(records, machine)
    out += _forward_paths(records)
    out += _side_by_side(merged["side_by_side"])
    for op, title in SECTIONS:
        rows = [r for r in records if r["extra_info"]["op"] == op]
        if rows:
            out += _section(op, title, rows, ours)
    out += _not_measured(merged)
    out += _stages_and_tests(merged)
    return "\n".join(out) + "\n"


def _header(machine: dict, limits: dict) -> list[str]:
    tiny = machine.get("tiny_shapes")
    shapes = "TINY (CPU logic check: the numbers mean nothing)" if tiny else "full size"
    versions = " / ".join(str(machine.get(k)) for k in ("transformers", "peft", "bitsandbytes"))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "| | |",
        "| --- | --- |",
        f"| device | {machine.get('device', 'unknown')} |",
        f"| torch / CUDA / triton | {machine.get('torch')} / {machine.get('cuda')} / {machine.get('triton')} |",
        f"| transformers / peft / bitsandbytes | {versions} |",
        f"| commit | {machine.get('commit')} (code sha256 {machine.get('tree_sha256')}) |",
        f"| measured copy bandwidth | {_num(limits.get('copy_gbps'))} GB/s — {limits.get('copy_method', '–')} |",
        f"| measured matmul peak | {_num(limits.get('matmul_tflops'), 3)} TFLOPS — {limits.get('matmul_method')} |",
        f"| shapes | {shapes}; suite {machine.get('suite')} |",
        f"| generated | {now} |",
        "",
        "*kernel µs*: `triton.testing.do_bench` median (CUDA events, L2 flushed between calls). *wall µs*: "
        "pytest-benchmark median of `fn(); synchronize()` (includes Python and launch overhead). Throughput and "
        "*% of limit* (roofline floor from the measured copy bandwidth and matmul peak ÷ time) use the kernel time "
        "where there is one. *lowrank ×*: this row's time ÷ lowrank's time on the same case (> 1: lowrank is faster); "
        "baselines without an adapter compare with lowrank at the smallest r.",
        "",
    ]
    return lines


def _find(records: list[dict], op: str, provider: str, **case) -> list[dict]:
    found = []
    for record in records:
        info = record["extra_info"]
        if info["op"] == op and info["provider"] == provider and all(info["case"].get(k) == v for k, v in case.items()):
            found.append(info)
    return found


def _goals(records: list[dict], machine: dict) -> list[str]:
    evaluated = machine.get("device_type") == "cuda" and not machine.get("tiny_shapes")
    rows = []

    def add(goal: str, info: dict, measured: str, ok: bool) -> None:
        status = ("met" if ok else "**not met**") if evaluated else "n/a (not an H100 run)"
        case = _case_text(info["case"], skip=("dtype", "double_quant"))
        rows.append(((goal, _sort_case(_case_key(info)), case), f"| {goal} | {case} | {measured} | {status} |"))

    for info in _find(records, "nf4_dequantize", "triton", double_quant=True):
        shape = info["case"]["shape"]
        frac = info.get("fraction_of_limit") or 0.0
        add("1. NF4+DQ dequant ≥ 80 % of copy BW", info, f"{_pct(frac)} ({_us(info['time_s'])} µs)", frac >= 0.8)
        if shape in GOAL_DEQUANT_US:
            target = GOAL_DEQUANT_US[shape]
            add(
                f"2. NF4+DQ dequant ≤ {target:.0f} µs",
                info,
                f"{_us(info['time_s'])} µs",
                info["time_s"] * 1e6 <= target,
            )
    small_m, large_m = (64, 128) if machine.get("tiny_shapes") else (64, 2048)  # tiny runs shrink M 2048 → 128
    for info in _find(records, "lora_fwd", "triton"):
        m = info["case"]["M"]
        base = {k: v for k, v in info["case"].items() if k in ("shape", "M")}
        if m <= small_m:
            for other in _find(records, "lora_fwd", "dequant_gemm", **base):
                ratio = other["time_s"] / info["time_s"]
                add("3. fwd, M ≤ 64: ≥ 3× faster than dequant + GEMM", info, f"{ratio:.2f}×", ratio >= 3.0)
        elif m >= large_m:
            for other in _find(records, "lora_fwd", "gemm_dense", **base):
                ratio = info["time_s"] / other["time_s"]
                add("4. fwd, M ≥ 2048: ≤ 1.10× dense bf16 GEMM time", info, f"{ratio:.2f}×", ratio <= 1.10)
    for info in _find(records, "lora_bwd", "triton"):
        case = info["case"]
        for other in _find(records, "lora_bwd", "gemm_dx", shape=case["shape"], M=case["M"]):
            ratio = info["time_s"] / other["time_s"]
            add("5. bwd (dX, dA, dB) ≤ 1.1× dX GEMM time", info, f"{ratio:.2f}×", ratio <= 1.1)
    if not rows:
        return []
    header = [
        "## Goals (H100, docs/bench.md)",
        "",
        "| goal | case | measured | status |",
        "| --- | --- | --- | --- |",
    ]
    return header + [row for _, row in sorted(rows, key=lambda item: item[0])] + [""]


def _forward_paths(records: list[dict]) -> list[str]:
    """Each forward path's time per case, the fastest, and what ``choose_forward_path`` picked (its M thresholds)."""
    times: dict = {}
    chosen: dict = {}
    for record in records:
        info = record["extra_info"]
        if info["op"] != "lora_fwd" or not info["provider"].startswith("triton"):
            continue
        key = _case_key(info) + (info["case"].get("r"),)
        if ":" in info["provider"]:
            times.setdefault(key, {})[info["provider"].partition(":")[2]] = info["time_s"]
        elif info.get("path"):
            chosen[key] = info["path"]
    if not times:
        return []
    paths = sorted({p for per_case in times.values() for p in per_case})
    out = [
        "## Forward path crossover (`choose_forward_path`'s M thresholds)",
        "",
        "| case | " + " | ".join(f"{p} µs" for p in paths) + " | fastest | chosen |",
        "| --- | " + " | ".join("---" for _ in paths) + " | --- | --- |",
    ]
    for key in sorted(times, key=lambda k: (_sort_case(k[:2]), k[2] or 0)):
        per_case = times[key]
        fastest = min(per_case, key=per_case.get)
        pick = chosen.get(key, "–")
        mark = "" if pick in (fastest, "–") else " ⚠"
        fields = dict(key[1])
        case = f"shape={fields.get('shape')} M={fields.get('M')} r={key[2]}"
        cells = " | ".join(_us(per_case.get(p)) for p in paths)
        out.append(f"| {case} | {cells} | {fastest} | {pick}{mark} |")
    return out + ["", "⚠: the automatic choice is not the fastest path measured for that case.", ""]


def _section(op: str, title: str, rows: list[dict], ours: dict) -> list[str]:
    out = [f"## {title}", ""]
    if op == "train_step":
        out += [
            "| case | provider | step ms | tokens/s | peak memory GiB | % of bf16 peak (MFU) | lowrank × "
            "| loss first → last |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for record in sorted(rows, key=lambda r: _row_order(r["extra_info"])):
            info = record["extra_info"]
            peak = info.get("peak_mem_bytes")
            out.append(
                f"| {_case_text(info['case'])} | {info['provider_label']} | {_num(info['wall_median_s'] * 1e3)} | "
                f"{_num(info.get('tokens_per_s'), 0)} | {_num(peak / 2**30, 2) if peak else '–'} | "
                f"{_pct(info.get('fraction_of_limit'))} | {_speedup(info, ours)} | "
                f"{_num(info.get('loss_first'), 3)} → {_num(info.get('loss_last'), 3)} |"
            )
        return out + [""]
    lora = op.startswith("lora")
    rate = "TFLOPS | GB/s" if lora else "GB/s"
    out += [
        f"| case | provider | kernel µs | wall µs | {rate} | % of limit | lowrank × | check |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if lora else ""),
    ]
    by_case: dict = {}
    for record in rows:
        info = record["extra_info"]
        by_case.setdefault(_case_key(info), []).append(info)
    for key in sorted(by_case, key=_sort_case):
        for info in sorted(by_case[key], key=_row_order):
            rates = (
                f"{_num(info.get('tflops'), 1)} | {_num(info.get('gbps'), 0)}" if lora else _num(info.get("gbps"), 0)
            )
            bound = f" ({info.get('bound')})" if lora and info.get("fraction_of_limit") else ""
            out.append(
                f"| {_case_text(info['case'])} | {info['provider_label']} | {_us(info.get('kernel_median_s'))} | "
                f"{_us(info.get('wall_median_s'))} | {rates} | {_pct(info.get('fraction_of_limit'))}{bound} | "
                f"{_speedup(info, ours)} | {_check(info)} |"
            )
    return out + [""]


def _sort_case(key: tuple) -> tuple:
    case = dict(key[1])
    k, _, n = str(case.get("shape", "0x0")).partition("x")
    size = int(k) * int(n) if k.isdigit() and n.isdigit() else 0
    return (size, str(case.get("shape")), case.get("M") or 0, not case.get("double_quant"))


def _check(info: dict) -> str:
    if "matches_reference" in info:
        return "bit-exact" if info["matches_reference"] else "**differs from reference**"
    errors = {k: v for k, v in info.items() if k.startswith("max_rel_err")}
    if errors:
        return f"rel. err ≤ {max(errors.values()):.1e}"
    if info.get("path"):
        return f"path {info['path']}"
    return ""


def _not_measured(merged: dict) -> list[str]:
    out = []
    reasons: dict = {}
    for record in merged["skipped"].values():
        reasons.setdefault(record["reason"], []).append(record["nodeid"])
    if reasons:
        out += ["## Skipped", ""]
        out += [f"- {reason} ({len(ids)} case{'s' if len(ids) > 1 else ''})" for reason, ids in sorted(reasons.items())]
        out.append("")
    if merged["errors"]:
        out += ["## Failed benchmarks", ""]
        for nodeid, record in sorted(merged["errors"].items()):
            message = " ".join(record.get("message", "").split())[:300]
            out.append(f"- `{nodeid}` ({record.get('when')}): {message}")
        out.append("")
    return out


def _stages_and_tests(merged: dict) -> list[str]:
    out = []
    if merged["stages"]:
        out += [
            "## Run stages (bench/gpu/run.sh)",
            "",
            "| stage | exit | seconds | note |",
            "| --- | --- | --- | --- |",
        ]
        for stage in merged["stages"]:
            note = "timed out" if stage.get("timed_out") else stage.get("note", "")
            out.append(f"| {stage['stage']} | {stage.get('rc')} | {stage.get('seconds')} | {note} |")
        out.append("")
    tests = merged["tests"]
    if tests:
        cut = any(s["stage"] == "tests" and s.get("timed_out") for s in merged["stages"])
        out += [
            "## Correctness tests (run.sh stage `tests`)",
            "",
            f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped of {tests['tests']} in {tests['time_s']} s"
            + (" — **cut short by the time box**: the rest did not run." if cut else "."),
            "",
        ]
        out += [f"- `{f['test']}`: {' '.join(f['message'].split())}" for f in tests["failed_tests"][:30]]
        out.append("")
    return out


# ----------------------------------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path, help="pytest-benchmark JSON, harness JSONL or results.json")
    parser.add_argument("--out", type=Path, help="markdown output (default: stdout)")
    parser.add_argument("--json-out", type=Path, help="combined JSON output")
    parser.add_argument("--stages", type=Path, help="JSON lines of run.sh stage outcomes")
    parser.add_argument(
        "--tests-xml", type=Path, action="append", default=[], help="JUnit XML of correctness tests (repeatable)"
    )
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        print(f"report: ignoring missing result files {missing}", file=sys.stderr)
    merged = load([p for p in args.results if p.is_file()])
    if args.stages and args.stages.is_file():
        merged["stages"] += load_stages(args.stages)
    for path in args.tests_xml:
        if not path.is_file():
            continue
        try:
            merged["tests"] = merge_test_counts(merged["tests"], load_junit(path))
        except ET.ParseError as err:
            print(f"report: {path} is not valid JUnit XML ({err})", file=sys.stderr)
    markdown = render(merged)
    if args.out:
        write_atomic(args.out, markdown)
    else:
        sys.stdout.write(markdown)
    if args.json_out:
        combined = {
            "generated_by": "bench/report.py",
            "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": merged["machine"],
            "stages": merged["stages"],
            "tests": merged["tests"],
            "benchmarks": list(merged["benchmarks"].values()),
            "skipped": list(merged["skipped"].values()),
            "errors": list(merged["errors"].values()),
        }
        write_atomic(args.json_out, json.dumps(combined, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
