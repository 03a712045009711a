"""Multi-process checks of a 4-bit base under FSDP2 and DDP, run by ``tests/lowrank/test_distributed.py``.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node W -m nf4_distributed OUT CASE HIDDEN
INTERMEDIATE`` (gloo, CPU). Each rank writes ``OUT/<CASE>.rank<r>.json`` with what it measured; the test
asserts. CASE is ``fsdp2`` (shard bytes, fp32 losses against one process, mixed precision, full state dict,
set_model_state_dict, DCP save/load, meta-device construction then load) or ``ddp`` (bytes broadcast per
step, losses against one process). Every rank trains on the same batches, so averaging gradients over
ranks changes nothing and the losses can be compared bit for bit.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import transformers
from torch.distributed.tensor import DTensor

from lowrank.models import prepare_model
from lowrank.nn import LinearNF4, LoRALinear

STEPS = 3
VOCAB = 128


def config(hidden: int, intermediate: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def build(cfg, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = prepare_model(transformers.LlamaForCausalLM(cfg), r=4, alpha=8)
    with torch.no_grad():  # non-zero B so that every adapter gets a gradient from the first step
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(seed + len(name)))
    return model.train()


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1000 + step))


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def base_tensors(model):
    for m in model.modules():
        if isinstance(m, LinearNF4):
            for name in ("weight", "weight_absmax", "weight_nested_absmax", "weight_nested_offset"):
                t = getattr(m, name)
                if t is not None:
                    yield t


def nbytes(tensors, on_this_rank: bool) -> int:
    return sum((local(t) if on_this_rank else t).numel() * t.element_size() for t in tensors)


def model_bytes(model) -> int:
    """Bytes this rank holds for the model's parameters and buffers."""
    return nbytes(list(model.parameters()) + list(model.buffers()), True)


def train(model, forward=None) -> list[str]:
    forward = forward or model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=False)
    losses = []
    for step in range(STEPS):
        ids = batch(step)
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item().hex())
    return losses


def shard(model, mesh, **kwargs):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    return fully_shard(model, mesh=mesh, **kwargs)


def blob_lengths(state: dict) -> dict[str, int]:
    """The length of every bitsandbytes quant-state blob (UTF-8 JSON) in a state dict."""
    return {k: v.numel() for k, v in state.items() if ".quant_state.bitsandbytes__" in k}


def same_state(a: dict, b: dict) -> list[str]:
    """Keys whose values differ (or are missing) between two plain state dicts; [] when bit-identical."""
    bad = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):  # one order on every rank: full_tensor() is a collective
        x, y = a[key], b[key]
        x = x.full_tensor() if isinstance(x, DTensor) else x
        y = y.full_tensor() if isinstance(y, DTensor) else y
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.cpu(), y.cpu()):
            bad.append(key)
    return bad


@torch.no_grad()
def logits(model) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=batch(99)).logits
    model.train(was)
    return out


def fsdp2(cfg, out: dict, directory: str) -> None:
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = build(cfg, seed=0)
    reference = copy.deepcopy(model)
    reference_sd = {k: v.clone() for k, v in reference.state_dict().items()}
    reference_logits = logits(reference)
    full = StateDictOptions(full_state_dict=True)

    # shard bytes
    out["base_bytes"] = nbytes(list(base_tensors(model)), False)
    out["model_bytes_before"] = model_bytes(model)
    shard(model, mesh)
    out["base_bytes_sharded"] = nbytes(list(base_tensors(model)), False)
    out["base_bytes_this_rank"] = nbytes(list(base_tensors(model)), True)
    out["model_bytes_this_rank"] = model_bytes(model)
    out["base_all_dtensor"] = all(
        isinstance(getattr(m, n), DTensor)
        for m in model.modules()
        if isinstance(m, LinearNF4)
        for n in LinearNF4.QUANTIZED_PARAMETERS
    )
    dense = transformers.LlamaForCausalLM(cfg)  # the same model unquantized, for the bench figures
    out["dense_bytes_before"] = model_bytes(dense)
    shard(dense, mesh)
    out["dense_bytes_this_rank"] = model_bytes(dense)
    del dense

    # the full state dict of the sharded model is the unsharded one (bitsandbytes' keys), bit for bit
    out["full_state_dict_diff"] = same_state(get_model_state_dict(model, options=full), reference_sd)
    out["logits_equal"] = torch.equal(logits(model), reference_logits)

    # fp32 losses: the sharded model trains exactly like one process
    single = copy.deepcopy(reference)
    out["losses_single"] = train(single)
    out["losses_sharded"] = train(model)
    out["base_unchanged_by_training"] = not same_state(
        {k: v for k, v in get_model_state_dict(model, options=full).items() if "lora_" not in k},
        {k: v for k, v in reference_sd.items() if "lora_" not in k},
    )

    # set_model_state_dict (full) into a sharded model with another base, and back out
    other = shard(build(cfg, seed=1), mesh)
    set_model_state_dict(other, dict(reference_sd), options=full)  # DSD adds keys to its argument
    out["set_full_state_dict_diff"] = same_state(get_model_state_dict(other, options=full), reference_sd)
    out["set_full_state_dict_logits_equal"] = torch.equal(logits(other), reference_logits)

    # DCP: save the sharded state, load it into a sharded model prepared from another base (other adapters,
    # other 4-bit codes and nested offsets, so quant-state blobs of other lengths)
    saved = shard(copy.deepcopy(reference), mesh)
    checkpoint = os.path.join(directory, "dcp")
    dcp_save(get_model_state_dict(saved), checkpoint_id=checkpoint)
    resumed = build(cfg, seed=1)
    out["dcp_blob_lengths_differ"] = blob_lengths(resumed.state_dict()) != blob_lengths(reference_sd)
    shard(resumed, mesh)
    target = get_model_state_dict(resumed)
    dcp_load(target, checkpoint_id=checkpoint)
    set_model_state_dict(resumed, target)
    out["dcp_diff"] = same_state(get_model_state_dict(resumed, options=full), reference_sd)
    out["dcp_logits_equal"] = torch.equal(logits(resumed), reference_logits)

    # bad input: a full state dict whose gate_proj is quantized transposed (the same byte counts) is refused
    key = "model.layers.0.mlp.gate_proj.base_layer.weight"
    gate = reference_sd[key + ".quant_state.bitsandbytes__nf4"]
    shape = json.loads(bytes(gate.numpy()).decode())["shape"]
    flipped = LinearNF4.from_linear(torch.nn.Linear(shape[0], shape[1], bias=False)).state_dict(prefix=key[:-6])
    try:
        set_model_state_dict(resumed, {**reference_sd, **flipped}, options=full)
        out["sharded_transposed_error"] = ""
    except RuntimeError as err:
        out["sharded_transposed_error"] = str(err)
    out["sharded_transposed_key"] = key

    # meta-device construction, fully_shard, to_empty, then a full state dict
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(cfg)
    skeleton = prepare_model(skeleton, r=4, alpha=8).train()
    out["meta_skeleton_bytes"] = nbytes(list(base_tensors(skeleton)), False)
    shard(skeleton, mesh)
    skeleton.to_empty(device="cpu")
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config=cfg)
    for name, buffer in rotary.named_buffers():  # non-persistent buffers are not in any state dict
        getattr(skeleton.model.rotary_emb, name).copy_(buffer)
    set_model_state_dict(skeleton, dict(reference_sd), options=full)
    out["meta_diff"] = same_state(get_model_state_dict(skeleton, options=full), reference_sd)
    out["meta_logits_equal"] = torch.equal(logits(skeleton), reference_logits)

    # mixed precision: bf16 compute, the 4-bit codes and fp32 constants untouched
    mixed = shard(copy.deepcopy(reference), mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    # (a LoRALinear reads its 4-bit base's tensors inside its own forward: the hook sits there)
    layer = next(m for m in mixed.modules() if isinstance(m, LoRALinear) and m.is_quantized)
    unsharded = next(m for m in reference.modules() if isinstance(m, LinearNF4))
    seen = {}

    def record(lora, args):
        module = lora.base_layer
        seen.update(
            {name: str(getattr(module, name).dtype) for name in ("weight", "weight_absmax", *_NESTED)},
            x=str(args[0].dtype),
            decoded_equal=torch.equal(module.dequantize(torch.float32), unsharded.dequantize(torch.float32)),
        )

    handle = layer.register_forward_pre_hook(record)
    ids = batch(0)
    loss = mixed(input_ids=ids, labels=ids).loss
    loss.backward()
    handle.remove()
    out["mixed_precision_seen"] = seen
    out["mixed_precision_loss_finite"] = bool(torch.isfinite(loss))
    out["mixed_precision_lora_grads"] = all(
        p.grad is not None for n, p in mixed.named_parameters() if p.requires_grad and "lora_" in n
    )
    out["mixed_precision_base_diff"] = same_state(
        {k: v for k, v in get_model_state_dict(mixed, options=full).items() if "lora_" not in k},
        {k: v for k, v in reference_sd.items() if "lora_" not in k},
    )


_NESTED = ("weight_nested_absmax", "weight_nested_offset")


def ddp(cfg, out: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = build(cfg, seed=0)
    single = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    out["base_bytes"] = nbytes(list(base_tensors(model)), False)
    sent = []
    original = dist._broadcast_coalesced  # what DDP's construction and its per-forward buffer sync call

    def counting(group, tensors, *args, **kwargs):
        sent.append(sum(t.numel() * t.element_size() for t in tensors))
        return original(group, tensors, *args, **kwargs)

    dist._broadcast_coalesced = counting
    try:
        wrapped = DistributedDataParallel(model)
        out["bytes_broadcast_at_construction"] = sum(sent)
        sent.clear()
        out["losses_ddp"] = train(model, wrapped)
        out["bytes_broadcast_per_step"] = sum(sent) / STEPS
    finally:
        dist._broadcast_coalesced = original
    out["losses_single"] = train(single)
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    out["base_diff"] = same_state(after, before)


def main(directory: str, case: str, hidden: int, intermediate: int) -> None:
    dist.init_process_group("gloo")
    try:
        torch.set_num_threads(1)
        cfg = config(hidden, intermediate)
        out: dict = {"world": dist.get_world_size()}
        if case == "fsdp2":
            fsdp2(cfg, out, directory)
        elif case == "ddp":
            ddp(cfg, out)
        else:
            raise ValueError(f"unknown case {case!r}")
        path = os.path.join(directory, f"{case}.rank{dist.get_rank()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(path + ".tmp", path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
