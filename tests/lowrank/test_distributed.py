"""The 4-bit base under FSDP2 and DDP, on gloo with 2 (and 3) CPU processes.

FSDP2 (``fully_shard`` per decoder layer and the root) shards the uint8 parameters of every ``LinearNF4``;
the sharded model trains with fp32 losses bit-equal to one process; mixed precision leaves codes and
constants alone; the gathered state dict is the unsharded one (bitsandbytes' keys) bit for bit;
``set_model_state_dict``, DCP save/load (also into a model prepared from another base, whose quant-state
blobs have other lengths) and a meta-device skeleton round-trip. DDP never re-sends the base. The same DCP
load into another base also runs in one process, and a checkpoint of another layout is refused naming the key.
The ranks run ``tests/_shared/nf4_distributed.py`` under ``torch.distributed.run``, time-boxed, and their
whole process group is killed if the run fails or times out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nf4_distributed
import pytest
import torch

from lowrank.nn import LinearNF4

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


def run_ranks(directory: Path, case: str, world: int, hidden: int, intermediate: int, timeout: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(nf4_distributed.__file__)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    command += ["-m", "nf4_distributed", str(directory), case, str(hidden), str(intermediate)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None or process.returncode != 0:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the launcher and every rank it started
            except ProcessLookupError:
                pass
            process.wait()
    assert process.returncode == 0, output[-6000:]
    return [json.loads((directory / f"{case}.rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def fsdp2_two_ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("fsdp2"), "fsdp2", 2, hidden=64, intermediate=176, timeout=400)


def check_fsdp2(ranks: list[dict], world: int, exact_losses: bool) -> None:
    for out in ranks:
        assert out["world"] == world and out["base_all_dtensor"]
        assert out["base_bytes_sharded"] == out["base_bytes"]  # sharding moves bytes, it does not add any
        assert out["base_bytes_this_rank"] <= out["base_bytes"] / world * 1.10, out
        assert out["full_state_dict_diff"] == [] and out["logits_equal"]
        assert out["set_full_state_dict_diff"] == [] and out["set_full_state_dict_logits_equal"]
        assert out["dcp_blob_lengths_differ"]  # the target's blobs cannot take the saved bytes in place
        assert out["dcp_diff"] == [] and out["dcp_logits_equal"]
        assert "does not match" in out["sharded_transposed_error"], out["sharded_transposed_error"]
        assert out["sharded_transposed_key"] in out["sharded_transposed_error"]
        assert out["meta_skeleton_bytes"] == out["base_bytes"]
        assert out["meta_diff"] == [] and out["meta_logits_equal"]
        assert out["base_unchanged_by_training"]
        seen = out["mixed_precision_seen"]
        assert seen["x"] == "torch.bfloat16", seen  # mixed precision is on ...
        assert seen["weight"] == seen["weight_absmax"] == "torch.uint8", seen  # ... codes stay bytes ...
        assert seen["weight_nested_absmax"] == seen["weight_nested_offset"] == "torch.float32", seen  # ... fp32
        assert seen["decoded_equal"], seen
        assert out["mixed_precision_loss_finite"] and out["mixed_precision_lora_grads"]
        assert out["mixed_precision_base_diff"] == []
        if exact_losses:
            assert out["losses_sharded"] == out["losses_single"]
        else:  # the first loss is a forward only; later ones depend on how the ranks' gradients are averaged
            assert out["losses_sharded"][0] == out["losses_single"][0]
            single = [float.fromhex(v) for v in out["losses_single"]]
            sharded = [float.fromhex(v) for v in out["losses_sharded"]]
            assert sharded == pytest.approx(single, rel=1e-5)
    assert len({json.dumps(out["losses_sharded"]) for out in ranks}) == 1


def test_fsdp2_shards_the_4bit_base_and_round_trips(fsdp2_two_ranks):
    check_fsdp2(fsdp2_two_ranks, 2, exact_losses=True)


@pytest.mark.slow
def test_fsdp2_three_ranks_block_counts_not_divisible(tmp_path):
    # intermediate 1376: 1376 x 128 weights have 2752 blocks of 64 and 44,032 packed bytes per row block
    # count that 3 does not divide; fully_shard pads the last shard.
    ranks = run_ranks(tmp_path, "fsdp2", 3, hidden=128, intermediate=1376, timeout=590)
    check_fsdp2(ranks, 3, exact_losses=False)


def test_ddp_never_rebroadcasts_the_4bit_base(tmp_path):
    ranks = run_ranks(tmp_path, "ddp", 2, hidden=64, intermediate=176, timeout=300)
    for out in ranks:
        assert out["bytes_broadcast_at_construction"] >= out["base_bytes"]  # parameters are synced once
        assert out["bytes_broadcast_per_step"] < 0.01 * out["base_bytes"], out
        assert out["losses_ddp"] == out["losses_single"]
        assert out["base_diff"] == []


# -- one process: DCP save of one prepared model, load into one prepared from another base ---------------------


def _dcp_round_trip(saved: torch.nn.Module, target_model: torch.nn.Module, directory: Path) -> None:
    """DCP save of ``saved``, then the state-dict API's load into ``target_model`` (no process group)."""
    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    save(get_model_state_dict(saved), checkpoint_id=str(directory), no_dist=True)
    target = get_model_state_dict(target_model)
    load(target, checkpoint_id=str(directory), no_dist=True)
    set_model_state_dict(target_model, target)


def _blob_lengths(model: torch.nn.Module) -> dict[str, int]:
    return {k: v.numel() for k, v in model.state_dict().items() if ".quant_state.bitsandbytes__" in k}


def test_dcp_load_into_a_model_prepared_from_another_base(tmp_path):
    cfg = nf4_distributed.config(64, 176)
    source, target = nf4_distributed.build(cfg, seed=0), nf4_distributed.build(cfg, seed=1)
    lengths_source, lengths_target = _blob_lengths(source), _blob_lengths(target)
    assert lengths_source.keys() == lengths_target.keys() and lengths_source != lengths_target
    _dcp_round_trip(source, target, tmp_path / "dcp")
    assert nf4_distributed.same_state(target.state_dict(), source.state_dict()) == []
    assert torch.equal(nf4_distributed.logits(target), nf4_distributed.logits(source))

    # the plain API too: DCP into model.state_dict(), then load_state_dict
    plain = nf4_distributed.build(cfg, seed=2)
    from torch.distributed.checkpoint import load

    sd = plain.state_dict()
    load(sd, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    plain.load_state_dict(sd)
    assert nf4_distributed.same_state(plain.state_dict(), source.state_dict()) == []


def _layers(shapes, seed: int, blocksize: int = 64) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        *(LinearNF4.from_linear(torch.nn.Linear(k, n, bias=False), blocksize=blocksize) for k, n in shapes)
    )


def test_dcp_load_of_another_layout_names_the_key(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    saved = _layers([(96, 40), (40, 96)], seed=0)
    with pytest.raises(CheckpointException, match=r"Size mismatch between saved .* for 0\.weight\.absmax"):
        _dcp_round_trip(saved, _layers([(96, 40), (40, 96)], seed=1, blocksize=128), tmp_path / "blocksize")
    # transposed layers hold the same numbers of bytes, so DCP reads every tensor; the load refuses the shape
    with pytest.raises(RuntimeError, match=r"0\.weight: weight shape \(40, 96\) does not match \(96, 40\)"):
        _dcp_round_trip(saved, _layers([(40, 96), (96, 40)], seed=1), tmp_path / "transposed")
