"""PEFT's adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as PEFT writes them.

Keys ``base_model.model.<module>.lora_A.weight``, target_modules expanded to full module names,
``task_type`` from the model class. Files go through :mod:`lowrank.files` (atomic writes: weights
first, so a directory with a config always has complete weights next to it).
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from lowrank import files
from lowrank import models as _models
from lowrank.adapters.errors import (
    AdapterConfigError,
    AdapterError,
    AdapterShapeError,
    read_json_object,
    read_safetensors,
    unshared,
)
from lowrank.nn import LoRALinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _settings(model: nn.Module) -> _models.LoRASettings:
    config = getattr(model, "lowrank_config", None)
    if config is None or not _lora_modules(model):
        raise AdapterError("the model carries no LoRA adapters; call lowrank.prepare_model (or load_adapter) first")
    return config


def adapter_config_dict(model: nn.Module) -> dict:
    """The adapter_config.json PEFT would write for this prepared model."""
    config = _settings(model)
    modules = _lora_modules(model)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": base_name,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "lora_bias": False,
        "bias": "none",
        "fan_in_fan_out": any(getattr(m, "_lowrank_from_conv1d", False) for m in modules.values()),
        "target_modules": sorted(modules),
        "exclude_modules": None,
        "modules_to_save": config.modules_to_save_spec or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of adapter_model.safetensors, keyed as PEFT keys them."""
    config = _settings(model)
    tensors = {}
    for name, module in _lora_modules(model).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach()
    for name in config.modules_to_save:
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().clone()
    return tensors


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by ``PeftModel.from_pretrained``."""
    directory = os.fspath(directory)
    config = adapter_config_dict(model)
    tensors = adapter_state_dict(model)
    os.makedirs(directory, exist_ok=True)
    # weights first: a directory with a config always has complete weights next to it
    files.write_safetensors(os.path.join(directory, ADAPTER_WEIGHTS), unshared(tensors), {"lowrank": "adapter"})
    files.write_json(os.path.join(directory, ADAPTER_CONFIG), dict(sorted(config.items())))


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """Read and check adapter_config.json; AdapterConfigError names the missing or wrong field."""
    path = os.path.join(os.fspath(directory), ADAPTER_CONFIG)
    cfg = read_json_object(path, AdapterConfigError)
    missing = [k for k in ("peft_type", "r", "lora_alpha", "target_modules") if k not in cfg]
    if missing:
        raise AdapterConfigError(f"{path} lacks the required fields {missing}")
    if cfg["peft_type"] != "LORA":
        raise AdapterConfigError(f"{path}: peft_type must be 'LORA', got {cfg['peft_type']!r}")
    r = cfg["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterConfigError(f"{path}: r must be a positive integer, got {r!r}")
    alpha = cfg["lora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterConfigError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    targets = cfg["target_modules"]
    if not (
        isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        raise AdapterConfigError(
            f"{path}: target_modules must be a regex string or a non-empty list of names, got {targets!r}"
        )
    dropout = cfg.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise AdapterConfigError(f"{path}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    for field, supported in (("use_dora", False), ("lora_bias", False)):
        if cfg.get(field, supported) != supported:
            raise AdapterConfigError(f"{path}: {field}={cfg[field]!r} is not supported by lowrank (only {supported})")
    if cfg.get("bias", "none") != "none":
        raise AdapterConfigError(f"{path}: bias={cfg['bias']!r} is not supported by lowrank (only 'none')")
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            raise AdapterConfigError(f"{path}: per-module {field} {cfg[field]!r} is not supported by lowrank")
    saved = cfg.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(s, str) for s in saved)):
        raise AdapterConfigError(f"{path}: modules_to_save must be null or a list of names, got {saved!r}")
    return cfg


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    quantize: str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a PEFT (or lowrank) LoRA adapter into ``model``; return it.

    An unprepared model is first prepared from the adapter's config (``quantize`` chooses whether the
    base becomes NF4); a prepared one must have the same targets, rank and scale. Every adapter
    tensor must fit its module: AdapterShapeError names the module and both shapes otherwise.
    """
    directory = os.fspath(directory)
    cfg = read_adapter_config(directory)
    tensors = read_safetensors(os.path.join(directory, ADAPTER_WEIGHTS))
    if getattr(model, "lowrank_config", None) is None:
        layers = cfg.get("layers_to_transform")
        # PEFT lists both classifier names for SEQ_CLS and ignores the absent one; so do we
        names = [n for n, _ in model.named_modules() if n]
        saved = [s for s in cfg.get("modules_to_save") or [] if any(n == s or n.endswith("." + s) for n in names)]
        _models.prepare_model(
            model,
            r=cfg["r"],
            alpha=cfg["lora_alpha"],
            dropout=cfg.get("lora_dropout", 0.0),
            target_modules=cfg["target_modules"],
            quantize=quantize,
            use_rslora=bool(cfg.get("use_rslora", False)),
            modules_to_save=saved,
            layers_to_transform=layers,
            compute_dtype=compute_dtype,
        )
    modules = _lora_modules(model)
    config = model.lowrank_config
    want_scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    for name, module in modules.items():
        if module.r != cfg["r"] or abs(module.scale - want_scale) > 1e-12 * max(1.0, abs(want_scale)):
            raise AdapterShapeError(
                f"{name} has r={module.r}, scale={module.scale}; the adapter has r={cfg['r']}, scale={want_scale}"
            )
    found: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            unexpected.append(key)
            continue
        inner = key[len(PEFT_PREFIX) :]
        hit = _LORA_KEY.match(inner)
        if hit and hit.group("module") in modules:
            found.setdefault(hit.group("module"), {})[hit.group("which")] = value
        elif any(inner.startswith(s + ".") for s in config.modules_to_save):
            extra[inner] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise AdapterShapeError(
            f"adapter keys match no LoRA module of this model: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            f"(expected keys like {PEFT_PREFIX}{next(iter(modules))}.lora_A.weight)"
        )
    missing = [f"{n}.{w}" for n, m in modules.items() for w in ("lora_A", "lora_B") if w not in found.get(n, {})]
    if missing:
        raise AdapterShapeError(f"the adapter lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, pair in found.items():
        module = modules[name]
        for which, value in pair.items():
            target = getattr(module, which)
            if tuple(value.shape) != tuple(target.shape):
                raise AdapterShapeError(
                    f"{name}.{which}: adapter tensor has shape {tuple(value.shape)}, "
                    f"the model needs {tuple(target.shape)} "
                    f"(base layer in={module.in_features}, out={module.out_features}, r={module.r})"
                )
    with torch.no_grad():
        for name, pair in found.items():
            for which, value in pair.items():
                getattr(modules[name], which).copy_(value)
        saved_state = {}
        for inner, value in extra.items():
            owner = next(s for s in config.modules_to_save if inner.startswith(s + "."))
            saved_state.setdefault(owner, {})[inner[len(owner) + 1 :]] = value
        for owner, sd in saved_state.items():
            try:
                model.get_submodule(owner).load_state_dict(sd, strict=True)
            except RuntimeError as err:
                raise AdapterShapeError(f"modules_to_save {owner!r} does not fit the adapter's tensors: {err}") from err
    return model
