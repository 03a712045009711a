"""Files: PEFT-compatible adapters, merged dense models, and bitsandbytes-format 4-bit checkpoints.

Only safetensors and JSON are read or written, and every file is written to a temporary name in the
target directory and renamed into place, so an interrupted save never leaves a half-written file.

* :func:`save_adapter` / :func:`load_adapter`: ``adapter_config.json`` + ``adapter_model.safetensors``
  exactly as PEFT writes them (keys ``base_model.model.<module>.lora_A.weight``, target_modules
  expanded to full module names, ``task_type`` from the model class).
* :func:`merge_adapters`: a plain transformers model (nn.Linear / Conv1D) with ``W + scale·B·A``,
  computed in fp32 from ``dequant(W4)`` for 4-bit bases (never re-quantized).
* :func:`save_quantized` / :func:`load_quantized`: transformers' pre-quantized bitsandbytes layout
  (``config.json`` with ``quantization_config`` + ``model.safetensors`` with Linear4bit keys), loaded
  here without bitsandbytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lowrank import models as _models
from lowrank.nf4 import QuantStateError
from lowrank.nn import LinearNF4, LoRALinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class AdapterError(ValueError):
    """Base class of lowrank's file errors."""


class AdapterConfigError(AdapterError):
    """adapter_config.json (or a checkpoint's config.json) is missing, unreadable or has wrong fields."""


class AdapterFileError(AdapterError):
    """A safetensors file is missing, truncated or not safetensors."""


class AdapterShapeError(AdapterError):
    """Adapter tensors do not fit the model (wrong base shapes, missing or unexpected keys)."""


class QuantizedCheckpointError(AdapterError):
    """A 4-bit checkpoint is not in bitsandbytes' format or does not fit the model class."""


# -- atomic writes and safe reads -------------------------------------------------------------------


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_json(path: str, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(path, write)


def _write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    out, storages = {}, set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.numel() and value.untyped_storage().data_ptr() in storages:
            value = value.clone()  # safetensors refuses tensors that share memory
        storages.add(value.untyped_storage().data_ptr())
        out[key] = value
    tensors = out
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))


def _read_json(path: str, error: type[AdapterError]) -> dict:
    if not os.path.isfile(path):
        raise error(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise error(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on CPU; AdapterFileError if it is missing or damaged."""
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{path} is not a complete safetensors file (truncated or corrupted?): {err}") from err


# -- PEFT adapters ----------------------------------------------------------------------------------


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
    _write_safetensors(os.path.join(directory, ADAPTER_WEIGHTS), tensors, {"lowrank": "adapter"})
    _write_json(os.path.join(directory, ADAPTER_CONFIG), config)


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """Read and check adapter_config.json; AdapterConfigError names the missing or wrong field."""
    path = os.path.join(os.fspath(directory), ADAPTER_CONFIG)
    cfg = _read_json(path, AdapterConfigError)
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


# -- merging -----------------------------------------------------------------------------------------


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
def merge_adapters(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRALinear / LinearNF4 by a dense layer holding ``dequant(W) + scale·B·A``.

    The sum is computed in fp32 and stored in ``dtype`` (default: the base weight's original dtype,
    e.g. bf16 for a bf16 model); 4-bit weights are never re-quantized. GPT-2 layers become Conv1D
    again. Returns the plain transformers model (``save_pretrained`` then writes a dense checkpoint).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            base = module.base_layer
            out_dtype = dtype or (base.weight_dtype if isinstance(base, LinearNF4) else base.weight.dtype)
            weight = module.merged_dense(out_dtype)
            bias = base.bias
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
    for attr in ("lowrank_config", "lowrank_bytes_before", "lowrank_summary"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


# -- bitsandbytes 4-bit checkpoints -------------------------------------------------------------------


def _base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapters, with LoRALinear bases under their module's own name."""
    lora_names = set(_lora_modules(model))
    sd = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if leaf in ("lora_A", "lora_B") and owner in lora_names:
            continue
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
    cfg["dtype"] = _DTYPE_NAMES[model_dtype]
    cfg.pop("torch_dtype", None)
    cfg["quantization_config"] = {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": _DTYPE_NAMES[compute_dtype],
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
    _write_safetensors(os.path.join(directory, MODEL_WEIGHTS), _base_state_dict(model))
    _write_json(os.path.join(directory, MODEL_CONFIG), cfg)


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device (buffers stay real): the skeleton costs no memory."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(module._parameters[name])
            module._parameters[name] = kind(module._parameters[name].to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


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
    cfg = _read_json(os.path.join(directory, MODEL_CONFIG), QuantizedCheckpointError)
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
    dtype = {name: dtype for dtype, name in _DTYPE_NAMES.items()}.get(dtype_name)
    if dtype is None:
        raise QuantizedCheckpointError(
            f"config.json dtype {dtype_name!r} is not one of {sorted(_DTYPE_NAMES.values())}"
        )
    config_class = getattr(model_class, "config_class", None)
    if isinstance(config_class, type) and not isinstance(config, config_class):
        raise QuantizedCheckpointError(
            f"the checkpoint's config is a {type(config).__name__} but {model_class.__name__} "
            f"needs a {config_class.__name__}"
        )
    with _parameters_on_meta():
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
