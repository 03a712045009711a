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
from lowrank.dtypes import dtype_name, parse_dtype
from lowrank.nn import LinearNF4, LoRAEmbedding, LoRALinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
DEFAULT_ADAPTER = "default"
#: adapter tensors PEFT writes without a ``.weight`` suffix
_PLAIN_KEYS = ("lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
#: PEFT LoraConfig fields lowrank cannot honour, with the value that means "not used"
_UNSUPPORTED = {
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "megatron_config": None,
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "kasa_config": None,
    "use_bdlora": None,
}
_SUPPORTED_INITS = (True, False, "gaussian", "pissa", "olora", "loftq")
#: lowrank's init name -> PEFT's init_lora_weights
_PEFT_INIT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": "loftq"}


def _settings(model: nn.Module, adapter_name: str | None = None) -> _models.LoRASettings:
    if getattr(model, "lowrank_config", None) is None or not _models.adapter_layers(model):
        raise AdapterError("the model carries no LoRA adapters; call lowrank.prepare_model (or load_adapter) first")
    configs = _models.adapter_configs(model)
    if adapter_name is None:
        return model.lowrank_config
    if adapter_name not in configs:
        raise AdapterError(f"adapter {adapter_name!r} does not exist; the model has adapters {list(configs)}")
    return configs[adapter_name]


def _adapter_modules(model: nn.Module, adapter_name: str) -> dict[str, LoRALinear | LoRAEmbedding]:
    return {n: m for n, m in _models.adapter_layers(model).items() if adapter_name in m.adapter_names}


def _tensor_names(module) -> dict[str, str]:
    """attribute -> the key suffix PEFT writes for it."""
    if isinstance(module, LoRAEmbedding):
        return {"lora_embedding_A": "lora_embedding_A", "lora_embedding_B": "lora_embedding_B"}
    names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    if module.use_dora:
        names["lora_magnitude_vector"] = "lora_magnitude_vector"
    return names


def adapter_config_dict(model: nn.Module, adapter_name: str | None = None) -> dict:
    """The adapter_config.json PEFT would write for this prepared model's adapter (default: the first)."""
    config = _settings(model, adapter_name)
    modules = _adapter_modules(model, config.adapter_name)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": base_name,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "lora_bias": False,
        "bias": config.bias,
        "fan_in_fan_out": any(getattr(m, "_lowrank_from_conv1d", False) for m in modules.values()),
        "target_modules": sorted(modules),
        "exclude_modules": config.exclude_modules,
        "modules_to_save": config.modules_to_save_spec or None,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "init_lora_weights": _PEFT_INIT[config.init],
        **({"loftq_config": {"loftq_bits": 4, "loftq_iter": config.loftq_iters}} if config.init == "loftq" else {}),
        "inference_mode": True,
        "revision": None,
    }


#: the metadata value of ``lowrank_quantize`` for an adapter trained on a dense base
DENSE = "none"


def _metadata(model: nn.Module, config: _models.LoRASettings) -> dict[str, str]:
    """safetensors metadata: the base the adapter was trained on, so that :func:`load_adapter` into a fresh
    model rebuilds it (``lowrank_quantize`` ``nf4``/``fp4``/``none``, and for a 4-bit base its blocksize,
    double quantization and compute dtype, read from the model's 4-bit layers)."""
    quantized = [m for m in model.modules() if isinstance(m, LinearNF4)]
    if not quantized:
        return {"lowrank": "adapter", "lowrank_quantize": DENSE}
    kinds = {(m.quant_type, m.blocksize, m.double_quant, m.compute_dtype) for m in quantized}
    if len(kinds) > 1:  # not one prepare_model call's base: record nothing rather than a wrong recipe
        return {"lowrank": "adapter"}
    quant_type, blocksize, double_quant, compute_dtype = kinds.pop()
    return {
        "lowrank": "adapter",
        "lowrank_quantize": quant_type,
        "lowrank_blocksize": str(blocksize),
        "lowrank_double_quant": str(bool(double_quant)).lower(),
        "lowrank_compute_dtype": DENSE if compute_dtype is None else dtype_name(compute_dtype),
    }


def base_recipe(meta: dict[str, str], directory: str = "adapter") -> dict | None:
    """The ``prepare_model`` base options an adapter's metadata records (``quantize``, and for a 4-bit base
    ``blocksize``, ``double_quant``, ``compute_dtype``); None when the adapter records none (PEFT wrote it:
    its adapter_config says nothing about the base's quantization)."""
    kind = meta.get("lowrank_quantize")
    if meta.get("lowrank") != "adapter" or kind is None:
        return None
    if kind == DENSE:
        return {"quantize": None}
    try:
        recipe = {
            "quantize": kind,
            "blocksize": int(meta.get("lowrank_blocksize", "64")),
            "double_quant": {"true": True, "false": False}[meta.get("lowrank_double_quant", "true")],
            "compute_dtype": None
            if meta.get("lowrank_compute_dtype", DENSE) == DENSE
            else parse_dtype(meta["lowrank_compute_dtype"], what="lowrank_compute_dtype"),
        }
    except (KeyError, ValueError) as err:
        raise AdapterConfigError(
            f"{directory}: the adapter's lowrank metadata is not readable ({meta}): {err}"
        ) from err
    if kind not in ("nf4", "fp4"):
        raise AdapterConfigError(
            f"{directory}: lowrank_quantize={kind!r} in the adapter's metadata; expected nf4, fp4 or none"
        )
    return recipe


def _bias_tensors(model: nn.Module, config: _models.LoRASettings) -> dict[str, torch.Tensor]:
    """PEFT's ``bias`` option on disk: the biases trained with the adapter, under their parameter names."""
    if config.bias == "none":
        return {}
    saved = tuple(config.modules_to_save)
    if config.bias == "all":
        return {
            n: p.detach()
            for n, p in model.named_parameters()
            if (n == "bias" or n.endswith(".bias")) and not any(n.startswith(s + ".") for s in saved)
        }
    return {
        f"{name}.base_layer.bias": m.base_layer.bias.detach()
        for name, m in _adapter_modules(model, config.adapter_name).items()
        if m.base_layer.bias is not None
    }


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of adapter_model.safetensors, keyed as PEFT keys them."""
    config = _settings(model, adapter_name)
    tensors = {}
    for name, module in _adapter_modules(model, config.adapter_name).items():
        holder = module.adapter(config.adapter_name)
        names = _tensor_names(module) if holder is module else {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
        for attr, suffix in names.items():
            tensors[f"{PEFT_PREFIX}{name}.{suffix}"] = getattr(holder, attr).detach()
    for name in config.modules_to_save:
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().clone()
    for name, value in _bias_tensors(model, config).items():
        tensors[f"{PEFT_PREFIX}{name}"] = value
    return tensors


def _converted_to_lora(model: nn.Module, adapter_name: str, config: dict, tensors: dict) -> tuple[dict, dict]:
    """PEFT's ``path_initial_model_for_weight_conversion``: a trained PiSSA/OLoRA adapter (A, B) with its
    initial split (A0, B0) becomes a rank-2r LoRA of the ORIGINAL weight, ``A' = [A; A0]``, ``B' = [B, -B0]``,
    alpha doubled (``sqrt(2)``-fold with rsLoRA) so the scale is unchanged: ``W_res + s·B·A = W + s'·B'·A'``."""
    settings = _settings(model, adapter_name)
    if settings.init not in ("pissa", "olora"):
        raise AdapterError(
            f"convert_to_lora=True converts PiSSA/OLoRA adapters; adapter {adapter_name!r} has init={settings.init!r}"
            + (
                " (a LoftQ adapter belongs to its quantized base: write that with save_quantized)"
                if settings.init == "loftq"
                else ""
            )
        )
    growth = 2**0.5 if settings.use_rslora else 2.0
    ranks, alphas = {}, {}
    for name, module in _adapter_modules(model, settings.adapter_name).items():
        if getattr(module, "lora_A_initial", None) is None:
            raise AdapterError(
                f"{name} has no initial PiSSA/OLoRA split to convert against (was it loaded from a file?)"
            )
        A = torch.cat([module.lora_A.detach(), module.lora_A_initial.to(module.lora_A.dtype)], 0)
        B = torch.cat([module.lora_B.detach(), -module.lora_B_initial.to(module.lora_B.dtype)], 1)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = A, B
        ranks[re.escape(name)], alphas[re.escape(name)] = 2 * module.r, module.alpha * growth
    config = dict(config, r=2 * settings.r, lora_alpha=settings.alpha * growth, init_lora_weights=True)
    if settings.rank_pattern or settings.alpha_pattern:
        config.update(rank_pattern=ranks, alpha_pattern=alphas)
    return config, tensors


def _write_adapter(model: nn.Module, directory: str, adapter_name: str, convert_to_lora: bool = False) -> None:
    config = adapter_config_dict(model, adapter_name)
    tensors = adapter_state_dict(model, adapter_name)
    meta = _metadata(model, _settings(model, adapter_name))
    if convert_to_lora and _settings(model, adapter_name).init in ("pissa", "olora", "loftq"):
        config, tensors = _converted_to_lora(model, adapter_name, config, tensors)
        meta = {"lowrank": "adapter", "lowrank_quantize": DENSE}  # a LoRA of the original (dense) weight
    os.makedirs(directory, exist_ok=True)
    # weights first: a directory with a config always has complete weights next to it
    files.write_safetensors(os.path.join(directory, ADAPTER_WEIGHTS), unshared(tensors), meta)
    files.write_json(os.path.join(directory, ADAPTER_CONFIG), dict(sorted(config.items())))


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    convert_to_lora: bool = False,
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by ``PeftModel.from_pretrained``.

    PEFT's multi-adapter layout: the adapter named ``"default"`` goes to ``directory`` itself, any other
    adapter to ``directory/<name>/``. ``adapter_name=None`` writes every adapter of the model; a name
    writes that one only.

    A PiSSA/OLoRA adapter is written as PEFT writes it (``init_lora_weights="pissa"``: it reloads onto the
    original model by redoing the split). ``convert_to_lora=True`` writes it instead as a plain rank-2r LoRA
    of the original weight (PEFT's ``path_initial_model_for_weight_conversion``), which loads anywhere a
    LoRA does and combines with other adapters.
    """
    directory = os.fspath(directory)
    _settings(model)
    names = (
        list(_models.adapter_configs(model)) if adapter_name is None else [_settings(model, adapter_name).adapter_name]
    )
    if convert_to_lora and not any(_settings(model, n).init in ("pissa", "olora") for n in names):
        raise AdapterError(f"convert_to_lora=True converts PiSSA/OLoRA adapters; {names} have none")
    for name in names:
        path = directory if name == DEFAULT_ADAPTER else os.path.join(directory, name)
        _write_adapter(model, path, name, convert_to_lora)


def _describe(module) -> str:
    if isinstance(module, LoRAEmbedding):
        return f"num_embeddings={module.num_embeddings}, embedding_dim={module.embedding_dim}"
    return f"in={module.in_features}, out={module.out_features}"


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


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
    if not _is_number(alpha):
        raise AdapterConfigError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    targets = cfg["target_modules"]
    if not (
        isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        raise AdapterConfigError(
            f"{path}: target_modules must be a regex string or a non-empty list of names, got {targets!r}"
        )
    dropout = cfg.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise AdapterConfigError(f"{path}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(cfg.get("use_dora", False), bool):
        raise AdapterConfigError(f"{path}: use_dora must be true or false, got {cfg['use_dora']!r}")
    for field, unused in _UNSUPPORTED.items():
        value = cfg.get(field, unused)
        if value != unused and not (unused is None and value in ([], {}, "")):
            raise AdapterConfigError(f"{path}: {field}={value!r} is not supported by lowrank (only {unused!r})")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        init = cfg["init_lora_weights"] = "pissa"  # PEFT's fast randomized SVD: the same split, approximately
    if init not in _SUPPORTED_INITS or (init == 1 and init is not True) or (init == 0 and init is not False):
        raise AdapterConfigError(
            f"{path}: init_lora_weights={init!r} is not supported when loading (supported: {list(_SUPPORTED_INITS)})"
        )
    if cfg.get("bias", "none") not in _models.BIAS_CHOICES:
        raise AdapterConfigError(f"{path}: bias={cfg['bias']!r} is not one of {list(_models.BIAS_CHOICES)}")
    for field, check in (
        ("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
        ("alpha_pattern", _is_number),
    ):
        pattern = cfg.get(field) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and check(v) for k, v in pattern.items()):
            raise AdapterConfigError(f"{path}: {field} must map module patterns to numbers, got {pattern!r}")
    excluded = cfg.get("exclude_modules")
    if excluded is not None and not (
        isinstance(excluded, str) or (isinstance(excluded, list) and all(isinstance(e, str) for e in excluded))
    ):
        raise AdapterConfigError(f"{path}: exclude_modules must be null, a regex or a list of names, got {excluded!r}")
    saved = cfg.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(s, str) for s in saved)):
        raise AdapterConfigError(f"{path}: modules_to_save must be null or a list of names, got {saved!r}")
    return cfg


def _options(cfg: dict) -> dict:
    """prepare_model / add_adapter keyword arguments for a PEFT config."""
    layers_pattern = cfg.get("layers_pattern") or None
    layers = cfg.get("layers_to_transform")
    return {
        "r": cfg["r"],
        "alpha": cfg["lora_alpha"],
        "dropout": cfg.get("lora_dropout", 0.0),
        "target_modules": cfg["target_modules"],
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "layers_to_transform": None if layers in (None, []) else layers,
        "rank_pattern": cfg.get("rank_pattern") or None,
        "alpha_pattern": cfg.get("alpha_pattern") or None,
        "exclude_modules": cfg.get("exclude_modules") or None,
        "layers_pattern": layers_pattern if layers not in (None, []) else None,
    }


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    quantize: str | None = "auto",
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a PEFT (or lowrank) LoRA adapter from ``directory`` into ``model``; return it.

    An unprepared model is first prepared from the adapter's config. ``quantize="auto"`` rebuilds the base
    the adapter was trained on: lowrank records it in the adapter's safetensors metadata (``nf4``/``fp4``
    with blocksize, double quantization and compute dtype, or ``none``), so a QLoRA adapter gets the same
    4-bit bytes back; an adapter without that record (PEFT writes none: its adapter_config does not say how
    the base was quantized) gets a dense base, as PEFT loads it. ``"nf4"`` / ``"fp4"`` / None choose the
    base instead (a recorded blocksize etc. is kept when the kind matches); ``compute_dtype`` overrides
    the recorded one. A model whose layers are already 4-bit (``load_quantized``) keeps them. The adapter
    is named ``adapter_name`` (default ``"default"``). On a prepared model, ``adapter_name`` None or an
    existing name loads into that adapter (it must have the same targets, ranks and scales); a new name
    adds the adapter (inactive, as PEFT's ``load_adapter``; ``set_adapter`` activates it).
    Every adapter tensor must fit its module: AdapterShapeError names the module and both shapes otherwise.
    """
    directory = os.fspath(directory)
    cfg = read_adapter_config(directory)
    tensors = read_safetensors(os.path.join(directory, ADAPTER_WEIGHTS))
    options = _options(cfg)
    init = cfg.get("init_lora_weights", True)
    if quantize not in ("auto", None, "nf4", "fp4"):
        raise AdapterConfigError(f"quantize must be 'auto', 'nf4', 'fp4' or None, got {quantize!r}")
    if getattr(model, "lowrank_config", None) is None:
        meta = files.read_safetensors_metadata(os.path.join(directory, ADAPTER_WEIGHTS))
        recipe = base_recipe(meta, directory) or {"quantize": None}
        prequantized = any(isinstance(m, LinearNF4) for m in model.modules())
        if quantize == "auto":
            base = dict(recipe)
        elif quantize is not None and recipe["quantize"] == quantize:
            base = dict(recipe)  # the asked-for kind with the recorded blocksize / double quant / compute dtype
        else:
            base = {"quantize": quantize}
        lowrank_init = "kaiming"
        if init in ("pissa", "olora", "loftq") and not prequantized:
            # the adapter was trained against the residual of W: rebuild that base from the original weight
            if init == "loftq" and meta.get("lowrank") != "adapter":
                raise AdapterConfigError(
                    f"{directory}: init_lora_weights='loftq' written by PEFT: its adapter belongs to the LoftQ base "
                    "PEFT saved with it (load that checkpoint with load_quantized, then this adapter)"
                )
            if init == "loftq" and base["quantize"] is None:
                base = dict(recipe) if recipe["quantize"] else {"quantize": "nf4"}
            lowrank_init = init
            loftq = cfg.get("loftq_config") or {}
            options["loftq_iters"] = int(loftq.get("loftq_iter", 1)) if isinstance(loftq, dict) else 1
        if compute_dtype is not None:
            base["compute_dtype"] = compute_dtype
        options.update(base)
        # PEFT lists both classifier names for SEQ_CLS and ignores the absent one; so do we
        names = [n for n, _ in model.named_modules() if n]
        saved = [s for s in cfg.get("modules_to_save") or [] if any(n == s or n.endswith("." + s) for n in names)]
        _models.prepare_model(
            model,
            **options,
            modules_to_save=saved,
            bias=cfg.get("bias", "none"),
            adapter_name=adapter_name or DEFAULT_ADAPTER,
            init=lowrank_init,
            use_dora=bool(cfg.get("use_dora", False)),
        )
        name = adapter_name or DEFAULT_ADAPTER
    elif adapter_name is None or adapter_name in _models.adapter_configs(model):
        name = adapter_name or model.lowrank_config.adapter_name
    else:
        if cfg.get("use_dora"):
            raise AdapterConfigError(
                f"{directory}: a further adapter ({adapter_name!r}) with use_dora=true is not supported: DoRA is "
                "available for a model's first adapter (load it into an unprepared model)"
            )
        if init in ("pissa", "olora", "loftq"):
            raise AdapterConfigError(
                f"{directory}: a further adapter ({adapter_name!r}) with init_lora_weights={init!r} needs its own "
                "residual base weight, which the model's other adapters share; convert it to a plain LoRA first"
            )
        if cfg.get("modules_to_save") or cfg.get("bias", "none") != "none":
            raise AdapterConfigError(
                f"{directory}: a further adapter ({adapter_name!r}) cannot carry modules_to_save or bias (got "
                f"modules_to_save={cfg.get('modules_to_save')!r}, bias={cfg.get('bias')!r}); "
                "load it as the first adapter"
            )
        _models.add_adapter(model, adapter_name, **options)
        name = adapter_name
    config = _models.adapter_configs(model)[name]
    modules = _adapter_modules(model, name)
    for module_name, module in modules.items():
        holder = module.adapter(name)
        r = _models.pattern_value(cfg.get("rank_pattern"), module_name, cfg["r"])
        alpha = _models.pattern_value(cfg.get("alpha_pattern"), module_name, cfg["lora_alpha"])
        want_scale = alpha / (r**0.5 if cfg.get("use_rslora") else r)
        if holder.r != r or abs(holder.scale - want_scale) > 1e-12 * max(1.0, abs(want_scale)):
            raise AdapterShapeError(
                f"{module_name} (adapter {name!r}) has r={holder.r}, scale={holder.scale}; the adapter file has "
                f"r={r}, scale={want_scale}"
            )
    params = dict(model.named_parameters())
    found: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    base_weights: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            unexpected.append(key)
            continue
        inner = key[len(PEFT_PREFIX) :]
        hit = _LORA_KEY.match(inner)
        if hit and hit.group("module") in modules:
            found.setdefault(hit.group("module"), {})[hit.group("which")] = value
        elif inner.rpartition(".")[2] in _PLAIN_KEYS and inner.rpartition(".")[0] in modules:
            owner, _, attr = inner.rpartition(".")
            found.setdefault(owner, {})[attr] = value
        elif any(inner.startswith(s + ".") for s in config.modules_to_save):
            extra[inner] = value
        elif inner.endswith(".bias") and inner in params:
            biases[inner] = value
        elif inner.endswith(".base_layer.weight") and inner.removesuffix(".base_layer.weight") in modules:
            # PEFT saves the base weight of targeted embedding-like layers (lm_head) next to the adapter
            base_weights[inner.removesuffix(".base_layer.weight")] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise AdapterShapeError(
            f"adapter keys match no LoRA module of this model: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            f"(expected keys like {PEFT_PREFIX}{next(iter(modules))}.lora_A.weight)"
        )
    keys = {n: list(_tensor_names(m)) if m.adapter_name == name else ["lora_A", "lora_B"] for n, m in modules.items()}
    missing = [f"{n}.{w}" for n in modules for w in keys[n] if w not in found.get(n, {})]
    if missing:
        raise AdapterShapeError(f"the adapter lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for module_name, pair in found.items():
        module = modules[module_name]
        holder = module.adapter(name)
        for which, value in pair.items():
            if which not in keys[module_name]:
                raise AdapterShapeError(
                    f"{module_name}: the adapter has {which!r} but the layer ({type(module).__name__}, "
                    f"use_dora={module.use_dora}) takes {keys[module_name]}"
                )
            target = getattr(holder, which)
            if tuple(value.shape) != tuple(target.shape):
                raise AdapterShapeError(
                    f"{module_name}.{which}: adapter tensor has shape {tuple(value.shape)}, "
                    f"the model needs {tuple(target.shape)} "
                    f"(base layer {_describe(module)}, r={holder.r})"
                )
    for key, value in biases.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise AdapterShapeError(
                f"{key}: adapter tensor has shape {tuple(value.shape)}, the model needs {tuple(params[key].shape)}"
            )
    for module_name, value in base_weights.items():
        base = modules[module_name].base_layer
        if not isinstance(base, (nn.Linear, nn.Embedding)) or tuple(value.shape) != tuple(base.weight.shape):
            raise AdapterShapeError(
                f"{module_name}.base_layer.weight: the adapter stores a {tuple(value.shape)} base weight but the "
                f"model's base is {type(base).__name__} {tuple(base.weight.shape)}"
            )
    with torch.no_grad():
        for module_name, pair in found.items():
            for which, value in pair.items():
                getattr(modules[module_name].adapter(name), which).copy_(value)
        for key, value in biases.items():
            params[key].copy_(value)
        for module_name, value in base_weights.items():
            modules[module_name].base_layer.weight.copy_(value)
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
