"""``python -m lowrank.env``: versions, devices, the C++ extension and which backend runs each op.

Paste its output into bug reports. :func:`collect` returns the same facts as a dict (JSON-friendly);
:func:`format_report` renders them; ``--json`` prints the dict.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys

import torch

import lowrank
from lowrank.ops import dispatch

_LIBRARIES = ("torch", "triton", "transformers", "safetensors")


def _version(module_name: str) -> str:
    try:
        return getattr(importlib.import_module(module_name), "__version__", "unknown version")
    except ImportError:
        return "not installed"
    except Exception as err:  # noqa: BLE001 - a broken install must not stop the report
        return f"fails to import: {type(err).__name__}: {err}"


def _cuda_devices() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    return devices


def _backends_on(device: str) -> dict[str, dict]:
    table = {}
    for op in dispatch.registered_ops():
        try:  # what `auto` picks; LOWRANK_BACKEND (shown in the environment line) may override it
            auto = dispatch.resolve(op, device, "auto")
        except Exception as err:  # noqa: BLE001 - report the failure instead of stopping the report
            auto = f"error: {err}"
        table[op] = {"usable": dispatch.usable_backends(op, device), "auto": auto}
    return table


def collect() -> dict:
    """Every fact the report prints, as plain data."""
    ext = dispatch.ext_module()
    devices = _cuda_devices()
    info = {
        "lowrank": lowrank.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in _LIBRARIES},
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "cuda_devices": devices,
        "extension_loaded": ext is not None,
        "extension_reason": None if ext is not None else dispatch.ext_unavailable_reason(),
        "extension_cuda_kernels": ext is not None and ext.supports("dequantize_4bit", "cuda"),
        "environment": {
            name: os.environ.get(name) for name in ("LOWRANK_BACKEND", "LOWRANK_DISABLE_EXT", "TRITON_INTERPRET")
        },
        "backends": {"cpu": _backends_on("cpu")},
    }
    if devices:
        info["backends"]["cuda"] = _backends_on("cuda")
    return info


def format_report(info: dict) -> str:
    lines = [f"lowrank {info['lowrank']}", f"python {info['python']} ({info['platform']})"]
    lines += [f"{name} {version}" for name, version in info["versions"].items()]
    if info["cuda_devices"]:
        lines.append(f"CUDA {info['cuda_version']}: {len(info['cuda_devices'])} device(s)")
        for d in info["cuda_devices"]:
            lines.append(f"  cuda:{d['index']} {d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)")
    else:
        lines.append("CUDA: no device available")
    if info["extension_loaded"]:
        cuda = "built" if info["extension_cuda_kernels"] else "not built (LOWRANK_BUILD_CUDA=1 builds them)"
        lines.append(f"C++ extension: loaded; CUDA kernels: {cuda}")
    else:
        lines.append(f"C++ extension: not loaded ({info['extension_reason']})")
    env = ", ".join(f"{k}={v}" for k, v in info["environment"].items() if v is not None) or "none set"
    lines.append(f"environment: {env}")
    for device, table in info["backends"].items():
        lines.append(f"backends on {device} (op: usable -> auto):")
        width = max(map(len, table), default=0)
        for op, row in table.items():
            lines.append(f"  {op:<{width}}  {', '.join(row['usable']) or 'none'} -> {row['auto']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank.env", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
