"""How lowrank finds out whether the extension has CUDA kernels, and how setup.py decides to build them.
Runs everywhere: on a CPU-only machine the CUDA kernels are absent and every answer must say so.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from torch.utils import cpp_extension

from lowrank import _ext, env
from lowrank.ops import dispatch

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXT = _ext.load()
needs_ext = pytest.mark.skipif(EXT is None, reason=f"C++ extension unavailable: {_ext.load_error()}")
OPS = ("quantize_4bit", "double_quantize", "double_dequantize", "dequantize_4bit", "lora_forward", "lora_backward")


def has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_ext::{op}", "CUDA")


def load_setup():
    spec = importlib.util.spec_from_file_location("lowrank_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


@needs_ext
def test_supports_cuda_exactly_where_a_cuda_kernel_is_registered():
    assert _ext.cuda_kernels_built() == has_cuda_kernel("dequantize_4bit")
    for op in OPS:
        assert EXT.supports(op, "cuda") == has_cuda_kernel(op), op
    # reached through dequantize_4bit(out=...), so it must exist wherever dequantize_4bit does
    assert has_cuda_kernel("dequantize_4bit_out") == has_cuda_kernel("dequantize_4bit")
    if _ext.cuda_kernels_built():  # quantization has no CUDA kernel: triton or torch run it
        assert {op for op in OPS if EXT.supports(op, "cuda")} == set(OPS) - {"quantize_4bit", "double_quantize"}


@needs_ext
@pytest.mark.skipif(has_cuda_kernel("dequantize_4bit"), reason="this extension was built with CUDA kernels")
def test_without_cuda_kernels_an_explicit_ext_request_on_cuda_says_why():
    assert not _ext.cuda_kernels_built()
    with pytest.raises(dispatch.BackendUnavailableError, match="has no cuda kernel for 'dequantize_4bit'"):
        dispatch.resolve("dequantize_4bit", "cuda", "ext")
    assert "ext" not in dispatch.usable_backends("lora_forward", "cuda")
    info = env.collect()
    assert info["extension_cuda_kernels"] is False
    assert "CUDA kernels: not built (LOWRANK_BUILD_CUDA=1 builds them)" in env.format_report(info)


def test_disabled_extension_has_no_cuda_kernels(monkeypatch):
    monkeypatch.setenv("LOWRANK_DISABLE_EXT", "1")
    assert not _ext.cuda_kernels_built()
    assert env.collect()["extension_cuda_kernels"] is False


def test_setup_builds_cuda_only_with_a_cuda_torch_and_nvcc(monkeypatch):
    setup = load_setup()
    monkeypatch.chdir(ROOT)  # setup.py runs from the repository root
    assert setup.cuda_sources() == ["csrc/cuda/lora_cuda.cu", "csrc/cuda/nf4_cuda.cu"]
    if torch.version.cuda is None:
        assert setup.cuda_build_blocker(cpp_extension) == f"torch {torch.__version__} is not a CUDA build"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert "nvcc was not found" in setup.cuda_build_blocker(cpp_extension)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    assert setup.cuda_build_blocker(cpp_extension) is None


def test_setup_arch_flags_honour_torch_cuda_arch_list(monkeypatch):
    setup = load_setup()
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    flags = setup.nvcc_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    flags = setup.nvcc_flags()
    assert not any("arch" in flag for flag in flags)  # torch turns TORCH_CUDA_ARCH_LIST into -gencode itself
    assert "-O3" in flags
