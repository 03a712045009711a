"""The loss and the precision of one forward pass, shared by the training loop and evaluation.

``loss_sum`` returns the *sum* of the per-target losses (label tokens for generation, examples for
classification); callers divide by the number of targets they summed over, so gradient accumulation over
micro-batches equals one big batch. ``autocast_for`` maps a precision name to the autocast context the
forward runs under.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: ``auto``: bf16 autocast on CUDA, fp32 on CPU; ``bf16``: bf16 autocast everywhere; ``fp32``: no autocast
from lowrank.config import PRECISIONS
from lowrank.data import IGNORE_INDEX


def loss_sum(model, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-target losses, logits): cross-entropy over classes, or over next tokens."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits if hasattr(out, "logits") else out
    labels = batch["labels"]
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="sum"), logits
    shifted = logits[:, :-1].float()
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    ), logits


def autocast_for(precision: str, device: torch.device):
    """The autocast context for ``precision`` (one of :data:`PRECISIONS`) on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
