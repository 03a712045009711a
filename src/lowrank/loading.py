"""Streamed loading: ``lowrank.from_pretrained(dir)`` builds a 4-bit model without ever holding the dense one.

The steps (``docs/big_models.md`` says why each step is done this way, and the memory bounds):

1. ``config.json`` names the architecture (``architectures[0]``, or ``auto_class=``); the model is built
   with every **parameter on the meta device** (buffers such as rotary frequencies stay real: they are
   computed, not loaded).
2. The checkpoint's headers (``model.safetensors`` or every shard of ``model.safetensors.index.json``) are
   read first: every key is matched to a parameter (``base_model_prefix`` added or stripped as
   transformers does) and every shape is checked against the model before one byte of data is read.
3. Tensors are then read **one at a time**, each through its own short ``safe_open`` (so no shard stays
   memory-mapped: a long-lived map keeps the touched pages of a whole shard resident). A weight of a
   linear layer that ``prepare_model`` would quantize is moved to ``device``, cast to ``dtype`` and
   quantized at once into a :class:`~lowrank.nn.LinearNF4`; the dense copy is dropped before the next
   tensor is read. Every other tensor is copied to ``device`` in ``dtype``.
4. A bitsandbytes 4-bit checkpoint (``quantization_config`` in config.json, ``*.weight.quant_state.*``
   keys; transformers and :func:`lowrank.save_quantized` write these) is read layer by layer into
   ``LinearNF4`` with the stored bytes, never dequantized.
5. A lowrank-prepared checkpoint (``transformers.Trainer``'s ``checkpoint-N/`` of a prepared model, see
   :mod:`lowrank.saving`) is rebuilt by :func:`from_pretrained`: ``prepare_model`` / ``add_adapter`` replayed
   on the meta skeleton from the recorded settings, then the whole state dict assigned (not streamed).

Tied parameters are one Parameter object in the built model; loading assigns the new tensor to every
module that shared it, so they stay tied. Any error (missing file, truncated or corrupted shard, a
shape that disagrees with the config, an unknown architecture, base weights missing) raises
:class:`CheckpointLoadError` naming the file and the tensor; the partly built model is discarded.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import re
import types
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowrank import adapters as _adapters
from lowrank import files, nf4
from lowrank import models as _models
from lowrank import saving as _saving
from lowrank.dtypes import parse_dtype
from lowrank.nn import LinearNF4

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_QUANT_STATE = ".weight.quant_state.bitsandbytes__"
_BNB_SUFFIXES = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map")
# safetensors dtype codes -> torch dtypes (the header names them so)
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointLoadError(files.FileFormatError):
    """A checkpoint directory cannot be loaded as asked; the message names the file and the tensor."""


@dataclass(frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: str


# -- reading the checkpoint's layout ------------------------------------------------------------------


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError: truncated, corrupted header, not a safetensors file
        raise CheckpointLoadError(
            f"safetensors file {path} cannot be read ({e}); it may be truncated or corrupted"
        ) from None


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (the index's shards, or ``model.safetensors``)."""
    index = directory / INDEX
    if index.is_file():
        data = files.read_json(index, what="checkpoint index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointLoadError(f"checkpoint index {index} has no 'weight_map' of tensor names to files")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise CheckpointLoadError(f"checkpoint index {index} names {shard!r}, not a file in {directory}")
            if not (directory / shard).is_file():
                tensor = next(k for k, v in weight_map.items() if v == shard)
                raise CheckpointLoadError(
                    f"checkpoint index {index} maps tensor {tensor!r} (and others) to {shard}, "
                    f"which does not exist in {directory}"
                )
        return [directory / s for s in shards]
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    raise CheckpointLoadError(
        f"{directory} holds neither {SINGLE} nor {INDEX} (only safetensors checkpoints are read; "
        "convert a pytorch_model.bin with transformers first)"
    )


def read_layout(directory: Path) -> dict[str, _Entry]:
    """Every tensor name of the checkpoint with its file, shape and dtype (headers only, no data)."""
    layout: dict[str, _Entry] = {}
    index_map = None
    if (directory / INDEX).is_file():
        index_map = files.read_json(directory / INDEX, what="checkpoint index")["weight_map"]
    for path in weight_files(directory):
        with _safe_open(path) as f:
            for key in f.keys():
                piece = f.get_slice(key)
                if key in layout:
                    raise CheckpointLoadError(f"tensor {key!r} is stored twice: in {layout[key].file} and {path}")
                layout[key] = _Entry(path, tuple(int(s) for s in piece.get_shape()), piece.get_dtype())
    if index_map is not None:
        wrong = sorted(k for k in index_map if k not in layout or layout[k].file.name != index_map[k])
        if wrong:
            found = f"it is in {layout[wrong[0]].file.name}" if wrong[0] in layout else "no shard has it"
            raise CheckpointLoadError(
                f"checkpoint index {directory / INDEX} lists tensor {wrong[0]!r} in {index_map[wrong[0]]}, "
                f"which does not contain it ({found}; {len(wrong)} entries disagree with the shards)"
            )
    return layout


def _read(key: str, entry: _Entry) -> torch.Tensor:
    """One tensor, read through its own short-lived map (the shard's pages are released afterwards)."""
    with _safe_open(entry.file) as f:
        try:
            tensor = f.get_tensor(key)
        except Exception as e:
            raise CheckpointLoadError(f"tensor {key!r} in {entry.file} cannot be read ({e})") from None
    return tensor


def _copy_to(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """An owned copy on ``device`` (never a view of the file's map, which would keep its pages resident)."""
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype, copy=True)
    return tensor.to(device=device, copy=True)


# -- building the skeleton ----------------------------------------------------------------------------


def _model_class(directory: Path, cfg: dict, auto_class):
    import transformers

    if auto_class is not None:
        return auto_class
    archs = cfg.get("architectures") or []
    if not archs:
        raise CheckpointLoadError(
            f"{directory / CONFIG} has no 'architectures' entry: pass auto_class= "
            "(e.g. transformers.AutoModelForCausalLM)"
        )
    cls = getattr(transformers, str(archs[0]), None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise CheckpointLoadError(
            f"{directory / CONFIG} names architecture {archs[0]!r}, which transformers "
            f"{transformers.__version__} does not provide: pass auto_class= or update transformers"
        )
    return cls


def _build(directory: Path, cfg: dict, auto_class, dtype: torch.dtype, config_overrides: dict | None) -> nn.Module:
    import transformers

    clean = {k: v for k, v in cfg.items() if k not in ("quantization_config", "transformers_weights")}
    try:
        config = transformers.AutoConfig.for_model(**clean)
    except (ValueError, KeyError) as e:
        raise CheckpointLoadError(f"{directory / CONFIG} is not a transformers config: {e}") from None
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    cls = _model_class(directory, cfg, auto_class)
    try:
        with _models.parameters_on_meta():
            if hasattr(cls, "from_config") and not hasattr(cls, "_from_config"):  # an Auto class
                return cls.from_config(config, dtype=dtype)
            config_class = getattr(cls, "config_class", None)
            if isinstance(config_class, type) and not isinstance(config, config_class):
                raise CheckpointLoadError(
                    f"{directory / CONFIG} describes a {type(config).__name__} but {cls.__name__} "
                    f"needs a {config_class.__name__}"
                )
            return cls._from_config(config, dtype=dtype)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        if isinstance(e, CheckpointLoadError):
            raise
        raise CheckpointLoadError(
            f"cannot build {getattr(cls, '__name__', cls)} from {directory / CONFIG}: {e}"
        ) from None


# -- matching checkpoint keys to the model ------------------------------------------------------------


def _match_key(key: str, known: set[str], prefix: str) -> str | None:
    """The model's name for checkpoint ``key`` (transformers' base_model_prefix rule), or None."""
    if key in known:
        return key
    if prefix and f"{prefix}.{key}" in known:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in known:
        return key[len(prefix) + 1 :]
    return None


def _patterns(model: nn.Module, attr: str) -> list[re.Pattern]:
    return [re.compile(p) for p in (getattr(model, attr, None) or [])]


def quantization_plan(model: nn.Module, modules_to_save: Iterable[str] | None) -> set[str]:
    """Names of the linear layers :func:`lowrank.prepare_model` quantizes: every linear layer except the
    output head(s) and ``modules_to_save`` (by default a sequence classifier's head, as prepare_model does)."""
    heads = _models.output_head_names(model)
    children = dict(model.named_children())
    if modules_to_save is None and _models.task_type_of(model) == "SEQ_CLS":
        modules_to_save = [n for n in ("classifier", "score") if n in children]
    names = [n for n, _ in model.named_modules() if n]
    saved = [n for spec in (modules_to_save or []) for n in names if n == spec or n.endswith("." + spec)]
    in_saved = lambda n: any(n == s or n.startswith(s + ".") for s in saved)  # noqa: E731
    return {n for n in _models.linear_module_names(model) if n not in heads and not in_saved(n)}


def _bnb_config(directory: Path, cfg: dict) -> dict | None:
    qcfg = cfg.get("quantization_config")
    if qcfg is None:
        return None
    if not isinstance(qcfg, dict):
        raise CheckpointLoadError(f"{directory / CONFIG}: quantization_config is not an object")
    method = qcfg.get("quant_method")
    if method == _saving.PREPARED_QUANT_METHOD:
        raise CheckpointLoadError(
            f"{directory} is a lowrank-prepared checkpoint (a transformers.Trainer checkpoint-N/ or "
            "save_pretrained(dir, state_dict=...) of a prepared model): lowrank.from_pretrained(dir) loads it with "
            "its adapters; load_pretrained reads plain and bitsandbytes 4-bit checkpoints only"
        )
    if method != "bitsandbytes" or not qcfg.get("load_in_4bit", qcfg.get("_load_in_4bit")):
        raise CheckpointLoadError(
            f"{directory / CONFIG}: quantization_config quant_method={method!r}, "
            f"load_in_4bit={qcfg.get('load_in_4bit')!r}; lowrank reads bitsandbytes 4-bit checkpoints only"
        )
    return qcfg


# -- the loader ---------------------------------------------------------------------------------------


class _Loader:
    def __init__(self, directory: Path, model: nn.Module, layout: dict[str, _Entry], device, dtype):
        self.directory = directory
        self.model = model
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self.modules = dict(model.named_modules())
        # each parameter object once, with every (module, leaf) that holds it: loading keeps ties
        self.holders: dict[int, list[tuple[nn.Module, str]]] = {}
        self.param_names: dict[int, list[str]] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            for leaf, p in module._parameters.items():
                if p is not None:
                    self.holders.setdefault(id(p), [])
                    if (module, leaf) not in [(m, lf) for m, lf in self.holders[id(p)]]:
                        self.holders[id(p)].append((module, leaf))
                    name = f"{mname}.{leaf}" if mname else leaf
                    self.param_names.setdefault(id(p), [])
                    if name not in self.param_names[id(p)]:
                        self.param_names[id(p)].append(name)
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.buffers = {n for n, _ in model.named_buffers()}
        self.loaded: set[int] = set()
        fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
        self.keep_fp32 = [str(m) for m in fp32]

    def where(self, key: str) -> str:
        return f"tensor {key!r} in {self.layout[key].file}"

    def target_dtype(self, name: str, current: torch.Tensor) -> torch.dtype | None:
        if not current.is_floating_point():
            return None
        if any(f".{m}." in f".{name}." for m in self.keep_fp32):
            return torch.float32
        return self.dtype if name in self.params else current.dtype

    def set_param(self, name: str, value: torch.Tensor) -> None:
        old = self.params[name]
        new = nn.Parameter(value, requires_grad=False)
        for module, leaf in self.holders[id(old)]:
            module._parameters[leaf] = new
        self.loaded.add(id(old))

    def set_buffer(self, name: str, value: torch.Tensor) -> None:
        owner, _, leaf = name.rpartition(".")
        module = self.modules[owner]
        current = module._buffers[leaf]
        if current is not None and tuple(current.shape) != tuple(value.shape):
            raise CheckpointLoadError(
                f"{self.where(name)} has shape {tuple(value.shape)}, expected {tuple(current.shape)}"
            )
        module._buffers[leaf] = value


def _layer_of(key: str) -> str:
    """The layer a weight/bias key (or one of bitsandbytes' ``weight.*`` entries) belongs to."""
    if ".weight." in key:
        return key.split(".weight.", 1)[0]
    for leaf in (".weight", ".bias"):
        if key.endswith(leaf):
            return key[: -len(leaf)]
    return key


def _check_shape(loader: _Loader, key: str, name: str, expected: tuple[int, ...]) -> None:
    got = loader.layout[key].shape
    if tuple(got) != tuple(expected):
        raise CheckpointLoadError(
            f"{loader.where(key)} has shape {tuple(got)} but {type(loader.model).__name__} "
            f"built from {loader.directory / CONFIG} expects {tuple(expected)} for {name!r}"
        )


def _linear_weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer; Conv1D stores its weight transposed."""
    w = module.weight
    if bool(_models.Conv1D) and isinstance(module, _models.Conv1D):
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w.shape[1])


def load_pretrained(
    path,
    *,
    quantize: str | None = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str | None = None,
    auto_class=None,
    config_overrides: dict | None = None,
    modules_to_save: Iterable[str] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Stream a checkpoint into a frozen model whose linear layers are 4-bit (no LoRA adapters yet).

    This is :func:`from_pretrained` without the final :func:`lowrank.prepare_model`; the CLI uses it and
    prepares the model itself. ``quantize=None`` loads every layer dense in ``dtype`` (streamed all the same).
    """
    directory = Path(path)
    if quantize not in (None, "nf4", "fp4"):
        raise ValueError(f"quantize must be 'nf4', 'fp4' or None, got {quantize!r}")
    dtype = parse_dtype(dtype, what="dtype")
    device = torch.device("cpu" if device is None else device)
    if not directory.is_dir():
        raise CheckpointLoadError(f"model directory {directory} does not exist")
    cfg = files.read_json(directory / CONFIG, what="model config")
    if not isinstance(cfg, dict):
        raise CheckpointLoadError(f"{directory / CONFIG} is not a JSON object")
    qcfg = _bnb_config(directory, cfg)
    layout = read_layout(directory)
    bnb_layers = {k.split(_QUANT_STATE, 1)[0] for k in layout if _QUANT_STATE in k}
    if qcfg is not None and not bnb_layers:
        raise CheckpointLoadError(
            f"{directory / CONFIG} declares a bitsandbytes 4-bit quantization_config but no tensor of "
            f"{sorted({e.file.name for e in layout.values()})} is a '*{_QUANT_STATE}*' quant state"
        )
    if bnb_layers and quantize is None:
        raise CheckpointLoadError(
            f"{directory} is a 4-bit checkpoint ({len(bnb_layers)} quantized layers): load it with quantize='nf4' "
            "(the stored format is kept), or dequantize it with lowrank.merge_adapters after loading"
        )
    model = _build(directory, cfg, auto_class, dtype, config_overrides)
    loader = _Loader(directory, model, layout, device, dtype)
    prefix = getattr(model, "base_model_prefix", "") or ""
    to_quantize = set() if quantize is None or bnb_layers else quantization_plan(model, modules_to_save)

    # 1. match every checkpoint key and check every shape before reading any data
    known = set(loader.params) | loader.buffers
    bnb_modules: dict[str, str] = {}  # checkpoint layer name -> model module name
    for layer in sorted(bnb_layers):
        target = _match_key(f"{layer}.weight", set(loader.params), prefix)
        if target is None:
            key = f"{layer}{_QUANT_STATE}"
            key = next(k for k in layout if k.startswith(key))
            raise CheckpointLoadError(
                f"{loader.where(key)}: 4-bit layer {layer!r} is not a layer of {type(model).__name__}"
            )
        bnb_modules[layer] = target[: -len(".weight")]
    ignore_unexpected = _patterns(model, "_keys_to_ignore_on_load_unexpected")
    bnb_keys: dict[str, dict[str, str]] = {m: {} for m in bnb_modules.values()}  # module -> {model key: ckpt key}
    mapping: dict[str, str] = {}  # model name -> checkpoint key
    unexpected = []
    for key in layout:
        layer = _layer_of(key)
        if layer in bnb_modules:
            module_name = bnb_modules[layer]
            bnb_keys[module_name][module_name + key[len(layer) :]] = key
            continue
        if _QUANT_STATE in key or key.endswith(_BNB_SUFFIXES):
            raise CheckpointLoadError(f"{loader.where(key)} is 4-bit metadata of {layer!r}, which has no quant state")
        name = _match_key(key, known, prefix)
        if name is None:
            if not any(p.search(key) for p in ignore_unexpected):
                unexpected.append(key)
            continue
        if name in mapping:
            continue  # a tied alias stored twice: the first copy wins
        mapping[name] = key
        if name in loader.params:
            _check_shape(loader, key, name, tuple(loader.params[name].shape))
        else:
            owner, _, leaf = name.rpartition(".")
            buf = loader.modules[owner]._buffers[leaf]
            if buf is not None:
                _check_shape(loader, key, name, tuple(buf.shape))
    if unexpected:
        warnings.warn(
            f"{len(unexpected)} tensors of {directory} are not used by {type(model).__name__}: {unexpected[:5]}",
            stacklevel=2,
        )

    # 2. every parameter must come from the checkpoint, except freshly added heads (initialised as transformers does)
    covered = {id(loader.params[n]) for n in mapping if n in loader.params}
    for module_name, keys in bnb_keys.items():
        module = loader.modules[module_name]
        covered.add(id(module.weight))
        if getattr(module, "bias", None) is not None:
            if f"{module_name}.bias" not in keys:
                raise CheckpointLoadError(
                    f"{directory} has no tensor for {module_name}.bias (4-bit layer "
                    f"{loader.where(keys.get(module_name + '.weight', next(iter(keys.values()))))})"
                )
            covered.add(id(module.bias))
    ignore_missing = _patterns(model, "_keys_to_ignore_on_load_missing")
    heads = set(_models.HEAD_NAMES)
    new_heads: set[str] = set()
    for pid, names in loader.param_names.items():
        if pid in covered:
            continue
        name = names[0]
        top = name.split(".", 1)[0]
        if top in heads or any(p.search(name) for p in ignore_missing):
            new_heads.add(name)
            continue
        raise CheckpointLoadError(
            f"{directory} has no tensor for parameter {name!r} of {type(model).__name__} "
            f"(looked in {sorted({e.file.name for e in layout.values()})}); refusing to leave it uninitialised"
        )

    # 3. stream the data, one tensor (or one 4-bit layer) at a time
    for module_name, keys in bnb_keys.items():
        _load_bnb_layer(loader, module_name, keys, compute_dtype)
    for name, key in mapping.items():
        layer, _, leaf = name.rpartition(".")
        if layer in to_quantize:
            if leaf == "weight":
                _load_quantized_layer(loader, layer, mapping, quantize, blocksize, double_quant, compute_dtype)
            continue  # the bias travels with its weight
        if name in loader.buffers:
            owner, _, bleaf = name.rpartition(".")
            current = loader.modules[owner]._buffers[bleaf]
            value = _read(key, layout[key])
            want = current.dtype if current is not None and current.is_floating_point() else None
            loader.set_buffer(name, _copy_to(value, device, want))
            continue
        param = loader.params[name]
        if id(param) in loader.loaded:
            continue
        value = _read(key, layout[key])
        loader.set_param(name, _copy_to(value, device, loader.target_dtype(name, param)))

    # 4. new heads: initialised like transformers initialises missing weights
    for name in sorted(new_heads):
        param = loader.params[name]
        if id(param) in loader.loaded:
            continue
        value = torch.empty(param.shape, dtype=loader.target_dtype(name, param), device=device)
        loader.set_param(name, value)
    for owner in sorted({n.rpartition(".")[0] for n in new_heads}):
        init = getattr(model, "_init_weights", None)
        if callable(init):
            with torch.no_grad():
                init(model.get_submodule(owner))
    if new_heads:
        warnings.warn(
            f"{type(model).__name__}: {sorted(new_heads)} are not in {directory} and were newly initialised",
            stacklevel=2,
        )

    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise CheckpointLoadError(f"{directory} left parameters {still_meta[:5]} of {type(model).__name__} unloaded")
    for module in model.modules():  # built buffers (rotary frequencies, position ids) follow the model
        for leaf, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[leaf] = buf.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    _generation_config(model, directory)
    if any(isinstance(m, LinearNF4) for m in model.modules()):
        model.save_pretrained = types.MethodType(_save_4bit_pretrained, model)
    return model.eval()


_SAVE_OPTIONS = ("safe_serialization", "is_main_process")


def _save_4bit_pretrained(self, save_directory, **kwargs):
    """``save_pretrained`` of a loaded (not prepared) 4-bit model: the bitsandbytes format that transformers
    (+ bitsandbytes) and :func:`from_pretrained` read back with identical logits (:func:`lowrank.save_quantized`)."""
    unsupported = sorted(set(kwargs) - set(_SAVE_OPTIONS))
    if unsupported:
        raise TypeError(
            f"save_pretrained of a lowrank 4-bit model writes lowrank.save_quantized's files and takes no {unsupported}"
        )
    if kwargs.get("safe_serialization", True) is False:
        raise ValueError("lowrank writes safetensors only (safe_serialization=False is not supported)")
    if kwargs.get("is_main_process", True):
        _adapters.save_quantized(self, save_directory)


def _glibc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to release
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def _release_freed_heap() -> None:
    """Give the pages of freed temporaries back to the OS (glibc keeps freed heap memory mapped; without
    this, the quantizer's temporaries add up to ~100 MB of peak RSS over a streamed load on the torch
    backend). A few ms per weight."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _load_quantized_layer(loader: _Loader, layer: str, mapping, quant_type, blocksize, double_quant, compute_dtype):
    module = loader.modules[layer]
    key = mapping[f"{layer}.weight"]
    dense = _read(key, loader.layout[key]).to(device=loader.device, dtype=loader.dtype)
    is_conv1d = bool(_models.Conv1D) and isinstance(module, _models.Conv1D)
    if is_conv1d:
        dense = dense.t().contiguous()
    weight = nf4.quantize(dense, blocksize, double_quant, quant_type)
    del dense
    _release_freed_heap()
    bias = None
    if getattr(module, "bias", None) is not None:
        bkey = mapping.get(f"{layer}.bias")
        if bkey is None:
            raise CheckpointLoadError(
                f"{loader.directory} has no tensor for {layer}.bias (its weight is {loader.where(key)})"
            )
        bias = _copy_to(_read(bkey, loader.layout[bkey]), loader.device, loader.dtype)
    new = LinearNF4(weight, bias, compute_dtype)
    new._lowrank_from_conv1d = is_conv1d
    _models._set_module(loader.model, layer, new)
    for leaf in ("weight", "bias"):
        p = module._parameters.get(leaf)
        if p is not None:
            loader.loaded.add(id(p))


def _load_bnb_layer(loader: _Loader, module_name: str, keys: dict[str, str], compute_dtype):
    weight_name = f"{module_name}.weight"
    module = loader.modules[module_name]
    if not _models._is_linear(module):
        raise CheckpointLoadError(
            f"{loader.where(keys[weight_name])}: 4-bit layer {module_name!r} is a {type(module).__name__}, not linear"
        )
    if weight_name not in keys:
        raise CheckpointLoadError(
            f"{loader.directory}: 4-bit layer {module_name!r} has a quant state but no packed weight"
        )
    sd = {}
    for name, key in keys.items():
        sd[name] = _read(key, loader.layout[key]).to(loader.device, copy=True)
    try:
        new = LinearNF4.from_bnb_state_dict(sd, prefix=f"{module_name}.", compute_dtype=compute_dtype)
    except ValueError as err:
        raise CheckpointLoadError(f"{loader.where(keys[weight_name])} (4-bit layer {module_name!r}): {err}") from None
    if new.bias is not None:
        new.bias = nn.Parameter(new.bias.detach().to(loader.dtype), requires_grad=False)
    want = _linear_weight_shape(module)
    if (new.out_features, new.in_features) != want:
        raise CheckpointLoadError(
            f"{loader.where(keys[weight_name])}: 4-bit layer {module_name!r} is {(new.out_features, new.in_features)}, "
            f"the model built from {loader.directory / CONFIG} expects {want}"
        )
    new._lowrank_from_conv1d = bool(_models.Conv1D) and isinstance(module, _models.Conv1D)
    _models._set_module(loader.model, module_name, new)
    for leaf in ("weight", "bias"):
        p = module._parameters.get(leaf)
        if p is not None:
            loader.loaded.add(id(p))


def _generation_config(model: nn.Module, directory: Path) -> None:
    if not (directory / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(str(directory))


def _bnb_settings(model: nn.Module) -> tuple[str, int, bool] | None:
    layers = [m for m in model.modules() if isinstance(m, LinearNF4)]
    if not layers:
        return None
    first = layers[0]
    return first.quant_type, first.blocksize, first.double_quant


# -- prepared checkpoints (transformers.Trainer's checkpoint-N/ of a prepared model) ----------------------

#: from_pretrained options that still apply to a prepared checkpoint (its adapters come from the checkpoint)
_PREPARED_LOAD_OPTIONS = ("compute_dtype", "verbose")
_B_ZERO_INITS = ("kaiming", "gaussian")  # the replayed structure; the values come from the checkpoint
_BASE_FORMAT_KEYS = {"quant_type", "blocksize", "double_quant"}


def is_prepared_checkpoint(cfg: dict) -> bool:
    """Whether a parsed ``config.json`` is that of a lowrank-prepared checkpoint (see :mod:`lowrank.saving`)."""
    qcfg = cfg.get("quantization_config")
    return isinstance(qcfg, dict) and qcfg.get("quant_method") == _saving.PREPARED_QUANT_METHOD


def _prepared_manifest(directory: Path, manifest: dict):
    where = f"{directory / CONFIG} (quantization_config of a lowrank-prepared checkpoint)"
    version = manifest.get("format_version")
    if version != _saving.PREPARED_FORMAT_VERSION:
        raise CheckpointLoadError(
            f"{where}: format_version {version!r}; this lowrank reads version {_saving.PREPARED_FORMAT_VERSION}"
        )
    entries = manifest.get("adapters")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise CheckpointLoadError(f"{where}: 'adapters' must be a non-empty list of adapter settings")
    fields = {f.name: f for f in dataclasses.fields(_models.LoRASettings)}
    required = {
        n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    settings = []
    for entry in entries:
        unknown, missing = sorted(set(entry) - set(fields)), sorted(required - set(entry))
        if unknown or missing:
            raise CheckpointLoadError(f"{where}: adapter settings with unknown keys {unknown} / missing keys {missing}")
        settings.append(_models.LoRASettings(**entry))
    names = [s.adapter_name for s in settings]
    primary, active = manifest.get("primary_adapter"), manifest.get("active_adapters")
    if primary not in names:
        raise CheckpointLoadError(f"{where}: primary_adapter {primary!r} is not one of the adapters {names}")
    if not isinstance(active, list) or not active or any(a not in names for a in active):
        raise CheckpointLoadError(f"{where}: active_adapters {active!r} must be a non-empty list of {names}")
    compute = manifest.get("compute_dtypes", {})
    if not isinstance(compute, dict):
        raise CheckpointLoadError(f"{where}: compute_dtypes must map module names to dtype names, got {compute!r}")
    compute = {str(k): parse_dtype(v, what=f"compute dtype of {k} in {directory / CONFIG}") for k, v in compute.items()}
    base = manifest.get("base_format")
    if base is not None and (
        not isinstance(base, dict) or base.get("quant_type") not in ("nf4", "fp4") or set(base) != _BASE_FORMAT_KEYS
    ):
        raise CheckpointLoadError(
            f"{where}: base_format {base!r} must be null or {{quant_type, blocksize, double_quant}}"
        )
    return settings, primary, active, compute, base


def _replay_adapters(model: nn.Module, settings, base: dict | None) -> None:
    """Give the skeleton the prepared model's modules: prepare_model / add_adapter with the recorded targets."""
    first, *further = settings
    _models.prepare_model(
        model,
        r=first.r,
        alpha=first.alpha,
        dropout=first.dropout,
        target_modules=list(first.target_modules),
        quantize=None if base is None else base["quant_type"],
        double_quant=True if base is None else bool(base["double_quant"]),
        blocksize=64 if base is None else int(base["blocksize"]),
        use_rslora=first.use_rslora,
        modules_to_save=list(first.modules_to_save),
        init=first.init if first.init in _B_ZERO_INITS else "kaiming",
        bias=first.bias,
        rank_pattern=first.rank_pattern,
        alpha_pattern=first.alpha_pattern,
        adapter_name=first.adapter_name,
        use_dora=first.use_dora,
    )
    for s in further:
        _models.add_adapter(
            model,
            s.adapter_name,
            r=s.r,
            alpha=s.alpha,
            dropout=s.dropout,
            target_modules=list(s.target_modules),
            use_rslora=s.use_rslora,
            init=s.init if s.init in _B_ZERO_INITS else "kaiming",
            rank_pattern=s.rank_pattern,
            alpha_pattern=s.alpha_pattern,
        )


def _load_prepared(directory: Path, cfg: dict, dtype, device, auto_class, config_overrides, options: dict):
    where = directory / CONFIG
    settings, primary, active, compute, base = _prepared_manifest(directory, cfg["quantization_config"])
    fixed = sorted(set(options) - set(_PREPARED_LOAD_OPTIONS))
    if fixed:
        raise CheckpointLoadError(
            f"{directory} is a lowrank-prepared checkpoint: its adapters {[s.adapter_name for s in settings]} and its "
            f"base come from the checkpoint, so the prepare_model options {fixed} cannot apply (drop them, or load "
            "the base model's own directory)"
        )
    stored = parse_dtype(cfg.get("dtype") or cfg.get("torch_dtype") or "float32", what=f"dtype in {where}")
    if dtype is not None and parse_dtype(dtype, what="dtype") != stored:
        raise CheckpointLoadError(
            f"{directory} is a lowrank-prepared checkpoint saved in {stored} ({where} 'dtype'); it is loaded in its "
            f"stored dtypes, and dtype={dtype!r} would change its logits: leave dtype unset"
        )
    model = _build(directory, cfg, auto_class, stored, config_overrides)
    try:
        _replay_adapters(model, settings, base)
    except (ValueError, TypeError) as e:
        raise CheckpointLoadError(f"{where}: the recorded adapters do not fit {type(model).__name__}: {e}") from None
    for s in settings:
        built = model.lowrank_adapters[s.adapter_name].target_modules
        if list(built) != list(s.target_modules):
            raise CheckpointLoadError(
                f"{where}: adapter {s.adapter_name!r} was saved on {len(s.target_modules)} layers but the model built "
                f"from the config has {len(built)} of them ({sorted(set(s.target_modules) ^ set(built))[:3]} differ)"
            )
    # every holder of each parameter, so that tied parameters are one object again after assign=True
    groups: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules(remove_duplicate=False):
        for leaf, p in module._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append((module, leaf))
    read_layout(directory)  # headers and index checked first (a damaged shard or index names its file)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        try:
            state.update(files.read_safetensors(path))
        except files.FileFormatError as e:
            raise CheckpointLoadError(str(e)) from None
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointLoadError(f"{directory} does not fit the prepared {type(model).__name__}: {e}") from None
    del state
    for holders in groups.values():
        loaded = [m._parameters[leaf] for m, leaf in holders if m._parameters[leaf].device.type != "meta"]
        if loaded:
            for m, leaf in holders:
                m._parameters[leaf] = loaded[0]
    if result.unexpected_keys:
        raise CheckpointLoadError(
            f"{directory}: {len(result.unexpected_keys)} tensors are not part of the prepared {type(model).__name__} "
            f"rebuilt from {where}: {result.unexpected_keys[:5]}"
        )
    still_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if still_meta:
        raise CheckpointLoadError(
            f"{directory} has no tensor for {still_meta[:5]} ({len(still_meta)} of the prepared "
            f"{type(model).__name__}); refusing to leave them uninitialised"
        )
    for name, module in model.named_modules():
        if isinstance(module, LinearNF4):
            module.compute_dtype = options.get("compute_dtype", compute.get(name))
    by_name = {s.adapter_name: s for s in settings}
    model.lowrank_adapters = by_name
    model.lowrank_config = by_name[primary]
    _models.set_adapter(model, active)
    model.lowrank_summary = _models.summary(model)
    if device is not None:
        model.to(torch.device(device))
    _generation_config(model, directory)
    if options.get("verbose"):
        print(model.lowrank_summary)
    return model.eval()


def from_pretrained(
    path,
    *,
    quantize: str | None = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    auto_class=None,
    config_overrides: dict | None = None,
    **prepare_model_options,
) -> nn.Module:
    """Load a Hugging Face checkpoint directory straight into a lowrank-prepared 4-bit model.

    Equal (same logits) to ``prepare_model(AutoModelFor….from_pretrained(path, dtype=dtype), quantize=…,
    **prepare_model_options)`` but the dense model never exists: peak host memory above the process's
    baseline stays under the finished model's bytes + 2 × the largest tensor + ~150 MB. A bitsandbytes
    4-bit checkpoint keeps its stored bytes (its quant type, blocksize and double quantization win).

    Args:
        path: a directory with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``.
        quantize, double_quant, blocksize: the 4-bit format (``quantize=None``: dense, frozen bases).
        dtype: dtype of every tensor that is not 4-bit (and of the weights before quantization); default
            ``torch.bfloat16``. A lowrank-prepared checkpoint keeps its stored dtypes (``dtype`` may only
            repeat them).
        device: where the model is built (default CPU); on CUDA each weight is quantized on the device.
        auto_class: a transformers model class or Auto class (default: ``config.architectures[0]``).
        config_overrides: config attributes to set before building (e.g. ``{"num_labels": 3}``).
        **prepare_model_options: ``r``, ``alpha``, ``target_modules``, ``modules_to_save``, … (see
            :func:`lowrank.prepare_model`).

    A **lowrank-prepared checkpoint** (``transformers.Trainer``'s ``checkpoint-N/`` or ``trainer.save_model()``
    of a prepared model: ``config.json`` says ``quant_method: "lowrank_prepared"``) is rebuilt as saved: the
    recorded adapters (every named one, the active ones), the stored 4-bit base and the trained values,
    with an identical state dict and logits. Its adapters and base format come from the checkpoint:
    ``prepare_model`` options other than ``compute_dtype`` / ``verbose`` are an error, ``quantize`` /
    ``double_quant`` / ``blocksize`` are not used. It is read whole (peak ≈ the checkpoint's size), not
    streamed.
    """
    directory = Path(path)
    cfg = files.read_json(directory / CONFIG, what="model config") if directory.is_dir() else None
    if isinstance(cfg, dict) and is_prepared_checkpoint(cfg):
        return _load_prepared(directory, cfg, dtype, device, auto_class, config_overrides, prepare_model_options)
    model = load_pretrained(
        path,
        quantize=quantize,
        double_quant=double_quant,
        blocksize=blocksize,
        dtype=torch.bfloat16 if dtype is None else dtype,
        device=device,
        auto_class=auto_class,
        config_overrides=config_overrides,
        modules_to_save=prepare_model_options.get("modules_to_save"),
        compute_dtype=prepare_model_options.get("compute_dtype"),
    )
    stored = _bnb_settings(model)
    if stored is not None and quantize is not None:
        quantize, blocksize, double_quant = stored
    return _models.prepare_model(
        model, quantize=quantize, double_quant=double_quant, blocksize=blocksize, **prepare_model_options
    )


__all__ = ["CheckpointLoadError", "from_pretrained", "is_prepared_checkpoint", "load_pretrained", "quantization_plan"]
