"""The single dispatch point: ``auto`` falls back quietly, an explicit unusable backend raises
BackendUnavailableError with the reason, LOWRANK_BACKEND is honoured, bad names are rejected."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank
from lowrank.ops import dispatch
from lowrank.ops.dispatch import BackendUnavailableError, register, resolve

OP = "test_dispatch_probe"


@pytest.fixture
def probe_op():
    """A throwaway op with torch and triton implementations, removed afterwards."""
    register(OP, "torch")(lambda x: ("torch", x))
    register(OP, "triton")(lambda x: ("triton", x))
    yield OP
    dispatch._REGISTRY.pop(OP, None)


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(dispatch._ext, "load", lambda: None)
    monkeypatch.setattr(dispatch._ext, "load_error", lambda: "lowrank._C is not built (test)")


def test_auto_prefers_the_extension_on_cpu_when_it_is_loaded():
    if dispatch.ext_module() is None:
        pytest.skip("the C++ extension is not built here")
    assert resolve("quantize_4bit", "cpu") == "ext"


def test_auto_falls_back_quietly_to_torch_on_cpu(no_extension, monkeypatch):
    monkeypatch.delenv("LOWRANK_BACKEND", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve("quantize_4bit", "cpu") == "torch"
        assert resolve("quantize_4bit", "cpu", "auto") == "torch"
        qw = lowrank.quantize(torch.randn(64))  # and the public API runs
    assert qw.packed.numel() == 32


def test_auto_never_picks_the_triton_interpreter_on_cpu(probe_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve(probe_op, "cpu") == "torch"
    assert resolve(probe_op, "cpu", "triton") == "triton"  # but an explicit request may use it


def test_auto_prefers_triton_on_cuda(probe_op, monkeypatch):
    monkeypatch.setattr(dispatch, "triton_importable", lambda: True)
    assert resolve(probe_op, "cuda") == "triton"
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    assert resolve(probe_op, "cuda") == "torch"  # quietly, without triton


def test_explicit_unusable_backend_raises_with_the_reason(probe_op, no_extension, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        BackendUnavailableError, match="backend 'triton' was requested for .* on cpu, but triton needs a CUDA"
    ):
        resolve(probe_op, "cpu", "triton")
    with pytest.raises(BackendUnavailableError, match="'ext' .* has no 'ext' implementation"):
        resolve(probe_op, "cpu", "ext")
    with pytest.raises(
        BackendUnavailableError, match="the C\\+\\+ extension is unavailable: lowrank._C is not built \\(test\\)"
    ):
        resolve("quantize_4bit", "cpu", "ext")
    with pytest.raises(BackendUnavailableError, match="backend 'ext' was requested"):
        lowrank.quantize(torch.randn(64), backend="ext")
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        resolve(probe_op, "cuda", "triton")
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_disabled_extension_names_the_variable(monkeypatch):
    monkeypatch.setenv("LOWRANK_DISABLE_EXT", "1")
    with pytest.raises(BackendUnavailableError, match="LOWRANK_DISABLE_EXT=1"):
        resolve("dequantize_4bit", "cpu", "ext")
    assert resolve("dequantize_4bit", "cpu") == "torch"


def test_lowrank_backend_environment_variable_is_honoured(probe_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    assert resolve(probe_op, "cpu") == "triton"
    assert resolve(probe_op, "cpu", "torch") == "torch"  # the argument wins over the variable
    monkeypatch.setenv("LOWRANK_BACKEND", "torch")
    assert resolve(probe_op, "cpu") == "torch"
    monkeypatch.setenv("LOWRANK_BACKEND", "auto")
    assert resolve(probe_op, "cpu") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="backend 'triton' was requested"):
        resolve(probe_op, "cpu")


def test_bad_backend_names_are_rejected(probe_op, monkeypatch):
    with pytest.raises(ValueError, match="backend='cuda' is not a backend; expected 'auto' or one of"):
        resolve(probe_op, "cpu", "cuda")
    monkeypatch.setenv("LOWRANK_BACKEND", "Torch")
    with pytest.raises(ValueError, match="LOWRANK_BACKEND='Torch' is not a backend"):
        resolve(probe_op, "cpu")
    with pytest.raises(ValueError, match="backend must be one of .* got 'numpy'"):
        register(probe_op, "numpy")
    with pytest.raises(KeyError, match="unknown op 'no_such_op'"):
        resolve("no_such_op", "cpu", "torch")


def test_usable_backends_and_registry(probe_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.usable_backends(probe_op, "cpu") == ["torch", "triton"]
    assert dispatch.registered_ops()[probe_op] == ("torch", "triton")
    assert dispatch.implementation(probe_op, "triton")(1) == ("triton", 1)
    for op in ("quantize_4bit", "dequantize_4bit", "double_quantize", "double_dequantize"):
        assert {"torch", "triton", "ext"} <= set(dispatch.registered_ops()[op])


# -- the path policy of the Triton LoRA launchers (they take the path; the dispatch point chooses) ----


def test_choose_backward_path_threshold():
    assert dispatch.choose_backward_path(1, 4096, 4096, 16, "cuda") == "fused"
    assert dispatch.choose_backward_path(dispatch.FUSED_BACKWARD_M_MAX, 4096, 4096, 16, "cuda") == "fused"
    assert dispatch.choose_backward_path(dispatch.FUSED_BACKWARD_M_MAX + 1, 4096, 4096, 16, "cuda") == "dequant"
    assert dispatch.choose_backward_path(8192, 4096, 4096, 16, "cuda") == "dequant"


def test_choose_forward_path_is_monotone_in_M():
    ms = (1, dispatch.SMALL_M_MAX, dispatch.SMALL_M_MAX + 1, 10**6)
    paths = [dispatch.choose_forward_path(m, 4096, 4096, "cuda") for m in ms]
    assert paths[0] == paths[1] == "fused_small_m"
    assert paths[2] in ("fused_tiled", "dequant_matmul") and paths[3] == "dequant_matmul"


def test_chosen_paths_are_launcher_paths():
    # The dispatch point names paths the launchers know; the fused dX's small-M tile bound in the kernel
    # module is the forward's fused_small_m bound here (they move together until measured apart).
    from lowrank.kernels import lora_matmul

    for m in (0, 1, dispatch.SMALL_M_MAX, dispatch.TILED_M_MAX, dispatch.TILED_M_MAX + 1, 10**6):
        assert dispatch.choose_forward_path(m, 64, 64, "cuda") in lora_matmul.FORWARD_PATHS
        assert dispatch.choose_backward_path(m, 64, 64, 8, "cuda") in lora_matmul.BACKWARD_PATHS
    assert lora_matmul.FUSED_DX_SMALL_M_MAX == dispatch.SMALL_M_MAX
