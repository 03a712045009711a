"""LoRA modules: ``LoRALinear`` (one adapted projection) and ``LoRAFusedProjections`` (several sharing x).

``y = base(x) + scale·B·A·drop(x)`` with a frozen base (``nn.Linear`` or :class:`LinearNF4`), trainable
``lora_A`` (r, in) and ``lora_B`` (out, r), ``scale = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``) -- PEFT's
semantics, parameter shapes and initializations.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import nn

from lowrank import nf4
from lowrank.nn.linear_nf4 import LinearNF4
from lowrank.ops import lora as lora_ops
from lowrank.ops import lora_multi

INITS = ("kaiming", "gaussian", "pissa")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _base_shape(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, (nn.Linear, LinearNF4)):
        return base.out_features, base.in_features
    raise TypeError(f"base must be an nn.Linear or a LinearNF4, got {type(base).__name__}")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update; x (..., in) -> (..., out) in x's dtype.

    Args:
        base: ``nn.Linear`` (dense, frozen here) or :class:`LinearNF4` (4-bit).
        r: rank, 1 <= r <= min(in, out). alpha: scale numerator.
        dropout: probability of dropping elements of the LoRA input in training mode (PEFT semantics).
        use_rslora: ``scale = alpha / sqrt(r)`` instead of ``alpha / r``.
        init: ``"kaiming"`` (A kaiming-uniform a=sqrt(5), B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0) or
            ``"pissa"`` (A, B from the top-r SVD of the dense weight; the base keeps the residual, re-quantized
            when it is 4-bit).
        adapter_dtype: dtype of ``lora_A`` / ``lora_B`` (fp32 by default, like PEFT).
        backend: ``None`` (auto: ``LOWRANK_BACKEND`` or per device), ``"torch"``, ``"triton"`` or ``"ext"``;
            the attribute ``backend`` may be changed later.
    """

    def __init__(
        self,
        base: nn.Linear | LinearNF4,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        adapter_dtype: torch.dtype = torch.float32,
        *,
        backend: str | None = None,
    ):
        super().__init__()
        out_features, in_features = _base_shape(base)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(in_features, out_features):
            raise ValueError(
                f"r must be an int in [1, min(in, out)] = [1, {min(in_features, out_features)}], got {r!r}"
            )
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if adapter_dtype not in _FLOATS:
            raise TypeError(f"adapter_dtype must be float32/float16/bfloat16, got {adapter_dtype}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=adapter_dtype, device=device))
        self.backend = backend
        self.merged = False
        self._unmerged_nf4: nf4.NF4Weight | None = None
        self.reset_lora_parameters(init)

    # -- views ----------------------------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight tensor (packed uint8 codes for a 4-bit base), for code that inspects it."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.base_layer, LinearNF4)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable adapter parameters by attribute name (``lora_A``, ``lora_B``)."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, dropout={self.dropout}, merged={self.merged}"

    # -- initialization -------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """(Re)initialize A and B; ``"pissa"`` also rewrites the base weight to the SVD residual."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, mean=0.0, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)
        else:
            self._pissa_init()

    def _pissa_init(self) -> None:
        if self.merged:
            raise RuntimeError("cannot apply PiSSA init to a merged layer; unmerge() first")
        weight = self._base_dense(torch.float32)
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(S[: self.r] / self.scale)
        A = root[:, None] * Vh[: self.r]
        B = U[:, : self.r] * root[None, :]
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        # The base keeps what the adapter does not represent (computed from the adapter as stored).
        residual = weight - self.scale * (self.lora_B.float() @ self.lora_A.float())
        self._set_base_dense(residual)

    # -- dense views and merging ----------------------------------------------------------------------

    def _base_dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.is_quantized:
            return self.base_layer.dequantize(dtype)
        return self.base_layer.weight.detach().to(dtype)

    def _set_base_dense(self, dense_fp32: torch.Tensor) -> None:
        base = self.base_layer
        if self.is_quantized:
            old = base.weight_nf4
            new = nf4.quantize(dense_fp32, old.blocksize, old.double_quant, old.quant_type)
            base.set_weight(dataclasses.replace(new, dtype=old.dtype))
        else:
            base.weight.copy_(dense_fp32.to(base.weight.dtype))

    def delta_weight(self) -> torch.Tensor:
        """``scale·B·A`` in fp32, shape (out, in)."""
        return self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    @torch.no_grad()
    def merged_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The exact dense weight ``dequant(W) + scale·B·A`` (out, in), computed in fp32, returned in ``dtype``."""
        if self.merged and self.is_quantized:
            base = nf4.dequantize(self._unmerged_nf4, torch.float32)
        elif self.merged:
            return self.base_layer.weight.detach().to(dtype)
        else:
            base = self._base_dense(torch.float32)
        return (base + self.delta_weight()).to(dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scale·B·A`` into the base weight; forward then runs the base alone.

        A 4-bit base is re-quantized (lossy: the merged weight is rounded to NF4 again, a warning says so);
        its original bytes are kept so :meth:`unmerge` restores them exactly.
        """
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing to do", stacklevel=2)
            return
        if self.is_quantized:
            warnings.warn(
                "merging a LoRA adapter into a 4-bit base re-quantizes the merged weight; outputs change by the "
                "rounding error (use merged_dense() for the exact dense weight)",
                stacklevel=2,
            )
            self._unmerged_nf4 = self.base_layer.weight_nf4
            self._set_base_dense(self.merged_dense(torch.float32))
        else:
            weight = self.base_layer.weight
            weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: a 4-bit base gets its original bytes back; a dense one subtracts ``scale·B·A``."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing to do", stacklevel=2)
            return
        if self.is_quantized:
            self.base_layer.set_weight(self._unmerged_nf4)
            self._unmerged_nf4 = None
        else:
            weight = self.base_layer.weight
            weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    # -- forward --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        p = self.dropout if self.training else 0.0
        base = self.base_layer
        if self.is_quantized:
            x_c = x if base.compute_dtype is None else x.to(base.compute_dtype)
            y = lora_ops.lora_linear_nf4(
                x_c, base.weight_nf4, self.lora_A, self.lora_B, self.scale, base.bias, p, self.backend
            )
            return y.to(x.dtype)
        return lora_ops.lora_linear(x, base.weight, self.lora_A, self.lora_B, self.scale, base.bias, p, self.backend)


class LoRAFusedProjections(nn.Module):
    """Several :class:`LoRALinear` projections of the same input (q/k/v, gate/up) run as ONE autograd node.

    ``forward(x)`` returns a tuple of outputs, one per projection, equal to calling each layer on x;
    x is saved once and dx is accumulated in one buffer. Layers must share in_features and dropout, and
    be unmerged; with dropout each projection draws its own mask (as PEFT does per module). The first
    layer's ``backend`` is used for all.
    """

    def __init__(self, layers: list[LoRALinear]):
        super().__init__()
        if not layers or not all(isinstance(layer, LoRALinear) for layer in layers):
            raise TypeError("layers must be a non-empty list of LoRALinear")
        if len({layer.in_features for layer in layers}) != 1:
            raise ValueError(f"layers must share in_features, got {[layer.in_features for layer in layers]}")
        if len({layer.dropout for layer in layers}) != 1:
            raise ValueError(f"layers must share one dropout probability, got {[layer.dropout for layer in layers]}")
        compute_dtypes = {layer.base_layer.compute_dtype for layer in layers if layer.is_quantized}
        if len(compute_dtypes) > 1:
            raise ValueError(f"4-bit bases must share one compute_dtype, got {sorted(map(str, compute_dtypes))}")
        self.compute_dtype = compute_dtypes.pop() if compute_dtypes else None
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if any(layer.merged for layer in self.layers):
            return tuple(layer(x) for layer in self.layers)
        projections = []
        for layer in self.layers:
            base = layer.base_layer
            w = base.weight_nf4 if layer.is_quantized else base.weight
            projections.append((w, layer.lora_A, layer.lora_B, layer.scale, base.bias))
        p = self.layers[0].dropout if self.training else 0.0
        x_c = x if self.compute_dtype is None else x.to(self.compute_dtype)
        outputs = lora_multi.lora_linear_multi(x_c, projections, p, self.layers[0].backend)
        return tuple(y.to(x.dtype) for y in outputs)
