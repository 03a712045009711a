"""``model.save_pretrained`` on a lowrank model is never a silent trap.

transformers' ``save_pretrained`` on a prepared model writes lowrank's module layout (LoRA wrappers, 4-bit
entries under ``*.base_layer.*``); ``from_pretrained`` of such a directory would build the plain model, find
none of its linear weights and initialise them randomly, printing only a load report. So:

* :func:`lowrank.prepare_model` binds a ``save_pretrained`` to the model that **refuses** a plain
  ``save_pretrained(dir)`` and names the functions that write what the user wants
  (``save_adapter`` / ``save_quantized`` / ``merge_adapters``).
* ``save_pretrained(dir, state_dict=...)`` is how ``transformers.Trainer`` writes ``checkpoint-N/`` (and
  ``trainer.save_model()``); Trainer resumes such a directory into the same prepared model with
  ``load_state_dict``. That call writes a **prepared checkpoint**: transformers' files, with a
  ``config.json`` that (1) makes every ``from_pretrained`` of transformers refuse the directory with a
  ``ValueError`` naming lowrank and the right functions (``transformers_weights`` holds that sentence:
  transformers checks that key before reading any weight and raises, quoting it, when it does not name a
  safetensors file), and (2) records the adapters (``quantization_config`` with
  ``quant_method = "lowrank_prepared"``), from which :func:`lowrank.from_pretrained` rebuilds the
  prepared model with identical state and logits. The weights carry a :data:`SENTINEL` under the first
  LoRA layer's plain ``weight`` key, so a ``from_pretrained`` that never reads this ``config.json``
  (``config=`` from elsewhere) still raises a size mismatch; the prepared model's ``load_state_dict``
  drops it. The files are written in a temporary directory and ``config.json`` is moved into place before
  any weight file, so an interrupted save never leaves weights next to an unmarked config.

Once the adapters are merged (:func:`lowrank.merge_adapters` removes ``lowrank_config``), the model is a
plain transformers model again and ``save_pretrained`` is transformers' own.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

from lowrank import files
from lowrank.dtypes import dtype_name
from lowrank.nn import LinearNF4, LoRAEmbedding, LoRALinear

#: ``quantization_config.quant_method`` of a prepared checkpoint (Trainer's ``checkpoint-N/``)
PREPARED_QUANT_METHOD = "lowrank_prepared"
#: version of the manifest that :func:`prepared_manifest` writes into ``quantization_config``
PREPARED_FORMAT_VERSION = 1
#: why transformers refuses a prepared checkpoint (also its ``config.json``'s ``transformers_weights``)
PREPARED_REFUSAL = (
    "lowrank-prepared checkpoint (written by transformers.Trainer or save_pretrained(dir, state_dict=...) on a "
    "lowrank.prepare_model model): its linear layers are lowrank's 4-bit/LoRA layout, which transformers "
    "would load with the base weights missing. Load it with lowrank.from_pretrained(dir) or resume it with "
    "transformers.Trainer; for files that transformers loads, write lowrank.save_adapter(model, dir) (PEFT "
    "adapter), lowrank.save_quantized(model, dir) (bitsandbytes 4-bit base) or lowrank.merge_adapters(model) "
    "and then model.save_pretrained(dir) (dense, adapters merged)"
)
#: the tensor a prepared checkpoint stores under ``<first LoRA layer>.weight``: a plain model has a 2-D weight
#: there, so transformers' ``from_pretrained`` raises a size mismatch even when it is handed another config
#: (``config=``) or does not know ``transformers_weights``; a prepared model's ``load_state_dict`` drops it
SENTINEL = torch.zeros(1, dtype=torch.uint8)
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


class SavePretrainedError(RuntimeError):
    """``save_pretrained`` was called on a model whose checkpoint transformers would load wrongly."""


def _refusing_save_pretrained(self, save_directory, *args, **kwargs):
    if getattr(self, "lowrank_config", None) is None:  # merged back into a plain model
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if "state_dict" in kwargs:  # transformers.Trainer's checkpoints, read back by Trainer into this same model
        return save_prepared_checkpoint(self, save_directory, *args, **kwargs)
    raise SavePretrainedError(
        f"save_pretrained({str(save_directory)!r}) on a lowrank-prepared {type(self).__name__} would write a "
        "checkpoint that transformers loads with the base weights missing. Use "
        "lowrank.save_adapter(model, dir) for the adapter (PEFT format), "
        "lowrank.save_quantized(model, dir) for the 4-bit base (bitsandbytes format, without the adapters), or "
        "lowrank.merge_adapters(model) and then model.save_pretrained(dir) for a dense model with the adapters merged"
    )


def _sentinel_key(model: nn.Module) -> str | None:
    return next((f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))), None)


def _is_sentinel(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and tuple(value.shape) == (1,)


#: a PiSSA/OLoRA layer's initial split (non-persistent buffers of LoRALinear, needed by
#: ``save_adapter(..., convert_to_lora=True)``): a prepared checkpoint stores them, loading puts them back
INITIAL_SPLIT = ("lora_A_initial", "lora_B_initial")


def _owner(module: nn.Module, key: str, prefix: str, leaf: str) -> nn.Module | None:
    try:
        return module.get_submodule(key[len(prefix) : -len(leaf) - 1])
    except AttributeError:
        return None


def _prepared_checkpoint_pre_hook(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
):
    """``load_state_dict`` pre-hook of a prepared model: the checkpoint's :data:`SENTINEL` is not a tensor of
    the model (a LoRA layer has no ``weight`` entry of its own) and is dropped; a stored initial PiSSA/OLoRA
    split (:data:`INITIAL_SPLIT`) becomes the layer's buffer again. Trainer's resume reports nothing extra."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        leaf = key.rpartition(".")[2]
        if leaf == "weight" and _is_sentinel(state_dict[key]):
            if isinstance(_owner(module, key, prefix, leaf), (LoRALinear, LoRAEmbedding)):
                del state_dict[key]
        elif leaf in INITIAL_SPLIT:
            owner = _owner(module, key, prefix, leaf)
            if isinstance(owner, LoRALinear):
                value = state_dict.pop(key).detach()
                device = owner.lora_A.device if owner.lora_A.device.type != "meta" else value.device
                owner.register_buffer(leaf, value.to(device, copy=True), persistent=False)


def prepared_manifest(model: nn.Module) -> dict:
    """What :func:`lowrank.from_pretrained` needs to rebuild ``model``'s structure: every adapter's settings
    (in creation order), the active adapters, the 4-bit format of the base and its layers' compute dtypes."""
    configs = getattr(model, "lowrank_adapters", None) or {model.lowrank_config.adapter_name: model.lowrank_config}
    merged = [name for name, m in model.named_modules() if isinstance(m, LoRALinear) and m.merged]
    if merged:
        raise SavePretrainedError(
            f"{len(merged)} LoRA layers of {type(model).__name__} are merged in place ({merged[:3]}); a checkpoint "
            "of merged layers would apply the adapter twice when loaded: unmerge() them before saving"
        )
    compute = {
        name: dtype_name(m.compute_dtype)
        for name, m in model.named_modules()
        if isinstance(m, LinearNF4) and m.compute_dtype is not None
    }
    quantized = [m for m in model.modules() if isinstance(m, LinearNF4)]
    base = None
    if quantized:
        first = quantized[0]
        base = {"quant_type": first.quant_type, "blocksize": first.blocksize, "double_quant": first.double_quant}
    return {
        "quant_method": PREPARED_QUANT_METHOD,
        "format_version": PREPARED_FORMAT_VERSION,
        "note": PREPARED_REFUSAL,
        "adapters": [dataclasses.asdict(c) for c in configs.values()],
        "primary_adapter": model.lowrank_config.adapter_name,
        "active_adapters": list(getattr(model, "lowrank_active_adapters", None) or list(configs)[:1]),
        "compute_dtypes": compute,
        "base_format": base,  # the 4-bit format of the base layers (null: dense bases)
        "sentinel": _sentinel_key(model),
    }


def save_prepared_checkpoint(model: nn.Module, save_directory, *args, **kwargs):
    """transformers' ``save_pretrained(save_directory, state_dict=..., ...)`` of a prepared model, written as a
    prepared checkpoint (see the module docstring): Trainer resumes it, :func:`lowrank.from_pretrained` loads
    it, transformers' ``from_pretrained`` refuses it with :data:`PREPARED_REFUSAL`."""
    if kwargs.get("push_to_hub"):
        raise SavePretrainedError(
            "save_pretrained(..., push_to_hub=True) on a lowrank-prepared model would upload the files before "
            "lowrank marks them; save first, then upload the directory"
        )
    if not kwargs.get("is_main_process", True):  # another rank writes the files; join any collective
        return type(model).save_pretrained(model, save_directory, *args, **kwargs)
    manifest = prepared_manifest(model)
    state_dict = kwargs["state_dict"]
    state_dict = dict(model.state_dict() if state_dict is None else state_dict)  # the caller's dict is not changed
    if manifest["sentinel"] is not None and manifest["sentinel"] not in state_dict:
        state_dict[manifest["sentinel"]] = SENTINEL.clone()
    for name, m in model.named_modules():  # the initial PiSSA/OLoRA splits (not part of state_dict())
        for leaf in INITIAL_SPLIT:
            if isinstance(m, LoRALinear) and getattr(m, leaf, None) is not None:
                state_dict.setdefault(f"{name}.{leaf}", getattr(m, leaf).detach())
    kwargs["state_dict"] = state_dict
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise SavePretrainedError(f"save_pretrained: {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".save_pretrained.tmp-"))  # remove_stale_temporaries' pattern
    try:
        result = type(model).save_pretrained(model, tmp, *args, **kwargs)
        config_path = tmp / "config.json"
        config = files.read_json(config_path, what="model config")
        config["quantization_config"] = manifest
        config["transformers_weights"] = PREPARED_REFUSAL
        files.write_json(config_path, config)
        written = sorted(p.name for p in tmp.iterdir())
        # the marked config first, then stale weight files of an earlier save go, then the weights (shards
        # before their index): at no moment do weights sit next to an unmarked config
        os.replace(config_path, directory / "config.json")
        for old in directory.iterdir():
            if old.is_file() and _WEIGHT_FILE.fullmatch(old.name) and old.name not in written:
                old.unlink()
        for name in sorted(written, key=lambda n: (n.endswith(".index.json"), n)):
            if name != "config.json":
                os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` refuse while ``model.lowrank_config`` is set, or write a prepared checkpoint
    when given a ``state_dict`` (see the module docstring); ``model.load_state_dict`` then drops a prepared
    checkpoint's :data:`SENTINEL` and restores its :data:`INITIAL_SPLIT` buffers."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = types.MethodType(_refusing_save_pretrained, model)
    if not getattr(model, "_lowrank_checkpoint_pre_hook", False):  # once per model (prepared again after a merge)
        model.register_load_state_dict_pre_hook(_prepared_checkpoint_pre_hook)
        model._lowrank_checkpoint_pre_hook = True


__all__ = [
    "INITIAL_SPLIT",
    "PREPARED_QUANT_METHOD",
    "SENTINEL",
    "PREPARED_REFUSAL",
    "SavePretrainedError",
    "guard_save_pretrained",
    "prepared_manifest",
    "save_prepared_checkpoint",
]
