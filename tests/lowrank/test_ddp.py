"""DDP and FSDP2 on gloo with two CPU processes (torchrun): LoRA parameters stay identical across ranks
and equal single-process training on the whole batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "_shared" / "ddp_train.py"  # imports its sibling helpers.py


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)
@pytest.mark.parametrize(
    "mode",
    [
        "ddp",
        # Slow set: once, under a loaded 2-core CI machine, rank 1 aborted in gloo teardown
        # ("terminate called without an active exception") after the step; not reproduced since.
        pytest.param("fsdp2", marks=pytest.mark.slow),
    ],
)
def test_two_ranks_keep_identical_adapters(tmp_path, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        str(tmp_path),
        mode,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    single = load_file(tmp_path / "single.safetensors")
    params = [k for k in rank0 if k.startswith("param.")]
    assert params and all(".lora_" in k for k in params)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # all-reduced gradients: bit-identical updates
    for key in params:  # and the same training as one process on the whole batch
        torch.testing.assert_close(rank0[key], single[key], atol=1e-5, rtol=1e-4, msg=key)
    initial = load_file(tmp_path / "init.safetensors")
    assert all(not torch.equal(rank0[k], initial[k]) for k in params)  # every adapter trained
    base = [k for k in rank0 if k.startswith("base.")]
    assert base and all(rank0[k].dtype == torch.uint8 and torch.equal(rank0[k], initial[k]) for k in base)
