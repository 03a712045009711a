"""bitsandbytes-format 4-bit checkpoints, written and read without bitsandbytes.

transformers' pre-quantized layout: ``config.json`` with a ``quantization_config`` block +
``model.safetensors`` with Linear4bit's keys. Files go through :mod:`lowrank.files` (atomic writes).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lowrank import files
from lowrank import models as _models
from lowrank.adapters.errors import QuantizedCheckpointError, read_json_object, read_safetensors, unshared
from lowrank.dtypes import DTYPE_NAMES, DTYPES_BY_NAME
from lowrank.nf4 import QuantStateError
from lowrank.nn import LinearNF4

MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"


def _base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapters, with LoRALinear bases under their module's own name."""
    lora_names = set(_models.adapter_layers(model))
    sd = {}
    for key, value in model.state_dict().items():
        owner = next((n for n in lora_names if key.startswith(n + ".")), None)
        if owner is not None and not key.startswith(owner + ".base_layer."):
            continue  # adapter tensors (lora_*, extra adapters, DoRA magnitudes) are not part of the base
        sd[key.replace(".base_layer.", ".")] = value
    # tied weights (GPT-2's lm_head = wte) are stored once, as transformers does
    unique = {n for n, _ in model.named_parameters()}
    tied = {n.replace(".base_layer.", ".") for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n.replace(".base_layer.", ".") for n in unique
    }
    return {k: v for k, v in sd.items() if k not in tied}


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the (4-bit) base model as transformers + bitsandbytes save it (adapters are not included).

    ``config.json`` carries the ``quantization_config`` block; ``model.safetensors`` holds each NF4
    layer as Linear4bit's keys (``weight`` packed uint8, ``weight.absmax``, ``weight.quant_map``,
    ``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``) and everything else as is.
    """
    quantized = {name.removesuffix(".base_layer"): m for name, m in model.named_modules() if isinstance(m, LinearNF4)}
    if not quantized:
        raise QuantizedCheckpointError("the model has no 4-bit layers; prepare it with quantize='nf4' first")
    kinds = {(m.quant_type, m.double_quant, m.blocksize) for m in quantized.values()}
    if len({(k[0], k[1]) for k in kinds}) != 1:
        raise QuantizedCheckpointError(f"all 4-bit layers must share quant_type and double_quant, got {sorted(kinds)}")
    quant_type, double_quant, _ = kinds.pop()
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise QuantizedCheckpointError(f"{type(model).__name__} has no transformers config to save")
    floats = [p.dtype for n, p in model.named_parameters() if p.is_floating_point() and "lora_" not in n]
    model_dtype = max(set(floats), key=floats.count) if floats else torch.float32
    compute = {m.compute_dtype for m in quantized.values()} - {None}
    compute_dtype = compute.pop() if len(compute) == 1 else model_dtype
    skip = [n for n in _models.linear_module_names(model) if n not in quantized]
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = DTYPE_NAMES[model_dtype]
    cfg.pop("torch_dtype", None)
    cfg["quantization_config"] = {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": DTYPE_NAMES[compute_dtype],
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip or None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    files.write_safetensors(os.path.join(directory, MODEL_WEIGHTS), unshared(_base_state_dict(model)))
    files.write_json(os.path.join(directory, MODEL_CONFIG), dict(sorted(cfg.items())))


def load_quantized(
    directory: str | os.PathLike,
    model_class: type | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a bitsandbytes 4-bit checkpoint (written by transformers or :func:`save_quantized`) without
    bitsandbytes: quantized layers become frozen :class:`LinearNF4` with the stored bytes, unchanged.

    ``model_class`` defaults to the config's ``architectures[0]`` looked up in ``transformers``.
    The result is frozen; call :func:`lowrank.prepare_model` on it to add adapters.
    """
    import transformers

    directory = os.fspath(directory)
    cfg = read_json_object(os.path.join(directory, MODEL_CONFIG), QuantizedCheckpointError)
    qcfg = cfg.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise QuantizedCheckpointError(f"{directory}/config.json has no quantization_config block")
    if qcfg.get("quant_method") != "bitsandbytes" or not qcfg.get("load_in_4bit", qcfg.get("_load_in_4bit")):
        raise QuantizedCheckpointError(
            f"quantization_config must be bitsandbytes 4-bit (quant_method 'bitsandbytes', load_in_4bit true), got "
            f"quant_method={qcfg.get('quant_method')!r}, load_in_4bit={qcfg.get('load_in_4bit')!r}"
        )
    if model_class is None:
        archs = cfg.get("architectures") or []
        if not archs or not hasattr(transformers, archs[0]):
            raise QuantizedCheckpointError(
                f"config.json architectures {archs!r} name no transformers class; pass model_class="
            )
        model_class = getattr(transformers, archs[0])
    tensors = read_safetensors(os.path.join(directory, MODEL_WEIGHTS))
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "quantization_config"})
    dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dtype = DTYPES_BY_NAME.get(dtype_name) if dtype_name in DTYPE_NAMES.values() else None
    if dtype is None:
        raise QuantizedCheckpointError(f"config.json dtype {dtype_name!r} is not one of {sorted(DTYPE_NAMES.values())}")
    config_class = getattr(model_class, "config_class", None)
    if isinstance(config_class, type) and not isinstance(config, config_class):
        raise QuantizedCheckpointError(
            f"the checkpoint's config is a {type(config).__name__} but {model_class.__name__} "
            f"needs a {config_class.__name__}"
        )
    with _models.parameters_on_meta():
        model = (
            model_class._from_config(config, dtype=dtype)
            if hasattr(model_class, "_from_config")
            else model_class(config)
        )
    blobs = [k for k in tensors if ".weight.quant_state.bitsandbytes__" in k]
    if not blobs:
        raise QuantizedCheckpointError(
            f"{directory}/{MODEL_WEIGHTS} has no '*.weight.quant_state.bitsandbytes__nf4' entries"
        )
    names = set(dict(model.named_modules()))
    consumed = set()
    for blob in blobs:
        name = blob.split(".weight.quant_state.", 1)[0]
        if name not in names:
            raise QuantizedCheckpointError(f"checkpoint layer {name!r} does not exist in {model_class.__name__}")
        old = model.get_submodule(name)
        if not _models._is_linear(old):
            raise QuantizedCheckpointError(
                f"checkpoint layer {name!r} is a {type(old).__name__} in the model, not a linear layer"
            )
        try:
            new = LinearNF4.from_bnb_state_dict(tensors, prefix=f"{name}.", compute_dtype=compute_dtype)
        except (QuantStateError, ValueError) as err:
            raise QuantizedCheckpointError(f"{name}: {err}") from err
        is_conv1d = bool(_models.Conv1D) and isinstance(old, _models.Conv1D)
        want = (old.weight.shape[1], old.weight.shape[0]) if is_conv1d else tuple(old.weight.shape)
        if (new.out_features, new.in_features) != want:
            raise QuantizedCheckpointError(
                f"{name}: checkpoint weight is {(new.out_features, new.in_features)}, the model expects {want}"
            )
        new._lowrank_from_conv1d = is_conv1d
        _models._set_module(model, name, new)
        consumed |= {k for k in tensors if k == f"{name}.bias" or k.startswith(f"{name}.weight")}
    rest = {k: v for k, v in tensors.items() if k not in consumed}
    result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        raise QuantizedCheckpointError(
            f"checkpoint tensors not in {model_class.__name__}: {result.unexpected_keys[:5]}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise QuantizedCheckpointError(
            f"checkpoint lacks tensors for {still_meta[:5]}{' ...' if len(still_meta) > 5 else ''}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()
