"""The single backend dispatch point: which implementation (``torch`` | ``triton`` | ``ext``) runs an op.

Rules (nothing else in lowrank checks devices, versions or the environment that chooses a kernel, and
nothing else picks a kernel path: :func:`choose_forward_path` / :func:`choose_backward_path` below):

* An op family registers one implementation per backend with :func:`register`.
* The request comes from the ``backend=`` argument, else the ``LOWRANK_BACKEND`` environment variable,
  else ``"auto"``.
* ``auto`` picks, per call, from the tensor's device and what is usable: on CUDA ``triton`` then ``ext``
  then ``torch``; on CPU ``ext`` then ``torch`` (Triton runs on CPU only in its slow interpreter, so it is
  never chosen automatically there). It falls back quietly.
* An explicit request that cannot be honoured raises :class:`BackendUnavailableError`, naming why.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

# Imported here (it loads the extension once) so that a torch.compile trace never runs that import.
from lowrank import _ext

BACKENDS = ("torch", "triton", "ext")
_AUTO_ORDER = {"cuda": ("triton", "ext", "torch"), "cpu": ("ext", "torch")}

# op name -> backend -> implementation
_REGISTRY: dict[str, dict[str, Callable]] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op on this device."""


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def decorate(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return decorate


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter() -> bool:
    """True when Triton runs kernels on CPU tensors in its interpreter: the one place lowrank asks."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: Environment variable forcing the Triton LoRA backward path: "fused", "dequant" or "auto" (unset = auto).
LORA_BACKWARD_PATH_ENV = "LOWRANK_LORA_BACKWARD_PATH"


def forced_path(variable: str, paths: tuple[str, ...]) -> str | None:
    """The path an environment variable forces (None for unset or ``auto``); ValueError for anything else."""
    forced = os.environ.get(variable, "auto")
    if forced == "auto":
        return None
    if forced not in paths:
        raise ValueError(f"{variable} must be one of {paths} or 'auto', got {forced!r}")
    return forced


# ---------------------------------------------------------------------------------------------------
# Path policy of the Triton LoRA launchers (lowrank.kernels.lora_matmul takes the path as an argument).
# ---------------------------------------------------------------------------------------------------

#: Largest M served by the weight-streaming forward kernel (``fused_small_m``; 4-bit GEMM is memory-bound
#: below M ~ 68 on H100). To be measured on GPU. The fused dX's small-M tile bound
#: (``lowrank.kernels.lora_matmul.FUSED_DX_SMALL_M_MAX``) is equal to it.
SMALL_M_MAX = 64
#: Largest M served by the tile-decoding fused GEMM (``fused_tiled``); above it, dequant + cuBLAS. To be
#: measured on GPU (a guess from the roofline: up to two 128-row tiles re-decode each weight tile at most
#: twice).
TILED_M_MAX = 256
#: Largest M whose dX runs the fused kernel; above it, dequantize + cuBLAS. A guess: on one H100 (bf16,
#: 4096 x 4096, r = 16, forward + backward of one layer) the fused backward won at M = 16 (1.99 ms vs 3.31
#: for pure torch) and was 3x slower than dequantize + matmul at M = 8192 (13.5 vs 4.40 ms). The crossover
#: is not measured; bench/gpu/run.sh records the backward path of each case so that it can be.
FUSED_BACKWARD_M_MAX = 256


def choose_forward_path(M: int, N: int, K: int, device: torch.device | str) -> str:
    """The forward path (one of ``lora_matmul.FORWARD_PATHS``) for an (M, K) x (N, K)ᵀ product: the ONE
    place this choice is made.

    ``fused_small_m`` for M <= SMALL_M_MAX (memory-bound: stream and decode the 4-bit weight once),
    ``fused_tiled`` up to TILED_M_MAX, ``dequant_matmul`` above (cuBLAS wins once the GEMM is
    compute-bound). The thresholds are to be measured on GPU; N, K and device are accepted so that a
    measured table can use them.
    """
    if M <= SMALL_M_MAX:
        return "fused_small_m"
    if M <= TILED_M_MAX:
        return "fused_tiled"
    return "dequant_matmul"


def choose_backward_path(M: int, N: int, K: int, r: int, device: torch.device | str) -> str:
    """The backward path (one of ``lora_matmul.BACKWARD_PATHS``) by shape: the ONE place this choice is made.

    ``fused`` for M <= FUSED_BACKWARD_M_MAX (dX decodes W tile by tile), ``dequant`` above (W dequantized
    once, dX on cuBLAS). ``LOWRANK_LORA_BACKWARD_PATH`` (:data:`LORA_BACKWARD_PATH_ENV`, read by the ops
    layer through :func:`forced_path`) overrides it. N, K, r and device are accepted so that a measured
    table can use them.
    """
    return "fused" if M <= FUSED_BACKWARD_M_MAX else "dequant"


def ext_module():
    """The loaded C++/CUDA extension module, or None (see ``lowrank._ext``)."""
    return _ext.load()


def ext_unavailable_reason() -> str:
    """Why the extension is not loaded, in words (for error messages and ``python -m lowrank.env``)."""
    return _ext.load_error() or "the C++ extension is not built or was disabled (LOWRANK_DISABLE_EXT=1)"


def why_unusable(backend: str, op: str, device: torch.device) -> str | None:
    """None when ``backend`` can run ``op`` on ``device``; otherwise the reason, for error messages."""
    if backend not in _REGISTRY.get(op, {}):
        return f"op {op!r} has no {backend!r} implementation (available: {sorted(_REGISTRY.get(op, {}))})"
    if backend == "torch":
        return None
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreter():
            return None
        return f"triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors); got a {device.type} tensor"
    if backend == "ext":
        ext = ext_module()
        if ext is None:
            return f"the C++ extension is unavailable: {ext_unavailable_reason()}; see `python -m lowrank.env`"
        if not ext.supports(op, device.type):
            return f"the C++ extension has no {device.type} kernel for {op!r}"
        return None
    raise AssertionError(backend)


def requested_backend(backend: str | None) -> str:
    choice = backend if backend is not None else os.environ.get("LOWRANK_BACKEND", "auto")
    if choice != "auto" and choice not in BACKENDS:
        source = "backend=" if backend is not None else "LOWRANK_BACKEND="
        raise ValueError(f"{source}{choice!r} is not a backend; expected 'auto' or one of {BACKENDS}")
    return choice


def resolve(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """Name of the backend that will run ``op`` for tensors on ``device``."""
    device = torch.device(device)
    choice = requested_backend(backend)
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered: {sorted(_REGISTRY)}")
    if choice != "auto":
        reason = why_unusable(choice, op, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend {choice!r} was requested for {op} on {device}, but {reason}")
        return choice
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        if why_unusable(candidate, op, device) is None:
            return candidate
    raise BackendUnavailableError(f"no backend can run {op} on {device}")


def implementation(op: str, backend: str) -> Callable:
    return _REGISTRY[op][backend]


def usable_backends(op: str, device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if b in _REGISTRY.get(op, {}) and why_unusable(b, op, device) is None]


def registered_ops() -> dict[str, tuple[str, ...]]:
    return {op: tuple(b for b in BACKENDS if b in impls) for op, impls in sorted(_REGISTRY.items())}
