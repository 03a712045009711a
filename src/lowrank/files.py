"""Atomic file writes and checked reads: the one place lowrank writes or reads a file (``lowrank.files``).

Every file the package writes goes through :func:`atomic_write` (or a helper built on it): the bytes
go to a temporary file in the destination's directory, are flushed to disk, and replace the
destination with ``os.replace`` — a reader (or a process killed mid-write) sees the old file or the
new one, never half of one. :func:`atomic_directory` does the same for a directory of files.

Readers raise :class:`FileFormatError` naming the file (and key) when it is missing, truncated or
not what it claims to be, instead of surfacing a library's internal error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

PathLike = str | os.PathLike


class FileFormatError(ValueError):
    """A file is missing, truncated, corrupted or of the wrong kind; the message names it."""


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse O_RDONLY on directories.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``write(tmp_path)`` fills a temporary sibling that then replaces it.

    The temporary file is removed on any failure (including KeyboardInterrupt), so a failed write
    leaves the previous file, if any, untouched and no stray temporary behind.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def write_bytes(path: PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """``obj`` as JSON (sorted keys off, a trailing newline), atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_safetensors(path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Tensors as safetensors (contiguous CPU copies; ``format: pt`` metadata), atomically."""
    from safetensors.torch import save_file

    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(prepared, tmp, metadata={"format": "pt", **(metadata or {})}))


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it into place when the block succeeds.

    An existing directory at ``path`` is replaced only after the new one is complete. On failure the
    temporary directory is removed and ``path`` is untouched. Temporary siblings are named
    ``.<name>.tmp-*`` so that :func:`remove_stale_temporaries` can clear those a kill left behind.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.tmp-old-"))
            os.replace(path, old / "old")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_directory(parent)


def remove_stale_temporaries(directory: PathLike) -> list[Path]:
    """Remove the ``.<name>.tmp-*`` files and directories that interrupted atomic writes left in ``directory``."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if entry.name.startswith(".") and ".tmp-" in entry.name:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


def read_json(path: PathLike, *, what: str = "JSON file") -> Any:
    """Parse a JSON file, or raise :class:`FileFormatError` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileFormatError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{what} {path} cannot be read: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{what} {path} is not valid JSON ({e}); it may be truncated or corrupted") from None


def read_safetensors(path: PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or :class:`FileFormatError` naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"safetensors file {path} does not exist")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError and OSError/ValueError variants
        raise FileFormatError(
            f"safetensors file {path} cannot be read ({e}); it may be truncated or corrupted"
        ) from None


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty when it has none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"safetensors file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise FileFormatError(
            f"safetensors file {path} cannot be read ({e}); it may be truncated or corrupted"
        ) from None
