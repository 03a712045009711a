"""The one map between torch floating dtypes and their names in files, configs and the CLI."""

from __future__ import annotations

import torch

#: Canonical names (as written in config.json, quant states and reports).
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
#: Names accepted when reading (canonical names plus the short forms users type).
DTYPES_BY_NAME: dict[str, torch.dtype] = {
    **{name: dtype for dtype, name in DTYPE_NAMES.items()},
    "fp32": torch.float32,
    "fp16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "float": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a floating dtype; ValueError for any other dtype."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not one of {sorted(DTYPE_NAMES.values())}") from None


def parse_dtype(name: str | torch.dtype, *, what: str = "dtype") -> torch.dtype:
    """A dtype from its name (``"bfloat16"``, ``"bf16"``, ``"torch.bfloat16"``) or a dtype itself."""
    if isinstance(name, torch.dtype):
        dtype_name(name)
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES_BY_NAME:
        raise ValueError(f"{what} {name!r} is not one of {sorted(DTYPES_BY_NAME)}")
    return DTYPES_BY_NAME[key]
