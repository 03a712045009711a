"""In-memory moves between a PEFT LoRA model and lowrank: :func:`from_peft` and :func:`to_peft`.

``from_peft(peft_model)`` turns the transformers model inside a ``PeftModel`` into a lowrank model, in
place, module by module:

- a bitsandbytes ``Linear4bit`` (adapted or not) becomes a :class:`~lowrank.nn.LinearNF4` holding the
  same bytes and constants: its state dict (bitsandbytes' own serialization: packed codes, absmax,
  code tables, nested constants and the JSON blob) is read through ``LinearNF4.from_bnb_state_dict``.
  The objects are read by duck typing (a weight with a ``quant_state``), so bitsandbytes is never
  imported here; a model without 4-bit layers does not need it at all;
- a PEFT ``lora.Linear`` / ``lora.bnb.Linear4bit`` becomes a :class:`~lowrank.nn.LoRALinear` with the
  same ``A``, ``B``, rank, alpha, scale (rsLoRA included), DoRA magnitude (where ``LoRALinear`` has
  DoRA), dropout probability and trainability; a
  dense base stays dense (GPT-2's ``Conv1D``, PEFT's ``fan_in_fan_out=True``, becomes Linear semantics
  and is remembered as a Conv1D for merging and saving, as :func:`lowrank.prepare_model` does);
- a ``modules_to_save`` wrapper is replaced by its trained copy, trainable.

The model gets ``model.lowrank_config`` like :func:`lowrank.prepare_model` leaves it, so training,
``save_adapter`` and merging work on it. What lowrank does not implement is refused by name before
anything is changed: other PEFT tuner types, ``bias != "none"``, ``lora_bias``, merged or
several adapters, LoRA on embeddings/convolutions, 8-bit bitsandbytes layers, and the rarer LoraConfig
variants (layer replication, trainable tokens, QALoRA, ...).

``to_peft(model)`` goes back: the LoRA layers' bases become dense ``nn.Linear`` (or ``Conv1D``) holding
the dequantized weight (a 4-bit ``Linear4bit`` would need bitsandbytes, which lowrank does not use),
PEFT's ``get_peft_model`` wraps them with the same targets, ranks, alphas, dropout and
``modules_to_save`` and DoRA, and the adapter weights (and magnitudes) are copied in: PEFT's forward
then equals lowrank's. peft is imported only inside :func:`to_peft`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
from torch import nn

from lowrank import models as _models
from lowrank.nn import LinearNF4, LoRALinear

try:  # transformers is a runtime dependency; Conv1D only matters for GPT-2-style models
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


class PeftConversionError(ValueError):
    """The PEFT model uses something lowrank does not support (the message names it)."""


# LoraConfig fields whose non-default value lowrank cannot represent (truthy = in use).
_UNSUPPORTED_FIELDS = (
    "use_dora",
    "lora_bias",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "use_qalora",
    "alora_invocation_tokens",
    "megatron_config",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "use_bdlora",
)


_FIELD_NAMES = {"use_dora": "DoRA", "lora_bias": "a bias on lora_B", "use_qalora": "QALoRA"}


def _dora_supported() -> bool:
    """Whether this lowrank's LoRALinear implements DoRA (``use_dora``)."""
    return "use_dora" in inspect.signature(LoRALinear.__init__).parameters


def _enum_value(value) -> str:
    return str(getattr(value, "value", value))


def _is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (duck-typed: its weight carries a ``quant_state``)."""
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def _is_8bit(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear8bitLt", "Int8Params") or hasattr(getattr(module, "weight", None), "SCB")


def _is_peft_lora_layer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and hasattr(module, "base_layer")


def _is_modules_to_save(module: nn.Module) -> bool:
    return isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict) and hasattr(module, "original_module")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _unwrap(peft_model) -> tuple[nn.Module, str, object]:
    """(the transformers model inside, the adapter name, its LoraConfig), or a PeftConversionError."""
    configs = getattr(peft_model, "peft_config", None)
    tuner = getattr(peft_model, "base_model", None)
    inner = getattr(tuner, "model", None)
    if not isinstance(configs, dict) or not isinstance(inner, nn.Module):
        raise PeftConversionError(
            f"from_peft expects a peft.PeftModel (get_peft_model / PeftModel.from_pretrained), got {type(peft_model)}"
        )
    if len(configs) != 1:
        raise PeftConversionError(
            f"the PEFT model holds {len(configs)} adapters {sorted(configs)}; lowrank.from_peft converts a model "
            "with one adapter (delete_adapter the others first)"
        )
    ((name, config),) = configs.items()
    kind = _enum_value(getattr(config, "peft_type", None))
    if kind != "LORA":
        raise PeftConversionError(f"peft_type {kind!r} is not supported: lowrank converts LoRA adapters (LORA) only")
    if getattr(config, "bias", "none") != "none":
        raise PeftConversionError(f"LoraConfig bias={config.bias!r} is not supported: lowrank keeps biases frozen")
    used = [f for f in _UNSUPPORTED_FIELDS if getattr(config, f, None) and not (f == "use_dora" and _dora_supported())]
    if used:
        raise PeftConversionError(
            "LoraConfig options lowrank does not support are set: "
            + ", ".join(f"{_FIELD_NAMES.get(f, f)} ({f}={getattr(config, f)!r})" for f in used)
        )
    return inner, name, config


def _settings_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(_models.LoRASettings)}


def _check_layer(name: str, layer: nn.Module, adapter: str) -> None:
    for attr in ("lora_embedding_A", "lora_embedding_B"):
        if adapter in getattr(layer, attr, {}):
            raise PeftConversionError(f"{name}: LoRA on an embedding ({type(layer).__name__}) is not supported")
    if getattr(layer, "merged_adapters", None):
        raise PeftConversionError(f"{name}: the adapter is merged into the base; call unmerge_adapter() first")
    if adapter not in layer.lora_A:
        raise PeftConversionError(f"{name}: has no adapter {adapter!r} (it has {sorted(layer.lora_A)})")
    if getattr(layer, "use_dora", {}).get(adapter, False) and not _dora_supported():
        raise PeftConversionError(f"{name}: DoRA (use_dora=True) is not supported")
    base = layer.base_layer
    dense = isinstance(base, nn.Linear) or (bool(Conv1D) and isinstance(base, Conv1D))
    if _is_8bit(base):
        raise PeftConversionError(f"{name}: 8-bit bitsandbytes bases ({type(base).__name__}) are not supported")
    if not (_is_4bit(base) or dense) or not isinstance(layer.lora_A[adapter], nn.Linear):
        raise PeftConversionError(
            f"{name}: LoRA on {type(base).__name__} ({type(layer).__name__}) is not supported; lowrank adapts "
            "nn.Linear, Conv1D and bitsandbytes Linear4bit layers"
        )
    if getattr(layer.lora_B[adapter], "bias", None) is not None:
        raise PeftConversionError(f"{name}: lora_B has a bias (lora_bias=True), which is not supported")


def _nf4_from_bnb(base: nn.Module) -> LinearNF4:
    """The same 4-bit weight as a LinearNF4: bitsandbytes' own state dict, read by lowrank's reader."""
    state = base.state_dict()  # bitsandbytes' serialization (it also undoes its CPU repacking)
    compute_dtype = getattr(base, "compute_dtype", None)
    return LinearNF4.from_bnb_state_dict(state, compute_dtype=compute_dtype)


def _dense_base(base: nn.Module) -> tuple[nn.Module, bool]:
    if bool(Conv1D) and isinstance(base, Conv1D):
        return _models._as_linear(base), True
    return base, False


@torch.no_grad()
def from_peft(peft_model) -> nn.Module:
    """The transformers model inside ``peft_model`` with lowrank modules (converted in place; returned).

    The ``PeftModel`` wrapper is used up: its layers are replaced. Raises :class:`PeftConversionError`
    naming the first option lowrank does not support, before changing anything.
    """
    inner, adapter, config = _unwrap(peft_model)
    if getattr(inner, "lowrank_config", None) is not None:
        raise PeftConversionError("the model inside already carries lowrank modules")
    named = list(inner.named_modules())
    lora_layers = [(n, m) for n, m in named if _is_peft_lora_layer(m)]
    saved = [(n, m) for n, m in named if _is_modules_to_save(m)]
    if not lora_layers:
        raise PeftConversionError("the PEFT model holds no LoRA layers")
    for name, layer in lora_layers:
        _check_layer(name, layer, adapter)
    inside = tuple(n + "." for n, _ in lora_layers + saved)
    for name, module in named:
        if name.startswith(inside):
            continue
        if _is_8bit(module):
            raise PeftConversionError(f"{name}: 8-bit bitsandbytes layers ({type(module).__name__}) are not supported")
        if type(module).__module__.startswith("peft.") and not (
            _is_peft_lora_layer(module) or _is_modules_to_save(module)
        ):
            raise PeftConversionError(f"{name}: PEFT module {type(module).__name__} is not supported")
    fields = _settings_fields()
    scales = {n: float(layer.scaling[adapter]) for n, layer in lora_layers}
    if (getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None)) and not (
        {"rank_pattern", "alpha_pattern"} <= fields
    ):
        raise PeftConversionError("LoraConfig rank_pattern / alpha_pattern are not supported by this lowrank version")

    quant = []  # (quant_type, blocksize, double_quant) of the 4-bit layers
    targets, replacements = [], []  # every new module is built before the model is changed
    for name, layer in lora_layers:
        base = layer.base_layer
        if _is_4bit(base):
            new_base = _nf4_from_bnb(base)
            from_conv1d = False
            quant.append((new_base.quant_type, new_base.blocksize, new_base.double_quant))
        else:
            new_base, from_conv1d = _dense_base(base)
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        drop = layer.lora_dropout[adapter]
        r, alpha = int(layer.r[adapter]), float(layer.lora_alpha[adapter])
        use_rslora = bool(getattr(layer, "use_rslora", {}).get(adapter, getattr(config, "use_rslora", False)))
        dora = bool(getattr(layer, "use_dora", {}).get(adapter, False))
        new = LoRALinear(
            new_base,
            r,
            alpha,
            float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
            use_rslora,
            adapter_dtype=A.dtype,
            **({"use_dora": True} if dora else {}),
        )
        if not math.isclose(new.scale, scales[name], rel_tol=1e-6):
            raise PeftConversionError(
                f"{name}: PEFT scaling {scales[name]} is not alpha/r or alpha/sqrt(r) = {new.scale} (set_scale / "
                "scale_layer are not supported)"
            )
        new.scale = scales[name]
        new.lora_A.copy_(A.detach())
        new.lora_B.copy_(B.detach())
        new.lora_A.requires_grad_(A.requires_grad)
        new.lora_B.requires_grad_(B.requires_grad)
        if dora:
            magnitude = layer.lora_magnitude_vector[adapter].weight
            new.lora_magnitude_vector.copy_(magnitude.detach())
            new.lora_magnitude_vector.requires_grad_(magnitude.requires_grad)
        new.to(device=A.device)
        new._lowrank_from_conv1d = from_conv1d
        replacements.append((name, new))
        targets.append(name)
    for name, module in named:  # 4-bit layers without an adapter
        if not name.startswith(inside) and not _is_peft_lora_layer(module) and _is_4bit(module):
            new_base = _nf4_from_bnb(module)
            quant.append((new_base.quant_type, new_base.blocksize, new_base.double_quant))
            replacements.append((name, new_base))
    saved_names = [name for name, _ in saved]
    replacements += [(name, wrapper.modules_to_save[adapter]) for name, wrapper in saved]
    for name, new in replacements:
        _set_module(inner, name, new)
    for name in saved_names:
        inner.get_submodule(name).requires_grad_(True)
    _forget_bitsandbytes(inner)

    quant_type, blocksize, double_quant = quant[0] if quant else (None, 64, True)
    values = dict(
        r=int(config.r),
        alpha=float(config.lora_alpha),
        dropout=float(config.lora_dropout),
        use_rslora=bool(config.use_rslora),
        quantize=quant_type,
        blocksize=blocksize,
        double_quant=double_quant,
        target_modules=targets,
        modules_to_save=saved_names,
        modules_to_save_spec=list(getattr(config, "modules_to_save", None) or []),
        task_type=_enum_value(config.task_type) if config.task_type else _models.task_type_of(inner),
    )
    if "rank_pattern" in fields:
        values.update(rank_pattern=dict(config.rank_pattern or {}), alpha_pattern=dict(config.alpha_pattern or {}))
    if "adapter_name" in fields:
        values["adapter_name"] = adapter
    if "use_dora" in fields:
        values["use_dora"] = bool(getattr(config, "use_dora", False))
    inner.lowrank_config = _models.LoRASettings(**values)
    inner.lowrank_summary = _models.summary(inner)
    return inner


def _forget_bitsandbytes(model: nn.Module) -> None:
    """The model holds no bitsandbytes layer any more: drop transformers' markers that say it does."""
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "quantization_method", None) is not None:
        model.quantization_method = None
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config


# --------------------------------------------------------------------------------------- to_peft


def _dense_module(layer: LoRALinear) -> nn.Module:
    base = layer.base_layer
    weight = base.dequantize() if isinstance(base, LinearNF4) else base.weight.detach()
    bias = None if base.bias is None else base.bias.detach()
    if getattr(layer, "_lowrank_from_conv1d", False):
        conv = Conv1D(weight.shape[0], weight.shape[1])
        conv.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        conv.bias = nn.Parameter(
            bias.clone() if bias is not None else torch.zeros(weight.shape[0]), requires_grad=False
        )
        return conv.to(weight.device)
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear.requires_grad_(False)


@torch.no_grad()
def to_peft(model: nn.Module, adapter_name: str | None = None):
    """A ``peft.PeftModel`` equal to the lowrank ``model`` (its LoRA layers become PEFT's; converted in place).

    4-bit bases become dense layers of the dequantized weight. Needs peft (``pip install peft``).
    """
    settings = getattr(model, "lowrank_config", None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if settings is None or not layers:
        raise PeftConversionError("to_peft needs a model with lowrank LoRA layers (prepare_model or from_peft)")
    if any(m.merged for m in layers.values()):
        raise PeftConversionError("to_peft: some LoRA layers are merged; unmerge() them first")
    try:
        import peft
    except ImportError:
        raise ImportError("lowrank.to_peft needs peft: pip install peft") from None
    adapter_name = adapter_name or getattr(settings, "adapter_name", "default")
    ranks = {n: m.r for n, m in layers.items()}
    alphas = {n: m.alpha for n, m in layers.items()}
    trainable = {n: (m.lora_A.requires_grad, m.lora_B.requires_grad) for n, m in layers.items()}
    adapters = {
        n: (m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.dropout, m.scale) for n, m in layers.items()
    }
    dora = {n: m.lora_magnitude_vector.detach().clone() for n, m in layers.items() if getattr(m, "use_dora", False)}
    if dora and len(dora) != len(layers):
        raise PeftConversionError("to_peft: DoRA on some LoRA layers only cannot be one LoraConfig")
    for name, layer in layers.items():
        _set_module(model, name, _dense_module(layer))
    for name, module in list(model.named_modules()):  # 4-bit layers without an adapter
        if isinstance(module, LinearNF4):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.copy_(module.dequantize())
            if module.bias is not None:
                dense.bias.copy_(module.bias)
            _set_module(model, name, dense.to(module.weight.device).requires_grad_(False))
    saved_spec = list(settings.modules_to_save_spec) or list(settings.modules_to_save)
    for attr in ("lowrank_config", "lowrank_summary", "lowrank_bytes_before"):
        if hasattr(model, attr):
            delattr(model, attr)
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        use_rslora=settings.use_rslora,
        target_modules=sorted(layers),
        modules_to_save=saved_spec or None,
        rank_pattern={f"^{n}$": r for n, r in ranks.items() if r != settings.r},
        alpha_pattern={f"^{n}$": a for n, a in alphas.items() if a != settings.alpha},
        fan_in_fan_out=any(isinstance(model.get_submodule(n), Conv1D) for n in layers) if Conv1D else False,
        task_type=settings.task_type,
        use_dora=bool(dora),
    )
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    inner = peft_model.base_model.model
    for name, (A, B, dropout, scale) in adapters.items():
        layer = inner.get_submodule(name)
        layer.lora_A[adapter_name].weight.copy_(A)
        layer.lora_B[adapter_name].weight.copy_(B)
        layer.lora_A[adapter_name].weight.requires_grad_(trainable[name][0])
        layer.lora_B[adapter_name].weight.requires_grad_(trainable[name][1])
        layer.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if name in dora:
            layer.lora_magnitude_vector[adapter_name].weight.copy_(dora[name])
        if not math.isclose(layer.scaling[adapter_name], scale, rel_tol=1e-6):
            raise PeftConversionError(
                f"{name}: PEFT computed scaling {layer.scaling[adapter_name]}, lowrank has {scale}"
            )
    return peft_model


__all__ = ["PeftConversionError", "from_peft", "to_peft"]
