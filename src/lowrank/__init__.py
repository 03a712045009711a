"""lowrank: a custom-kernel engine for QLoRA-style fine-tuning (bit-exact NF4, fused low-rank matmuls)."""

from lowrank import nf4
from lowrank.nf4 import NF4Weight, dequantize, quantize

__version__ = "0.1.0"
__all__ = ["NF4Weight", "dequantize", "nf4", "quantize", "__version__"]
