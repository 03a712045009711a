"""Run under ``torchrun --nproc_per_node 2 ddp_train.py OUT [ddp|fsdp2]``: data-parallel training of a
lowrank-prepared NF4 model on gloo (CPU), with DDP or with FSDP2 (``fully_shard``: LoRA parameters, the
frozen dense parameters and the frozen uint8 parameters of the 4-bit base are sharded).

Each rank trains on different tokens with gradient checkpointing; afterwards every rank writes its LoRA
parameters and 4-bit bytes to ``<out>/rank<r>.safetensors``, and rank 0 also writes the result of
training an identical model in a single process on the concatenated batch (``<out>/single.safetensors``)
and the initial state (``<out>/init.safetensors``).
"""

import copy
import os
import sys

import torch
import torch.distributed as dist
from helpers import tiny, tokens  # tests/_shared: the directory of this script is on sys.path
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from lowrank.models import prepare_model
from lowrank.optim import PagedAdamW

STEPS = 3


def trained_state(model) -> dict[str, torch.Tensor]:
    state = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({f"base.{n}": p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8})
    return state


def batch(rank: int, step: int) -> torch.Tensor:
    return tokens(2, 10, seed=100 * step + rank)


def main(out: str, mode: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = prepare_model(tiny("llama", seed=0), r=4, alpha=8)
    with torch.no_grad():  # non-zero B so that every adapter gets a gradient from the first step
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    single = copy.deepcopy(model) if rank == 0 else None
    if rank == 0:
        save_file(trained_state(model), os.path.join(out, "init.safetensors"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        ddp = fully_shard(model, mesh=mesh)
    else:
        ddp = DistributedDataParallel(model)
    optimizer = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(STEPS):
        ids = batch(rank, step)
        ddp(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in trained_state(model).items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    if rank == 0:
        single.train()
        opt = PagedAdamW([p for p in single.parameters() if p.requires_grad], lr=1e-2)
        for step in range(STEPS):
            # DDP averages per-rank mean losses: the same as the mean over the concatenated batch
            loss = sum(single(input_ids=batch(r, step), labels=batch(r, step)).loss for r in range(world)) / world
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        save_file(trained_state(single), os.path.join(out, "single.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp")
