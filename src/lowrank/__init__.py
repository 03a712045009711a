"""lowrank: a custom-kernel engine for QLoRA-style fine-tuning (bit-exact NF4, fused low-rank matmuls).

The names below are loaded on first use, so ``import lowrank.nf4`` or ``import lowrank.kernels.nf4`` does
not import the training loop, transformers or the plotting code. To export a name, add it to ``_EXPORTS``
(name -> the module that defines it) or, for a whole submodule, to ``_SUBMODULES``; then to ``__all__``
and to the ``TYPE_CHECKING`` block (for type checkers).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: submodules exported as attributes of the package
_SUBMODULES = ("freeze", "nf4", "nn", "ops", "optim")

#: exported name -> the module that defines it
_EXPORTS = {
    "mixed_batch": "lowrank.models",
    # NF4 weights
    "NF4Weight": "lowrank.nf4",
    "quantize": "lowrank.nf4",
    "dequantize": "lowrank.nf4",
    # functional ops and modules
    "lora_linear": "lowrank.ops",
    "lora_linear_nf4": "lowrank.ops",
    "LinearNF4": "lowrank.nn",
    "LoRALinear": "lowrank.nn",
    # models, files, freezing, optimizer
    "prepare_model": "lowrank.models",
    "LoRAOptionError": "lowrank.models",
    "add_adapter": "lowrank.models",
    "delete_adapter": "lowrank.models",
    "disable_adapters": "lowrank.models",
    "set_adapter": "lowrank.models",
    "summary": "lowrank.models",
    "load_adapter": "lowrank.adapters",
    "load_quantized": "lowrank.adapters",
    "merge_adapters": "lowrank.adapters",
    "save_adapter": "lowrank.adapters",
    "save_quantized": "lowrank.adapters",
    # streamed loading of big checkpoints straight into 4 bits
    "from_pretrained": "lowrank.loading",
    # the training loop
    "TrainConfig": "lowrank.train",
    "TrainResult": "lowrank.train",
    "train": "lowrank.train",
    # moving a PEFT model onto lowrank and back
    "from_peft": "lowrank.peft_bridge",
    "to_peft": "lowrank.peft_bridge",
}

__all__ = [  # the public names: _SUBMODULES and _EXPORTS (tests/lowrank/test_package.py keeps them in step)
    "__version__",
    "mixed_batch",
    "freeze",
    "nf4",
    "nn",
    "ops",
    "optim",
    "NF4Weight",
    "quantize",
    "dequantize",
    "lora_linear",
    "lora_linear_nf4",
    "LinearNF4",
    "LoRALinear",
    "prepare_model",
    "LoRAOptionError",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "set_adapter",
    "summary",
    "load_adapter",
    "load_quantized",
    "merge_adapters",
    "save_adapter",
    "save_quantized",
    "from_pretrained",
    "TrainConfig",
    "TrainResult",
    "train",
    "from_peft",
    "to_peft",
]

if TYPE_CHECKING:
    from lowrank import freeze, nf4, nn, ops, optim
    from lowrank.adapters import load_adapter, load_quantized, merge_adapters, save_adapter, save_quantized
    from lowrank.loading import from_pretrained
    from lowrank.models import (
        LoRAOptionError,
        add_adapter,
        delete_adapter,
        disable_adapters,
        mixed_batch,
        prepare_model,
        set_adapter,
        summary,
    )
    from lowrank.nf4 import NF4Weight, dequantize, quantize
    from lowrank.nn import LinearNF4, LoRALinear
    from lowrank.ops import lora_linear, lora_linear_nf4
    from lowrank.peft_bridge import from_peft, to_peft
    from lowrank.train import TrainConfig, TrainResult, train


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # the import binds it as an attribute
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, *_EXPORTS})


class _Package(types.ModuleType):
    """Importing a submodule binds it as an attribute of the package: ``lowrank.train`` (the loop's module)
    would then hide ``lowrank.train`` (the function). An exported name wins over a submodule of that name."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == _EXPORTS.get(name) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
