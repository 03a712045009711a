"""The adapter file errors and the checked readers every adapter/checkpoint module uses.

Files are read through :mod:`lowrank.files`; its :class:`~lowrank.files.FileFormatError` becomes the
error class of the file kind being read (so ``except AdapterConfigError`` keeps working), and
:class:`AdapterFileError` is also a ``FileFormatError``.
"""

from __future__ import annotations

import os

import torch

from lowrank import files


class AdapterError(ValueError):
    """Base class of lowrank's file errors."""


class AdapterConfigError(AdapterError):
    """adapter_config.json (or a checkpoint's config.json) is missing, unreadable or has wrong fields."""


class AdapterFileError(AdapterError, files.FileFormatError):
    """A safetensors file is missing, truncated or not safetensors."""


class AdapterShapeError(AdapterError):
    """Adapter tensors do not fit the model (wrong base shapes, missing or unexpected keys)."""


class QuantizedCheckpointError(AdapterError):
    """A 4-bit checkpoint is not in bitsandbytes' format or does not fit the model class."""


def read_json_object(path: str | os.PathLike, error: type[AdapterError]) -> dict:
    """A JSON file holding an object; ``error`` names the file when it is missing, broken or not an object."""
    try:
        obj = files.read_json(path)
    except files.FileFormatError as err:
        raise error(str(err)) from err
    if not isinstance(obj, dict):
        raise error(f"{os.fspath(path)} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on CPU; AdapterFileError if it is missing or damaged."""
    try:
        return files.read_safetensors(path)
    except AdapterFileError:
        raise
    except files.FileFormatError as err:
        raise AdapterFileError(str(err)) from err


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors, with a copy wherever two share memory (safetensors refuses shared storage)."""
    out, storages = {}, set()
    for key, value in tensors.items():
        value = value.detach()
        if value.numel() and value.untyped_storage().data_ptr() in storages:
            value = value.clone()
        if value.numel():
            storages.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out
