"""``python -m lowrank.env``: the report names versions, devices, the extension and each op's backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import lowrank
from lowrank import env
from lowrank.ops import dispatch


def test_collect_reports_versions_and_backends():
    info = env.collect()
    assert info["lowrank"] == lowrank.__version__
    assert info["versions"]["torch"] == torch.__version__
    assert set(info["versions"]) == {"torch", "triton", "transformers", "safetensors"}
    assert info["cuda_available"] == torch.cuda.is_available()
    assert set(info["backends"]) == ({"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"})
    for op in ("quantize_4bit", "dequantize_4bit", "double_quantize", "double_dequantize"):
        row = info["backends"]["cpu"][op]
        assert row["usable"] == dispatch.usable_backends(op, "cpu")
        assert row["auto"] == dispatch.resolve(op, "cpu", "auto")
        assert "torch" in row["usable"]
    json.dumps(info)  # plain data


def test_report_when_the_extension_is_absent(monkeypatch, capsys):
    monkeypatch.setattr(dispatch._ext, "load", lambda: None)  # as when lowrank._C is not built
    monkeypatch.setattr(dispatch._ext, "load_error", lambda: "lowrank._C is not built (test)")
    assert dispatch.ext_module() is None
    assert env.main([]) == 0
    out = capsys.readouterr().out
    assert "C++ extension: not loaded (lowrank._C is not built (test)" in out
    assert "dequantize_4bit" in out and "-> torch" in out
    assert f"torch {torch.__version__}" in out and f"lowrank {lowrank.__version__}" in out


def test_report_when_the_extension_is_disabled_and_backend_env_is_bad(monkeypatch, capsys):
    monkeypatch.setenv("LOWRANK_DISABLE_EXT", "1")
    monkeypatch.setenv("LOWRANK_BACKEND", "gpu")
    assert env.main(["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert not info["extension_loaded"] and "LOWRANK_DISABLE_EXT=1" in info["extension_reason"]
    assert info["environment"]["LOWRANK_BACKEND"] == "gpu"
    assert info["backends"]["cpu"]["quantize_4bit"]["usable"][0] == "torch"


def test_module_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, "-m", "lowrank.env"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "LOWRANK_BACKEND": "torch"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"lowrank {lowrank.__version__}\n")
    assert "backends on cpu" in result.stdout and "C++ extension:" in result.stdout
