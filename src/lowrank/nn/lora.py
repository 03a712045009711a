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

INITS = ("kaiming", "gaussian", "pissa", "olora")
#: inits that decompose the full-precision weight (the base keeps the residual); ``"loftq"`` only
#: through :meth:`LoRALinear.from_dense` with a 4-bit base (it alternates quantization and the fit)
DECOMPOSING_INITS = ("pissa", "olora", "loftq")
#: the adapter name of a layer's own ``lora_A`` / ``lora_B`` unless the constructor says otherwise (PEFT's default)
DEFAULT_ADAPTER = "default"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class LoRAOptionError(ValueError):
    """A LoRA option (``r``, ``alpha``, ``dropout``, ``init``, ``bias``, targets, ...) has a value lowrank
    cannot use; the message names the option, the value and what was expected. Raised by
    :func:`lowrank.prepare_model`, :func:`lowrank.add_adapter` and the LoRA modules before anything changes."""


def _check_rank_alpha_dropout(r, alpha, dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoRAOptionError(f"r must be a positive int, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise LoRAOptionError(f"alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise LoRAOptionError(f"dropout must be a probability in [0, 1), got {dropout!r}")


class LoRAAdapter(nn.Module):
    """A further named adapter of a :class:`LoRALinear`: ``lora_A`` (r, in), ``lora_B`` (out, r), its own
    ``r``, ``alpha``, ``scale`` and ``dropout``. Created by :meth:`LoRALinear.add_adapter`."""

    def __init__(self, in_features, out_features, r, alpha, dropout, use_rslora, dtype, device):
        super().__init__()
        _check_rank_alpha_dropout(r, alpha, dropout)
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, dropout={self.dropout}"


def _init_pair(A: torch.Tensor, B: torch.Tensor, r: int, init: str) -> None:
    if init == "kaiming":
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    else:
        nn.init.normal_(A, mean=0.0, std=1.0 / r)
    nn.init.zeros_(B)


def _svd_pair(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r SVD factors with ``scale·B·A`` = the best rank-r approximation of ``weight`` (PiSSA's split)."""
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    root = torch.sqrt(S[:r] / scale)
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


@torch.no_grad()
def low_rank_init(
    weight: torch.Tensor,
    r: int,
    scale: float,
    init: str,
    quantizer=None,
    loftq_iters: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | nf4.NF4Weight]:
    """Split a full-precision weight (out, in) into an adapter and a base: returns ``(A, B, base)``.

    * ``"pissa"`` (PEFT's ``init_lora_weights="pissa"``): A, B from the top-r SVD of W;
      base = W - scale·B·A.
    * ``"olora"`` (PEFT's ``"olora"``): W = QR; B = Q[:, :r], A = R[:r]; base = W - scale·B·A.
    * ``"loftq"``: alternate ``Q = quant(W - scale·B·A)`` and the rank-r SVD fit of ``W - dequant(Q)``
      for ``loftq_iters`` rounds (LoftQ, Li et al. 2023); needs ``quantizer``. Unlike PEFT's LoftQ,
      the fit divides by ``scale`` so that ``dequant(Q) + scale·B·A`` approximates W for any alpha.

    ``quantizer`` (fp32 tensor -> :class:`~lowrank.nf4.NF4Weight`) makes the base 4-bit: the residual is
    quantized AFTER the decomposition (PiSSA-/OLoRA-QLoRA), so the quantization error is that of the
    residual. Without it the base is the fp32 residual.
    """
    if init not in DECOMPOSING_INITS:
        raise ValueError(f"init must be one of {DECOMPOSING_INITS}, got {init!r}")
    w = weight.detach().float()
    if r > min(w.shape):
        raise ValueError(f"init={init!r} needs r <= min(in, out) = {min(w.shape)}, got r={r}")
    if init == "loftq":
        if quantizer is None:
            raise ValueError("init='loftq' fits the adapter to a quantization error: it needs a 4-bit base (quantize=)")
        if isinstance(loftq_iters, bool) or not isinstance(loftq_iters, int) or loftq_iters < 1:
            raise ValueError(f"loftq_iters must be a positive int, got {loftq_iters!r}")
        residual = w
        for i in range(loftq_iters):
            q = quantizer(residual)
            A, B = _svd_pair(w - nf4.dequantize(q, torch.float32), r, scale)
            if i + 1 < loftq_iters:
                residual = w - scale * (B @ A)
        return A.contiguous(), B.contiguous(), q
    if init == "pissa":
        A, B = _svd_pair(w, r, scale)
    else:
        Q, R = torch.linalg.qr(w)
        A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    residual = w - scale * (B @ A)
    return A.contiguous(), B.contiguous(), (residual if quantizer is None else quantizer(residual))


def _base_shape(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, (nn.Linear, LinearNF4)):
        return base.out_features, base.in_features
    raise TypeError(f"base must be an nn.Linear or a LinearNF4, got {type(base).__name__}")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update; x (..., in) -> (..., out) in x's dtype.

    Args:
        base: ``nn.Linear`` (dense, frozen here) or :class:`LinearNF4` (4-bit).
        r: rank, >= 1 (PEFT allows r > min(in, out); PiSSA needs r <= min(in, out)). alpha: scale numerator.
        dropout: probability of dropping elements of the LoRA input in training mode (PEFT semantics).
        use_rslora: ``scale = alpha / sqrt(r)`` instead of ``alpha / r``.
        init: ``"kaiming"`` (A kaiming-uniform a=sqrt(5), B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0) or
            ``"pissa"`` / ``"olora"`` (A, B from the top-r SVD / the QR of the weight; the base keeps the residual,
            re-quantized when it is 4-bit -- :meth:`from_dense` decomposes before quantizing, which is better).
        adapter_dtype: dtype of ``lora_A`` / ``lora_B`` (fp32 by default, like PEFT).
        backend: ``None`` (auto: ``LOWRANK_BACKEND`` or per device), ``"torch"``, ``"triton"`` or ``"ext"``;
            the attribute ``backend`` may be changed later.
        adapter_name: the name of this layer's own adapter (``lora_A`` / ``lora_B``; PEFT's ``"default"``).
        use_dora: DoRA (PEFT's ``use_dora``): a trainable magnitude ``lora_magnitude_vector`` (out,), initialised
            to the row norms of ``W + scale·B·A``; ``y = m / ||W + scale·B·A||_row ⊙ (x·Wᵀ + scale·x·Aᵀ·Bᵀ) + bias``
            with the norm treated as a constant (no gradient), as PEFT and the DoRA paper do.

    Named adapters: :meth:`add_adapter` adds further ``(A, B)`` pairs (in ``extra_adapters``);
    ``active_adapters`` lists those the forward adds (in order; the first runs in the fused op, the others
    are added on top); ``adapters_enabled = False`` runs the base alone, exactly.
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
        adapter_name: str = DEFAULT_ADAPTER,
        use_dora: bool = False,
    ):
        super().__init__()
        out_features, in_features = _base_shape(base)
        _check_rank_alpha_dropout(r, alpha, dropout)
        if init in DECOMPOSING_INITS and r > min(in_features, out_features):
            raise ValueError(
                f"init={init!r} needs r <= min(in, out) = {min(in_features, out_features)} (the SVD has no more "
                f"directions), got r={r}"
            )
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
        self.adapter_name = adapter_name
        self.extra_adapters = nn.ModuleDict()
        self.active_adapters: list[str] = [adapter_name]
        self.adapters_enabled = True
        #: per-example adapter names of the batch being run (set by ``lowrank.mixed_batch``), or None
        self.batch_adapter_names: list[str] | None = None
        self.merged = False
        self._unmerged_nf4: nf4.NF4Weight | None = None
        self.reset_lora_parameters(init)
        self.use_dora = bool(use_dora)
        self._dora_norm_key = None
        self._dora_weight_sq = None
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(self.dora_weight_norm().to(adapter_dtype))

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "pissa",
        *,
        quantize: str | None = None,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        loftq_iters: int = 1,
        adapter_name: str = DEFAULT_ADAPTER,
        backend: str | None = None,
    ) -> LoRALinear:
        """A LoRALinear whose adapter and base come from decomposing ``linear``'s full-precision weight
        (:func:`low_rank_init`: ``"pissa"``, ``"olora"``, ``"loftq"``); ``quantize="nf4"``/``"fp4"`` makes the
        base 4-bit after the decomposition (the residual is quantized, never the original weight)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        if init not in DECOMPOSING_INITS:
            raise ValueError(f"from_dense init must be one of {DECOMPOSING_INITS}, got {init!r}")
        if quantize not in (None, "nf4", "fp4"):
            raise ValueError(f"quantize must be 'nf4', 'fp4' or None, got {quantize!r}")
        _check_rank_alpha_dropout(r, alpha, dropout)
        dtype = linear.weight.dtype

        def quantizer(dense: torch.Tensor) -> nf4.NF4Weight:
            q = nf4.quantize(dense.contiguous(), blocksize, double_quant, quantize)
            return dataclasses.replace(q, dtype=dtype)

        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        A, B, base_weight = low_rank_init(
            linear.weight, r, scale, init, None if quantize is None else quantizer, loftq_iters
        )
        bias = None if linear.bias is None else linear.bias.detach()
        if quantize is None:
            base = nn.Linear(linear.in_features, linear.out_features, bias=bias is not None, device="meta")
            base.weight = nn.Parameter(base_weight.to(dtype), requires_grad=False)
            if bias is not None:
                base.bias = nn.Parameter(bias.clone(), requires_grad=False)
        else:
            base = LinearNF4(base_weight, bias, compute_dtype, backend=backend)
        layer = cls(base, r, alpha, dropout, use_rslora, "kaiming", backend=backend, adapter_name=adapter_name)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        layer._keep_initial_adapter()
        return layer

    def _keep_initial_adapter(self) -> None:
        """Keep the adapter a decomposing init produced (not saved in state_dict): ``save_adapter(...,
        convert_to_lora=True)`` turns a trained PiSSA/OLoRA adapter into a plain LoRA of the original weight."""
        self.register_buffer("lora_A_initial", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("lora_B_initial", self.lora_B.detach().clone(), persistent=False)

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
        """The trainable parameters of the active adapters by name (``lora_A``, ``lora_B``,
        ``extra_adapters.<name>.lora_A``, ...)."""
        params = {}
        for name in self.active_adapters:
            prefix = "" if name == self.adapter_name else f"extra_adapters.{name}."
            holder = self.adapter(name)
            params[f"{prefix}lora_A"], params[f"{prefix}lora_B"] = holder.lora_A, holder.lora_B
            if name == self.adapter_name and self.use_dora:
                params["lora_magnitude_vector"] = self.lora_magnitude_vector
        return params

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, dropout={self.dropout}, merged={self.merged}, "
            f"adapters={self.adapter_names}, active={self.active_adapters}"
        )

    # -- named adapters -------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return [self.adapter_name, *self.extra_adapters]

    def adapter(self, name: str) -> LoRALinear | LoRAAdapter:
        """Where adapter ``name``'s ``lora_A``, ``lora_B``, ``r``, ``scale``, ``dropout`` live (self: its own)."""
        if name == self.adapter_name:
            return self
        if name not in self.extra_adapters:
            raise KeyError(f"adapter {name!r} is not on this layer; it has {self.adapter_names}")
        return self.extra_adapters[name]

    def add_adapter(
        self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming"
    ) -> LoRAAdapter:
        """Add a further adapter ``name`` (kaiming or gaussian init, B = 0: the output is unchanged)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.adapter_names:
            raise ValueError(f"adapter {name!r} already exists on this layer ({self.adapter_names})")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"a further adapter's init must be 'kaiming' or 'gaussian', got {init!r}")
        if self.merged:
            raise RuntimeError("cannot add an adapter to a merged layer; unmerge() first")
        adapter = LoRAAdapter(
            self.in_features, self.out_features, r, alpha, dropout, use_rslora, self.lora_A.dtype, self.lora_A.device
        )
        with torch.no_grad():
            _init_pair(adapter.lora_A, adapter.lora_B, r, init)
        self.extra_adapters[name] = adapter
        return adapter

    def remove_adapter(self, name: str) -> None:
        """Remove adapter ``name``. Removing the layer's own adapter promotes the first further one to
        ``lora_A`` / ``lora_B``; a layer keeps at least one adapter."""
        self.adapter(name)
        if self.adapter_names == [name]:
            raise ValueError(f"adapter {name!r} is this layer's only adapter; replace the layer by its base_layer")
        if name == self.adapter_name:
            promoted_name, promoted = next(iter(self.extra_adapters.items()))
            self.lora_A, self.lora_B = promoted.lora_A, promoted.lora_B
            self.r, self.alpha, self.scale = promoted.r, promoted.alpha, promoted.scale
            self.dropout, self.use_rslora = promoted.dropout, promoted.use_rslora
            self.adapter_name = promoted_name
            del self.extra_adapters[promoted_name]
        else:
            del self.extra_adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active_adapters(self, names: list[str]) -> None:
        """Make ``names`` the active adapters; only their parameters train (``requires_grad``)."""
        for name in names:
            self.adapter(name)
        if self.merged:
            raise RuntimeError("cannot switch adapters on a merged layer; unmerge() first")
        self.active_adapters = list(names)
        for name in self.adapter_names:
            holder = self.adapter(name)
            for p in (holder.lora_A, holder.lora_B):
                p.requires_grad_(name in names)
        if self.use_dora:
            self.lora_magnitude_vector.requires_grad_(self.adapter_name in names)

    # -- initialization -------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """(Re)initialize A and B; ``"pissa"`` / ``"olora"`` also rewrite the base weight to the residual (a 4-bit
        base is dequantized, decomposed and re-quantized: use :meth:`from_dense` to decompose before quantizing)."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if init in ("kaiming", "gaussian"):
            _init_pair(self.lora_A, self.lora_B, self.r, init)
        else:
            self._decomposing_init(init)

    def _decomposing_init(self, init: str) -> None:
        if self.merged:
            raise RuntimeError(f"cannot apply {init} init to a merged layer; unmerge() first")
        weight = self._base_dense(torch.float32)
        A, B, _ = low_rank_init(weight, self.r, self.scale, init)
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        self._keep_initial_adapter()
        # The base keeps what the adapter does not represent (computed from the adapter as stored).
        residual = weight - self.delta_weight([self.adapter_name])
        self._set_base_dense(residual)

    # -- DoRA -----------------------------------------------------------------------------------------

    def _base_matmul(self, z: torch.Tensor) -> torch.Tensor:
        """``z·Wᵀ`` (no bias) in fp32 through the op family (a 4-bit W is never materialised)."""
        base = self.base_layer
        if self.is_quantized:
            return lora_ops.linear_nf4(z.float(), base.weight_nf4, None, self.backend).float()
        return nn.functional.linear(z.float(), base.weight.float())

    def _weight_sq_norms(self) -> torch.Tensor:
        """``||W_i||²`` per output row (fp32), cached until the base weight changes (W is frozen, so once)."""
        weight = self.base_layer.weight
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), str(weight.device))
        if self._dora_weight_sq is None or self._dora_norm_key != key:
            if self.is_quantized:
                # decoded once per base weight (and dropped at once): only the (out,) norms are kept
                sq = self.base_layer.dequantize(torch.float32).square().sum(1)
            else:
                sq = weight.detach().float().square().sum(1)
            self._dora_weight_sq, self._dora_norm_key = sq, key
        return self._dora_weight_sq

    @torch.no_grad()
    def dora_weight_norm(self) -> torch.Tensor:
        """``||W + scale·B·A||`` per output row (out,), fp32, without a dense W or a dense B·A:
        ``||W_i||² + 2·scale·<B_i, (A·Wᵀ)ᵀ_i> + scale²·B_i·(A·Aᵀ)·B_iᵀ``."""
        A, B, s = self.lora_A.detach().float(), self.lora_B.detach().float(), self.scale
        cross = (B * self._base_matmul(A).t()).sum(1)
        quad = ((B @ (A @ A.t())) * B).sum(1)
        return (self._weight_sq_norms() + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()

    def _lora_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """``x·Wᵀ + scale·x·Aᵀ·Bᵀ`` (own adapter, no dropout, no bias) in x's dtype."""
        base = self.base_layer
        if self.r > min(self.in_features, self.out_features):
            y = self._base_matmul(x) + self.scale * ((x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t())
            return y.to(x.dtype)
        if self.is_quantized:
            x_c = x if base.compute_dtype is None else x.to(base.compute_dtype)
            return lora_ops.lora_linear_nf4(
                x_c, base.weight_nf4, self.lora_A, self.lora_B, self.scale, None, 0.0, self.backend
            ).to(x.dtype)
        return lora_ops.lora_linear(x, base.weight, self.lora_A, self.lora_B, self.scale, None, 0.0, self.backend)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.lora_magnitude_vector.float() / self.dora_weight_norm()  # the norm is a constant (no grad)
        bias = self.base_layer.bias
        if self.training and self.dropout > 0:
            # PEFT: base(x) + (g - 1)·drop(x)·Wᵀ + g·scale·drop(x)·Aᵀ·Bᵀ
            x_d = nn.functional.dropout(x, self.dropout, True)
            y = self.base_layer(x).float() + g * self._lora_without_bias(x_d).float() - self._base_matmul(x_d)
        else:
            y = g * self._lora_without_bias(x).float()
            if bias is not None:
                y = y + bias.float()
        return y.to(x.dtype)

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

    def delta_weight(self, names: list[str] | None = None) -> torch.Tensor:
        """``Σ scale·B·A`` over adapters ``names`` (default: the active ones) in fp32, shape (out, in)."""
        delta = torch.zeros(self.out_features, self.in_features, device=self.lora_A.device)
        for name in self.active_adapters if names is None else names:
            holder = self.adapter(name)
            delta += holder.scale * (holder.lora_B.detach().float() @ holder.lora_A.detach().float())
        return delta

    @torch.no_grad()
    def merged_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The exact dense weight ``dequant(W) + scale·B·A`` (out, in), computed in fp32, returned in ``dtype``."""
        if self.merged and self.is_quantized:
            base = nf4.dequantize(self._unmerged_nf4, torch.float32)
        elif self.merged:
            return self.base_layer.weight.detach().to(dtype)
        else:
            base = self._base_dense(torch.float32)
        if self.use_dora and self.adapter_name in self.active_adapters:
            others = [n for n in self.active_adapters if n != self.adapter_name]
            g = self.lora_magnitude_vector.detach().float() / self.dora_weight_norm()
            own = g[:, None] * (base + self.delta_weight([self.adapter_name]))
            return (own + self.delta_weight(others)).to(dtype)
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
        if self.use_dora:
            raise LoRAOptionError(
                "merge() in place is not available for a DoRA layer (unmerge could not restore it exactly); "
                "use merged_dense() or lowrank.merge_adapters(model)"
            )
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

    def _mixed_batch_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Each example (x's first dim) through its own adapter, in one batched call
        (:func:`lowrank.ops.lora_multi.lora_linear_multi_adapter`); names this layer lacks run the base only."""
        if x.dim() != 3 or x.shape[0] != len(names):
            raise ValueError(
                f"a mixed batch needs x of shape (batch, seq, in) with batch = {len(names)} adapter names, "
                f"got {tuple(x.shape)}"
            )
        used = [n for n in dict.fromkeys(names) if n in self.adapter_names]
        if self.use_dora and self.adapter_name in used:
            raise ValueError(f"adapter {self.adapter_name!r} is a DoRA adapter: mixed batches take plain LoRA only")
        base = self.base_layer
        x_c = x if not self.is_quantized or base.compute_dtype is None else x.to(base.compute_dtype)
        w = base.weight_nf4 if self.is_quantized else base.weight
        if not used:
            return self.base_layer(x)
        holders = [self.adapter(n) for n in used]
        r_max = max(h.r for h in holders)
        # ranks may differ: zero rows of A / columns of B add nothing
        A_stack = torch.stack([nn.functional.pad(h.lora_A.float(), (0, 0, 0, r_max - h.r)) for h in holders])
        B_stack = torch.stack([nn.functional.pad(h.lora_B.float(), (0, r_max - h.r)) for h in holders])
        scales = [h.scale for h in holders]
        ids = torch.tensor([used.index(n) if n in used else -1 for n in names], device=x.device)
        y = lora_multi.lora_linear_multi_adapter(x_c, w, A_stack, B_stack, scales, ids, base.bias, self.backend)
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapters_enabled:
            return self.base_layer(x)
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(x, self.batch_adapter_names)
        if not self.active_adapters:
            return self.base_layer(x)
        names = self.active_adapters
        if self.use_dora and self.adapter_name in names:  # the DoRA adapter scales the base: it goes first
            names = [self.adapter_name, *(n for n in names if n != self.adapter_name)]
        first, *rest = (self.adapter(name) for name in names)
        p = first.dropout if self.training else 0.0
        base = self.base_layer
        if first is self and self.use_dora:
            y = self._dora_forward(x)
        elif first.r > min(self.in_features, self.out_features):
            # the fused op takes r <= min(in, out); PEFT allows more: base + the low-rank term in torch
            y, rest = base(x), [first, *rest]
        elif self.is_quantized:
            x_c = x if base.compute_dtype is None else x.to(base.compute_dtype)
            y = lora_ops.lora_linear_nf4(
                x_c, base.weight_nf4, first.lora_A, first.lora_B, first.scale, base.bias, p, self.backend
            )
        else:
            y = lora_ops.lora_linear(
                x, base.weight, first.lora_A, first.lora_B, first.scale, base.bias, p, self.backend
            )
        for adapter in rest:  # further active adapters: their low-rank terms on top (as PEFT adds them)
            x_a = nn.functional.dropout(x, adapter.dropout, self.training) if adapter.dropout else x
            xa = x_a.to(adapter.lora_A.dtype) @ adapter.lora_A.t()
            y = y + (adapter.scale * (xa @ adapter.lora_B.t())).to(y.dtype)
        return y.to(x.dtype)


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
        if any(
            layer.merged
            or layer.use_dora
            or layer.batch_adapter_names is not None
            or not layer.adapters_enabled
            or layer.active_adapters != [layer.adapter_name]
            for layer in self.layers
        ):
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


class LoRAEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` plus a trainable low-rank update, PEFT's layout and semantics:
    ``y = base(ids) + scale · embed(ids, Aᵀ) · Bᵀ`` with ``lora_embedding_A`` (r, num_embeddings) and
    ``lora_embedding_B`` (embedding_dim, r); init A = 0, B ~ N(0, 1) (PEFT's ``init_lora_weights=True``;
    ``"gaussian"`` the same). One adapter per layer; no dropout (PEFT applies none to embeddings).
    """

    def __init__(
        self,
        base: nn.Embedding,
        r: int,
        alpha: float,
        use_rslora: bool = False,
        init: str = "kaiming",
        adapter_dtype: torch.dtype = torch.float32,
        *,
        adapter_name: str = DEFAULT_ADAPTER,
    ):
        super().__init__()
        if not isinstance(base, nn.Embedding) or hasattr(base, "embed_scale"):
            raise TypeError(f"base must be a plain nn.Embedding, got {type(base).__name__}")
        _check_rank_alpha_dropout(r, alpha, 0.0)
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"an embedding adapter's init must be 'kaiming' or 'gaussian', got {init!r}")
        if adapter_dtype not in _FLOATS:
            raise TypeError(f"adapter_dtype must be float32/float16/bfloat16, got {adapter_dtype}")
        self.base_layer = base
        base.weight.requires_grad_(False)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.r, self.alpha, self.use_rslora, self.dropout = r, alpha, use_rslora, 0.0
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base.weight.device
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, self.num_embeddings, dtype=adapter_dtype, device=device))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, dtype=adapter_dtype, device=device))
        with torch.no_grad():
            nn.init.normal_(self.lora_embedding_B)
        self.adapter_name = adapter_name
        self.active_adapters: list[str] = [adapter_name]
        self.adapters_enabled = True
        self.use_dora = False
        self.batch_adapter_names: list[str] | None = None

    @property
    def adapter_names(self) -> list[str]:
        return [self.adapter_name]

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def adapter(self, name: str) -> LoRAEmbedding:
        if name != self.adapter_name:
            raise KeyError(f"adapter {name!r} is not on this layer; it has {self.adapter_names}")
        return self

    def adapter_params(self) -> dict[str, nn.Parameter]:
        if self.adapter_name not in self.active_adapters:
            return {}
        return {"lora_embedding_A": self.lora_embedding_A, "lora_embedding_B": self.lora_embedding_B}

    def set_active_adapters(self, names: list[str]) -> None:
        unknown = [n for n in names if n != self.adapter_name]
        if unknown:
            raise KeyError(f"adapter {unknown[0]!r} is not on this layer; it has {self.adapter_names}")
        self.active_adapters = list(names)
        for p in (self.lora_embedding_A, self.lora_embedding_B):
            p.requires_grad_(self.adapter_name in names)

    def delta_weight(self) -> torch.Tensor:
        """``scale·(B·A)ᵀ`` in fp32, shape (num_embeddings, embedding_dim)."""
        return self.scale * (self.lora_embedding_B.detach().float() @ self.lora_embedding_A.detach().float()).t()

    def merged_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        base = self.base_layer.weight.detach().float()
        if self.adapter_name in self.active_adapters:
            base = base + self.delta_weight()
        return base.to(dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, adapter={self.adapter_name!r}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(ids)
        names = self.batch_adapter_names
        if not self.adapters_enabled or (names is None and self.adapter_name not in self.active_adapters):
            return y
        base = self.base_layer
        after_a = nn.functional.embedding(
            ids,
            self.lora_embedding_A.t(),
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        delta = (after_a @ self.lora_embedding_B.t()) * self.scale
        if names is not None:  # a mixed batch: only the examples that name this adapter get it
            if ids.shape[0] != len(names):
                raise ValueError(f"a mixed batch of {len(names)} adapter names got ids of shape {tuple(ids.shape)}")
            keep = torch.tensor([n == self.adapter_name for n in names], device=ids.device, dtype=delta.dtype)
            delta = delta * keep.view(-1, *([1] * (delta.dim() - 1)))
        return y + delta.to(y.dtype)
