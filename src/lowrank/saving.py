"""``model.save_pretrained`` on a lowrank model is never a silent trap.

transformers' ``save_pretrained`` on a prepared model would write lowrank's module layout (LoRA wrappers,
4-bit entries) under a config without ``quantization_config``; ``from_pretrained`` of that directory
then loads with the base weights missing (randomly initialised) and only prints a load report.
:func:`lowrank.prepare_model` therefore replaces the model's ``save_pretrained`` by one that refuses
and says which function writes what the user wants. ``transformers.Trainer`` saves its checkpoints through
``save_pretrained(dir, state_dict=...)`` and reads them back into the same prepared model: that call is
let through, and its ``config.json`` gets ``quantization_config.quant_method = "lowrank_prepared"`` with a
note: :func:`lowrank.from_pretrained` refuses such a directory. (transformers 5 ignores an unknown
quant_method and loads the directory with a load report: a Trainer checkpoint is a resume format.) Once the
adapters are merged (:func:`lowrank.merge_adapters` removes ``lowrank_config``), the model is a plain
transformers model again and ``save_pretrained`` is transformers' own.
"""

from __future__ import annotations

import os
import types

from torch import nn

from lowrank import files

#: what a transformers.Trainer checkpoint of a prepared model says in its config.json (lowrank.from_pretrained
#: refuses it; the note says what to use instead)
TRAINER_QUANT_METHOD = "lowrank_prepared"


class SavePretrainedError(RuntimeError):
    """``save_pretrained`` was called on a model whose checkpoint transformers would load wrongly."""


def _refusing_save_pretrained(self, save_directory, *args, **kwargs):
    if getattr(self, "lowrank_config", None) is None:  # merged back into a plain model
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if "state_dict" in kwargs:  # transformers.Trainer's checkpoints, read back by Trainer into this same model
        result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            _mark_trainer_checkpoint(save_directory)
        return result
    raise SavePretrainedError(
        f"save_pretrained({str(save_directory)!r}) on a lowrank-prepared {type(self).__name__} would write a "
        "checkpoint that transformers loads with the base weights missing. Use "
        "lowrank.save_adapter(model, dir) for the adapter (PEFT format), "
        "lowrank.save_quantized(model, dir) for the 4-bit base (bitsandbytes format, without the adapters), or "
        "lowrank.merge_adapters(model) and then model.save_pretrained(dir) for a dense model with the adapters merged"
    )


def _mark_trainer_checkpoint(directory) -> None:
    path = os.path.join(os.fspath(directory), "config.json")
    config = files.read_json(path, what="model config")
    config["quantization_config"] = {
        "quant_method": TRAINER_QUANT_METHOD,
        "note": "a transformers.Trainer checkpoint of a lowrank-prepared model: resume it with Trainer on the same "
        "prepared model; for a standalone model use lowrank.save_adapter, lowrank.save_quantized or "
        "lowrank.merge_adapters",
    }
    files.write_json(path, config)


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` refuse while ``model.lowrank_config`` is set (see the module docstring)."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = types.MethodType(_refusing_save_pretrained, model)


__all__ = ["SavePretrainedError", "guard_save_pretrained"]
