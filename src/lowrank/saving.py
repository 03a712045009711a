"""``model.save_pretrained`` on a lowrank model is never a silent trap.

transformers' ``save_pretrained`` on a prepared model would write lowrank's module layout (LoRA wrappers,
4-bit entries) under a config without ``quantization_config``; ``from_pretrained`` of that directory
then loads with the base weights missing (randomly initialised) and only prints a load report.
:func:`lowrank.prepare_model` therefore replaces the model's ``save_pretrained`` by one that refuses
and says which function writes what the user wants. Once the adapters are merged
(:func:`lowrank.merge_adapters` removes ``lowrank_config``), the model is a plain transformers model
again and ``save_pretrained`` is transformers' own.
"""

from __future__ import annotations

import types

from torch import nn


class SavePretrainedError(RuntimeError):
    """``save_pretrained`` was called on a model whose checkpoint transformers would load wrongly."""


def _refusing_save_pretrained(self, save_directory, *args, **kwargs):
    if getattr(self, "lowrank_config", None) is None:  # merged back into a plain model
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    raise SavePretrainedError(
        f"save_pretrained({str(save_directory)!r}) on a lowrank-prepared {type(self).__name__} would write a "
        "checkpoint that transformers loads with the base weights missing. Use "
        "lowrank.save_adapter(model, dir) for the adapter (PEFT format), "
        "lowrank.save_quantized(model, dir) for the 4-bit base (bitsandbytes format, without the adapters), or "
        "lowrank.merge_adapters(model) and then model.save_pretrained(dir) for a dense model with the adapters merged"
    )


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` refuse while ``model.lowrank_config`` is set (see the module docstring)."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = types.MethodType(_refusing_save_pretrained, model)


__all__ = ["SavePretrainedError", "guard_save_pretrained"]
