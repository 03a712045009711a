"""``LinearNF4``: a frozen linear layer whose weight is stored in 4 bits (bitsandbytes' NF4/FP4 layout).

The packed codes and constants are plain buffers (uint8 codes, uint8 or fp32 absmax, fp32 nested
constants), so ``.to()``, DDP buffer broadcast and FSDP2 see ordinary tensors. ``state_dict()`` uses
exactly the keys of bitsandbytes' ``Linear4bit`` (``weight``, ``bias``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``), and ``load_state_dict`` reads them.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank import nf4
from lowrank.ops import lora as lora_ops

# Buffers that must stay fp32 whatever dtype the module is cast to (their values define the bytes' meaning).
_FP32_CONSTANTS = ("weight_nested_absmax", "weight_nested_offset")


class LinearNF4(nn.Module):
    """``y = x·dequant(W)ᵀ + bias`` with W frozen in 4 bits; x (..., in) -> y (..., out) in x's dtype.

    ``compute_dtype`` (None = the input's dtype) is the dtype of the matmul, like bitsandbytes'
    ``bnb_4bit_compute_dtype``. The backward re-dequantizes W (no dense copy is kept) and never produces
    a gradient for it; ``bias`` is a Parameter, frozen by default. ``backend`` (attribute, default None =
    auto) picks the dequantize backend.
    """

    def __init__(
        self,
        weight: nf4.NF4Weight,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        *,
        backend: str | None = None,
    ):
        super().__init__()
        if not isinstance(weight, nf4.NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"compute_dtype must be None or float32/float16/bfloat16, got {compute_dtype}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.compute_dtype = compute_dtype
        self.backend = backend
        self._set_weight(weight)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype | None = None,
        backend: str | None = None,
    ) -> LinearNF4:
        """Quantize ``linear.weight`` (bit-exact with bitsandbytes) and keep its bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = nf4.quantize(linear.weight.detach(), blocksize, double_quant, quant_type, backend=backend)
        return cls(weight, None if linear.bias is None else linear.bias.detach(), compute_dtype, backend=backend)

    @classmethod
    def from_bnb_state_dict(
        cls,
        sd: dict[str, torch.Tensor],
        prefix: str = "",
        compute_dtype: torch.dtype | None = None,
        backend: str | None = None,
    ) -> LinearNF4:
        """Build from the tensors a bitsandbytes ``Linear4bit`` (or :meth:`state_dict`) wrote under ``prefix``."""
        weight = nf4.NF4Weight.from_bnb_state_dict(sd, prefix=f"{prefix}weight")
        return cls(weight, sd.get(f"{prefix}bias"), compute_dtype, backend=backend)

    def _set_weight(self, weight: nf4.NF4Weight) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {tuple(weight.shape)} does not match ({self.out_features}, {self.in_features})"
            )
        self.register_buffer("weight", weight.packed)
        self.register_buffer("weight_absmax", weight.absmax)
        self.register_buffer("weight_nested_absmax", weight.nested_absmax)
        self.register_buffer("weight_nested_offset", weight.nested_offset)
        self.weight_dtype = weight.dtype
        self.blocksize = weight.blocksize
        self.quant_type = weight.quant_type
        self.nested_dtype = weight.nested_dtype

    def set_weight(self, weight: nf4.NF4Weight) -> None:
        """Replace the quantized weight (same shape), e.g. after a merge; moves it to this module's device."""
        if not isinstance(weight, nf4.NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        self._set_weight(weight.to(self.weight.device))

    # -- views ----------------------------------------------------------------------------------------

    @property
    def weight_nf4(self) -> nf4.NF4Weight:
        """The quantized weight as an :class:`~lowrank.nf4.NF4Weight` (sharing this module's buffers)."""
        return nf4.NF4Weight(
            self.weight,
            self.weight_absmax,
            (self.out_features, self.in_features),
            self.weight_dtype,
            self.blocksize,
            self.quant_type,
            self.weight_nested_absmax,
            self.weight_nested_offset,
            self.nested_dtype,
        )

    @property
    def packed_weight(self) -> lora_ops.PackedWeight:
        """The same view without re-validating the buffers (cheap; what forward passes to the ops)."""
        return lora_ops.PackedWeight(
            self.weight,
            self.weight_absmax,
            self.weight_nested_absmax,
            self.weight_nested_offset,
            (self.out_features, self.in_features),
            self.blocksize,
            self.quant_type,
            self.weight_dtype,
            self.nested_dtype,
        )

    @property
    def double_quant(self) -> bool:
        return self.weight_nested_absmax is not None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in ``dtype`` (default: the dtype it was quantized from)."""
        return nf4.dequantize(self.weight_nf4, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_c = x if self.compute_dtype is None else x.to(self.compute_dtype)
        return lora_ops.linear_nf4(x_c, self.packed_weight, self.bias, self.backend).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # -- dtype casts must not touch the quantization constants -------------------------------------------

    def _apply(self, fn, recurse=True):
        # `module.to(torch.bfloat16)` casts every float buffer; absmax/nested constants define what the
        # packed bytes mean, so they keep fp32 and only follow the device of the packed codes.
        keep = {name: getattr(self, name) for name in (*_FP32_CONSTANTS, "weight_absmax")}
        super()._apply(fn, recurse)
        for name, original in keep.items():
            current = getattr(self, name)
            if original is not None and current is not None and current.dtype != original.dtype:
                setattr(self, name, original.to(current.device))
        return self

    # -- bitsandbytes-compatible state dict -----------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        sd = self.weight_nf4.to_bnb_state_dict(f"{prefix}weight")
        destination[f"{prefix}weight"] = sd.pop(f"{prefix}weight")
        if self.bias is not None:
            destination[f"{prefix}bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(sd)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = [k for k in state_dict if k.startswith(prefix)]  # this module has no children
        if f"{prefix}weight" not in state_dict:
            missing_keys.append(f"{prefix}weight")
        else:
            try:
                weight = nf4.NF4Weight.from_bnb_state_dict(state_dict, prefix=f"{prefix}weight")
                self.set_weight(weight)
            except ValueError as err:  # QuantStateError and shape mismatches
                error_msgs.append(f"{prefix}weight: {err}")
        bias_key = f"{prefix}bias"
        if self.bias is not None:
            if bias_key not in state_dict:
                missing_keys.append(bias_key)
            elif state_dict[bias_key].shape != self.bias.shape:
                error_msgs.append(
                    f"{bias_key}: shape {tuple(state_dict[bias_key].shape)} != expected {tuple(self.bias.shape)}"
                )
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bias_key])
        known = {f"{prefix}weight", bias_key if self.bias is not None else None}
        known.update(k for k in ours if k.startswith(f"{prefix}weight.") and _is_bnb_weight_key(k[len(prefix) :]))
        unexpected_keys.extend(k for k in ours if k not in known)


def _is_bnb_weight_key(name: str) -> bool:
    return name in (
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
    ) or name.startswith("weight.quant_state.bitsandbytes__")
