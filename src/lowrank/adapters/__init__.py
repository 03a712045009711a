"""Adapter and checkpoint files, and merging, split by format.

* :mod:`~lowrank.adapters.peft_format`: :func:`save_adapter` / :func:`load_adapter` -- PEFT's
  ``adapter_config.json`` + ``adapter_model.safetensors``.
* :mod:`~lowrank.adapters.merge`: :func:`merge_adapters` -- a plain transformers model with ``W + scale·B·A``.
* :mod:`~lowrank.adapters.quantized`: :func:`save_quantized` / :func:`load_quantized` -- transformers'
  pre-quantized bitsandbytes layout, without bitsandbytes.
* :mod:`~lowrank.adapters.errors`: the error classes and checked readers.

Every file is written through :mod:`lowrank.files` (temporary name + rename: an interrupted save never
leaves a half-written file); only safetensors and JSON are read or written.
"""

from lowrank.adapters.errors import (
    AdapterConfigError,
    AdapterError,
    AdapterFileError,
    AdapterShapeError,
    QuantizedCheckpointError,
    read_safetensors,
)
from lowrank.adapters.merge import merge_adapters
from lowrank.adapters.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    adapter_config_dict,
    adapter_state_dict,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from lowrank.adapters.quantized import MODEL_CONFIG, MODEL_WEIGHTS, load_quantized, save_quantized

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "MODEL_CONFIG",
    "MODEL_WEIGHTS",
    "PEFT_PREFIX",
    "AdapterConfigError",
    "AdapterError",
    "AdapterFileError",
    "AdapterShapeError",
    "QuantizedCheckpointError",
    "adapter_config_dict",
    "adapter_state_dict",
    "load_adapter",
    "load_quantized",
    "merge_adapters",
    "read_adapter_config",
    "read_safetensors",
    "save_adapter",
    "save_quantized",
]
