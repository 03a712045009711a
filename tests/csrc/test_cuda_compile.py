"""Every CUDA source in csrc/cuda/ compiles with nvcc (host and device code, sm_80 and sm_90).

This runs on machines without a GPU and without a CUDA build of torch: nvcc and torch's headers are
enough to catch compile errors before a GPU machine sees the code. Nothing here runs a kernel.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess

import pytest
import torch
from torch.utils import cpp_extension

ROOT = pathlib.Path(__file__).resolve().parents[2]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHES = ("80", "90")


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (pathlib.Path(cuda_home) / "bin" / "nvcc").exists():
        return str(pathlib.Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def setup_module_flags() -> list[str]:
    """setup.py's own nvcc flags (its setup() call is guarded by __name__ == "__main__")."""
    spec = importlib.util.spec_from_file_location("lowrank_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.NVCC_FLAGS)


NVCC = find_nvcc()

# Two translation units of ATen headers for two architectures: about a minute on 2 cores.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)"),
]


def test_there_are_cuda_sources():
    assert [p.name for p in CUDA_SOURCES] == ["lora_cuda.cu", "nf4_cuda.cu"]


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source: pathlib.Path, tmp_path: pathlib.Path):
    command = [
        NVCC,
        "-c",
        str(source),
        "-o",
        str(tmp_path / (source.stem + ".o")),
        "-std=c++17",  # the oldest standard torch's extension builds use; newer headers only warn
        *cpp_extension.COMMON_NVCC_FLAGS,  # what a torch extension build adds (no implicit half conversions)
        *setup_module_flags(),
        *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHES),
        "--compiler-options",
        "-fPIC",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-I{ROOT / 'csrc'}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
    ]
    if torch.version.cuda is None:
        # A CPU build of torch ships the c10/cuda headers but not their generated config header.
        command.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-6000:]}"
    # Warnings from torch's headers are not ours to fix; warnings in our own sources are.
    ours = [line for line in result.stderr.splitlines() if "csrc/" in line and "warning" in line.lower()]
    assert not ours, "\n".join(ours)
