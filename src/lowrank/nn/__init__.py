"""Modules: quantized and LoRA linear layers."""

from lowrank.nn.linear_nf4 import LinearNF4
from lowrank.nn.lora import LoRAEmbedding, LoRAFusedProjections, LoRALinear

__all__ = ["LinearNF4", "LoRAEmbedding", "LoRAFusedProjections", "LoRALinear"]
