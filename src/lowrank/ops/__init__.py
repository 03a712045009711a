"""Autograd Functions, torch.library ops and the single backend dispatch point."""

from lowrank.ops import nf4  # noqa: F401  (registers the 4-bit ops)
from lowrank.ops.dispatch import BackendUnavailableError, resolve, usable_backends
from lowrank.ops.lora import dropout_mask, linear_nf4, lora_linear, lora_linear_nf4
from lowrank.ops.lora_multi import lora_linear_multi, lora_linear_multi_adapter

__all__ = [
    "BackendUnavailableError",
    "dropout_mask",
    "linear_nf4",
    "lora_linear",
    "lora_linear_multi",
    "lora_linear_multi_adapter",
    "lora_linear_nf4",
    "resolve",
    "usable_backends",
]
