"""lowrank.files: atomic writes leave the old file or the new one, readers name the broken file."""

import os

import pytest
import torch

from lowrank import files


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    files.write_json(target, {"v": 1})

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("{half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.atomic_write(target, fail)
    assert files.read_json(target) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    target = tmp_path / "ckpt"
    with files.atomic_directory(target) as d:
        (d / "one").write_text("1")
    with pytest.raises(KeyboardInterrupt), files.atomic_directory(target) as d:
        (d / "two").write_text("2")
        raise KeyboardInterrupt
    assert sorted(os.listdir(target)) == ["one"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".ckpt.tmp-abc").mkdir()
    (tmp_path / ".a.json.tmp-xyz").write_text("x")
    (tmp_path / "keep.json").write_text("{}")
    removed = files.remove_stale_temporaries(tmp_path)
    assert len(removed) == 2 and sorted(os.listdir(tmp_path)) == ["keep.json"]


def test_readers_name_the_broken_file(tmp_path):
    bad_json = tmp_path / "state.json"
    bad_json.write_text('{"step": 3')
    with pytest.raises(files.FileFormatError, match="state.json"):
        files.read_json(bad_json)
    tensors = tmp_path / "t.safetensors"
    files.write_safetensors(tensors, {"a": torch.arange(6.0)})
    tensors.write_bytes(tensors.read_bytes()[:-8])
    with pytest.raises(files.FileFormatError, match="t.safetensors"):
        files.read_safetensors(tensors)
    with pytest.raises(files.FileFormatError, match="does not exist"):
        files.read_safetensors(tmp_path / "missing.safetensors")


def test_dtype_map_round_trips_and_rejects():
    from lowrank.dtypes import dtype_name, parse_dtype

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert parse_dtype(dtype_name(dtype)) is dtype
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    with pytest.raises(ValueError, match="'int8'"):
        parse_dtype("int8")
