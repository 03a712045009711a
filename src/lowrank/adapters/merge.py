"""Merging: a plain transformers model (nn.Linear / Conv1D) holding ``W + scale·B·A``.

The sum is computed in fp32 from ``dequant(W4)`` for 4-bit bases (never re-quantized).
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank import models as _models
from lowrank.adapters.errors import AdapterError
from lowrank.nn import LinearNF4, LoRAEmbedding, LoRALinear


def _dense_module(weight_out_in: torch.Tensor, bias: torch.Tensor | None, as_conv1d: bool) -> nn.Module:
    out_features, in_features = weight_out_in.shape
    if as_conv1d:
        module = _models.Conv1D(out_features, in_features)
        module.weight = nn.Parameter(weight_out_in.t().contiguous())
    else:
        module = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        module.weight = nn.Parameter(weight_out_in.contiguous())
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().clone().to(weight_out_in.dtype))
    elif as_conv1d:
        raise AdapterError("Conv1D layers always have a bias")
    return module


@torch.no_grad()
def merge_adapters(model: nn.Module, dtype: torch.dtype | None = None, *, safe_merge: bool = False) -> nn.Module:
    """Replace every LoRALinear / LinearNF4 by a dense layer holding ``dequant(W) + Σ scale·B·A``.

    The sum (over each layer's active adapters) is computed in fp32 and stored in ``dtype`` (default: the
    base weight's original dtype, e.g. bf16 for a bf16 model); 4-bit weights are never re-quantized.
    GPT-2 layers become Conv1D again. Returns the plain transformers model (``save_pretrained`` then
    writes a dense checkpoint).

    ``safe_merge=True`` (PEFT's option) first computes every merged weight and raises ValueError naming
    the first module whose merged weight has a NaN or inf, before anything is changed.
    """
    if safe_merge:
        for name, module in model.named_modules():
            if isinstance(module, (LoRALinear, LoRAEmbedding)):
                merged = module.merged_dense(torch.float32)
                if not torch.isfinite(merged).all():
                    bad = int((~torch.isfinite(merged)).sum())
                    raise ValueError(
                        f"safe_merge: merging the adapter(s) {module.active_adapters} into {name} gives {bad} "
                        "non-finite values (NaN/inf); the model was left unchanged"
                    )
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            base = module.base_layer
            out_dtype = dtype or (base.weight_dtype if isinstance(base, LinearNF4) else base.weight.dtype)
            weight = module.merged_dense(out_dtype)
            bias = base.bias
        elif isinstance(module, LoRAEmbedding):
            base = module.base_layer
            with torch.no_grad():
                base.weight.copy_(module.merged_dense(base.weight.dtype))
            _models._set_module(model, name, base)
            continue
        elif isinstance(module, LinearNF4) and not name.endswith(".base_layer"):
            out_dtype = dtype or module.weight_dtype
            weight = module.dequantize(out_dtype)
            bias = module.bias
        else:
            continue
        dense = _dense_module(weight, bias, getattr(module, "_lowrank_from_conv1d", False))
        _models._set_module(model, name, dense)
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    for attr in (
        "lowrank_config",
        "lowrank_bytes_before",
        "lowrank_summary",
        "lowrank_adapters",
        "lowrank_active_adapters",
    ):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
