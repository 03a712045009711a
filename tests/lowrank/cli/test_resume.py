"""Checkpoints on by default, resume over a damaged newest checkpoint, stale temporaries, small state files,
Ctrl-C and a disk that fills up mid-run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

from cli_runs import cls_args, gen_args, tree

from lowrank import files
from lowrank.cli import main
from lowrank.train import list_checkpoints


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_default_run_checkpoints_each_epoch_and_the_last_step(model_dirs, tmp_path):
    out = tmp_path / "run"
    # 280 examples / 16 per batch = 18 micro-batches per epoch; grad-accum 4: epoch ends inside steps 5 and 9
    assert main(cls_args(model_dirs, out, "--epochs", "2", "--grad-accum", "4", "--keep-last", "5")) == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000005", "step-000009"]
    state = json.loads((out / "checkpoints" / "step-000009" / "state.json").read_text())
    assert "history" not in state and state["log_lines"] == 9  # the history lives in log.jsonl, appended
    sizes = [len((out / "checkpoints" / name / "state.json").read_bytes()) for name in ("step-000005", "step-000009")]
    assert abs(sizes[1] - sizes[0]) < 200  # RNG states and counters: the same size at every step


def test_resume_falls_back_over_a_damaged_newest_checkpoint_and_removes_temporaries(model_dirs, tmp_path, capsys):
    steps = ["--max-steps", "4", "--save-every", "1", "--keep-last", "3"]
    reference = tmp_path / "reference"
    assert main(cls_args(model_dirs, reference, *steps)) == 0
    run = tmp_path / "run"
    assert main(cls_args(model_dirs, run, *steps)) == 0
    capsys.readouterr()
    newest = run / "checkpoints" / "step-000004"
    blob = (newest / "optimizer.safetensors").read_bytes()
    (newest / "optimizer.safetensors").write_bytes(blob[: len(blob) // 2])  # truncated, as by a full disk
    stale = [run / "checkpoints" / ".step-000005.tmp-k1ll3d", run / ".trainable.safetensors.tmp-x1"]
    stale[0].mkdir()
    (stale[0] / "trainable.safetensors").write_bytes(b"partial")
    stale[1].write_bytes(b"partial")

    assert main(cls_args(model_dirs, run, *steps, "--resume")) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("lowrank: warning:")]
    assert len(warnings) == 1 and "step-000004 is damaged" in warnings[0] and "older step-000003" in warnings[0]
    assert "resumed from step 3 of 4" in captured.out
    assert "4 steps (resumed from step 3) in" in captured.out and "in this session" in captured.out
    assert not any(p.exists() for p in stale)
    assert losses(run) == losses(reference)  # the redone step 4 is bit-identical, log.jsonl not duplicated
    load_state = json.loads((run / "checkpoints" / "step-000004" / "state.json").read_text())
    assert load_state["step"] == 4


def test_disk_full_mid_run_keeps_the_last_checkpoint_and_says_so(model_dirs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    steps = ["--max-steps", "6", "--save-every", "2", "--keep-last", "5"]
    real = files.write_safetensors
    calls = {"n": 0}

    def failing(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 5:  # the third checkpoint (two files each)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, tensors, metadata)

    monkeypatch.setattr(files, "write_safetensors", failing)
    assert main(cls_args(model_dirs, out, *steps)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("lowrank: error: cannot write checkpoint step-000006 at step 6")
    assert "No space left on device" in err[0] and "step-000004" in err[0] and "--resume" in err[0]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000002", "step-000004"]
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(files, "write_safetensors", real)
    assert main(cls_args(model_dirs, out, *steps, "--resume")) == 0
    assert "resumed from step 4 of 6" in capsys.readouterr().out
    assert len(losses(out)) == 6


def test_ctrl_c_ends_with_one_line_that_says_how_to_resume(model_dirs, tmp_path):
    out = tmp_path / "run"
    argv = gen_args(model_dirs, out, "--max-steps", "400", "--save-every", "2", "--batch-size", "4")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowrank", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(out / "checkpoints") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = err.strip().splitlines()
    assert proc.returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("lowrank: error: interrupted (Ctrl-C) after step "), err
    assert "is intact: rerun the same command with --resume to continue" in lines[0]
    before = tree(out / "checkpoints")
    assert not [name for name in before if ".tmp-" in name]


def test_outputs_unwritable_after_training_keep_the_final_checkpoint(model_dirs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = files.write_safetensors

    def failing(path, tensors, metadata=None):
        if str(path) == str(out / "trainable.safetensors"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, tensors, metadata)

    monkeypatch.setattr(files, "write_safetensors", failing)
    assert main(cls_args(model_dirs, out, "--max-steps", "3")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("lowrank: error: cannot write the run's outputs in")
    assert "Read-only file system" in err[0] and "step-000003 is intact" in err[0] and "--resume" in err[0]
    monkeypatch.setattr(files, "write_safetensors", real)
    assert main(cls_args(model_dirs, out, "--max-steps", "3", "--resume")) == 0  # nothing left to train
    assert "resumed from step 3 of 3" in capsys.readouterr().out
    assert (out / "trainable.safetensors").is_file() and len(losses(out)) == 3
