"""Bytes per rank of a QLoRA model before and after FSDP2's ``fully_shard``, and bytes DDP broadcasts per step.

Run: ``python bench/bench_distributed.py [--world 2] [--layers 4] [--hidden 512] [--intermediate 1536]``
(gloo on CPU; it starts ``torch.distributed.run`` on itself). Models, built from a Llama config with random
weights (no download), LoRA r = 8 on every linear layer, ``fully_shard`` on each decoder layer then the root:

* ``lowrank``: ``prepare_model`` with NF4 + double quant (the 4-bit base: frozen uint8 parameters);
* ``dense``: the same model with the frozen base left in fp32 (``quantize=None``);
* ``torchao``: torchao's ``NF4Tensor`` base, when torchao is installed (reported as absent otherwise).

Figures: bytes of parameters and buffers on one rank before and after sharding, the frozen base's bytes on
one rank, and for DDP (``DistributedDataParallel`` with its default ``broadcast_buffers=True``) the bytes of
the per-forward buffer broadcast, averaged over 3 steps. Prints one JSON object per line and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile

import torch


def _model(args, quantize):
    import transformers

    from lowrank.models import prepare_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
    )
    return prepare_model(transformers.LlamaForCausalLM(cfg), r=8, alpha=16, quantize=quantize)


def _rank_bytes(model) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def _base_bytes(model) -> int:
    """Bytes on this rank of the frozen linear bases (4-bit tensors, or the dense frozen weights)."""
    from lowrank.nn import LinearNF4, LoRALinear

    total = 0
    for m in model.modules():
        if isinstance(m, LinearNF4):
            tensors = [m.weight, m.weight_absmax, m.weight_nested_absmax, m.weight_nested_offset]
        elif isinstance(m, LoRALinear) and not m.is_quantized:
            tensors = [m.base_layer.weight]
        else:
            continue
        total += sum(
            (t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors if t is not None
        )
    return total


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _worker(args) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    try:
        torch.set_num_threads(1)
        world = dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        rows = []
        for name, quantize in (("lowrank", "nf4"), ("dense", None)):
            model = _model(args, quantize)
            row = {"model": name, "world": world, "bytes_before": _rank_bytes(model), "base_before": _base_bytes(model)}
            _shard(model, mesh)
            row.update(bytes_after=_rank_bytes(model), base_after=_base_bytes(model))
            rows.append(row)
        try:
            import torchao  # noqa: F401

            rows.append({"model": "torchao", "note": "installed, but its NF4 path is not wired into this bench"})
        except ImportError:
            rows.append({"model": "torchao", "note": "not installed"})
        model = _model(args, "nf4")
        sent = []
        original = dist._broadcast_coalesced

        def counting(group, tensors, *rest, **kwargs):
            sent.append(sum(t.numel() * t.element_size() for t in tensors))
            return original(group, tensors, *rest, **kwargs)

        dist._broadcast_coalesced = counting
        try:
            ddp = DistributedDataParallel(model)
            construction = sum(sent)
            sent.clear()
            for step in range(3):
                ids = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(step))
                ddp(input_ids=ids, labels=ids).loss.backward()
        finally:
            dist._broadcast_coalesced = original
        rows.append(
            {
                "model": "lowrank-ddp",
                "world": world,
                "base_bytes": _base_bytes(model),
                "broadcast_at_construction": construction,
                "broadcast_per_step": sum(sent) / 3,
            }
        )
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(rows, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.world)]
        command += [__file__, "--worker", "--out", out, "--layers", str(args.layers), "--hidden", str(args.hidden)]
        command += ["--intermediate", str(args.intermediate)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(command, env=env, start_new_session=True)
        try:
            process.wait(timeout=args.timeout)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if process.returncode != 0:
            sys.exit(f"the ranks failed (exit {process.returncode})")
        with open(out) as f:
            rows = json.load(f)
    for row in rows:
        print(json.dumps(row))
    head = f"after fully_shard ({args.world} ranks)"
    print(f"\n| model | bytes/rank before | {head} | ratio | frozen base/rank before | after |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        if "bytes_before" in row:
            ratio = row["bytes_after"] / row["bytes_before"]
            print(
                f"| {row['model']} | {row['bytes_before']:,} | {row['bytes_after']:,} | {ratio:.3f} | "
                f"{row['base_before']:,} | {row['base_after']:,} |"
            )
        elif "note" in row:
            print(f"| {row['model']} | {row['note']} | | | | |")
    ddp = next(row for row in rows if row["model"] == "lowrank-ddp")
    print(
        f"\nDDP: 4-bit base {ddp['base_bytes']:,} bytes; "
        f"broadcast at construction {ddp['broadcast_at_construction']:,}; "
        f"per step {ddp['broadcast_per_step']:,.0f} bytes"
    )


if __name__ == "__main__":
    main()
