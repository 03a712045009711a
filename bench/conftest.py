"""pytest fixtures and hooks for ``bench/`` (see ``_harness.py`` for the timing rules and switches).

Run: ``pytest bench/bench_nf4.py --benchmark-only --benchmark-json=out.json`` (the project's addopts
skip benchmarks by default). Without CUDA the shapes shrink automatically.
"""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
from _harness import Bench, append_record, environment, load_or_measure_limits


@pytest.fixture(scope="session")
def limits():
    """Copy bandwidth and matmul peak, measured once per session (or read from LOWRANK_BENCH_LIMITS)."""
    measured = load_or_measure_limits()
    append_record({"type": "machine", "env": environment(), "limits": dataclasses.asdict(measured)})
    return measured


@pytest.fixture
def bench(benchmark, limits, request):
    runner = Bench(benchmark, limits, request.node.nodeid)
    yield runner
    if runner.record is not None:
        append_record(runner.record)
    gc.collect()  # a training-step benchmark leaves a whole model behind: free it before the next one
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lowrank"] = environment()


def pytest_runtest_logreport(report):
    """Record skips (with their reason) and failures as they happen, for the report's 'not measured' list."""
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "non-benchmark" in reason:  # a plain test under --benchmark-only: not a provider we failed to measure
            return
        append_record({"type": "skip", "nodeid": report.nodeid, "reason": reason.removeprefix("Skipped: ")})
    elif report.failed:
        message = getattr(report.longrepr, "reprcrash", None)
        text = message.message if message is not None else str(report.longrepr)
        append_record({"type": "error", "nodeid": report.nodeid, "when": report.when, "message": text[:2000]})
