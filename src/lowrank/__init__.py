"""lowrank: a custom-kernel engine for QLoRA-style fine-tuning (bit-exact NF4, fused low-rank matmuls)."""

from lowrank import nf4
from lowrank.nf4 import NF4Weight, dequantize, quantize

__version__ = "0.1.0"
__all__ = ["NF4Weight", "dequantize", "nf4", "quantize", "__version__"]

# Model surgery, freezing, files and the paged optimizer (issue 4).
# Modules, functional ops and the training loop (issues 3 and 5).
from lowrank import freeze, nn, ops, optim  # noqa: E402  # noqa: E402
from lowrank.adapters import (  # noqa: E402
    load_adapter,
    load_quantized,
    merge_adapters,
    save_adapter,
    save_quantized,
)
from lowrank.models import prepare_model, summary  # noqa: E402
from lowrank.nn import LinearNF4, LoRALinear  # noqa: E402
from lowrank.ops import lora_linear, lora_linear_nf4  # noqa: E402
from lowrank.train import TrainConfig, TrainResult, train  # noqa: E402

__all__ += [
    "freeze",
    "load_adapter",
    "load_quantized",
    "merge_adapters",
    "optim",
    "prepare_model",
    "save_adapter",
    "save_quantized",
    "summary",
    "nn",
    "ops",
    "LinearNF4",
    "LoRALinear",
    "lora_linear",
    "lora_linear_nf4",
    "TrainConfig",
    "TrainResult",
    "train",
]

# Streamed loading of big checkpoints straight into 4 bits (issue 11).
from lowrank.loading import from_pretrained  # noqa: E402

__all__ += ["from_pretrained"]
