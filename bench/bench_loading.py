"""Load time and peak host memory of a 4-bit model from a sharded bf16 checkpoint, side by side.

    python bench/bench_loading.py [--dir DIR] [--layers 22 --hidden 2048 --intermediate 5632 --vocab 32000]

The bench writes a Llama-shaped checkpoint with random bf16 weights (default: 1.1 B parameters, TinyLlama's
shape, 2.2 GB in 400 MB shards; kept in ``--dir`` and reused when its config matches), then loads it once per
provider, each in a fresh process on the CPU:

* ``lowrank``: ``lowrank.from_pretrained(dir)`` (streamed, quantized as it is read, LoRA r = 16 added);
* ``transformers+prepare``: ``AutoModelForCausalLM.from_pretrained(dir, dtype=bf16)`` then
  ``lowrank.prepare_model`` (the dense model first, then quantized in place);
* ``transformers+bnb``: transformers with ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)``
  (bitsandbytes quantizes while loading), when bitsandbytes is installed.

For each: wall time of the load call, peak RSS above the process's RSS just before the call (Linux:
``/proc/self/clear_refs`` resets the high-water mark, ``VmHWM`` reads it), and the loaded model's bytes.
Ratios are against ``lowrank``. Not a test: nothing is asserted. Disk: the checkpoint's size; time: minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time
import torch, transformers
import lowrank
torch.set_num_threads(int(sys.argv[3]))

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

provider, directory = sys.argv[1], sys.argv[2]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
t0 = time.perf_counter()
if provider == "lowrank":
    model = lowrank.from_pretrained(directory, dtype=torch.bfloat16)
elif provider == "transformers+prepare":
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    lowrank.prepare_model(model)
else:
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=config, dtype=torch.bfloat16, device_map="cpu"
    )
seconds = time.perf_counter() - t0
peak = status("VmHWM")
tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
print(json.dumps({"provider": provider, "seconds": seconds, "peak_rise": peak - base, "model_bytes": model_bytes}))
"""


def write_checkpoint(directory: Path, layers: int, hidden: int, intermediate: int, vocab: int, shard_mb: int) -> dict:
    import torch
    import transformers

    from lowrank import files

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 512),
        tie_word_embeddings=False,
    )
    record = {**config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    index = directory / "model.safetensors.index.json"
    if index.is_file() and (directory / "config.json").is_file():
        saved = files.read_json(directory / "config.json")
        if all(
            saved.get(k) == record[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        ):
            return files.read_json(index)["metadata"]
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        current.append(name)
        size += 2 * torch.Size(shape).numel()
        if size > shard_mb * 2**20:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    weight_map = {}
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in names}
        files.write_safetensors(directory / shard, tensors)
        weight_map.update(dict.fromkeys(names, shard))
        del tensors
    params = sum(torch.Size(s).numel() for s in shapes.values())
    largest = max(2 * torch.Size(s).numel() for s in shapes.values())
    metadata = {"total_size": 2 * params, "parameters": params, "largest_tensor_bytes": largest}
    files.write_json(index, {"metadata": metadata, "weight_map": weight_map})
    files.write_json(directory / "config.json", record)
    return metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="bench/results/loading-checkpoint", help="where the checkpoint is written")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--providers", default="lowrank,transformers+prepare,transformers+bnb")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    directory = Path(args.dir)
    t0 = time.perf_counter()
    meta = write_checkpoint(directory, args.layers, args.hidden, args.intermediate, args.vocab, args.shard_mb)
    print(
        f"checkpoint {directory}: {meta['parameters'] / 1e9:.2f} B parameters, {meta['total_size'] / 2**30:.2f} GiB "
        f"bf16, largest tensor {meta['largest_tensor_bytes'] / 2**20:.0f} MiB ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    rows = []
    for provider in args.providers.split(","):
        if provider == "transformers+bnb":
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                print(f"{provider}: skipped (bitsandbytes is not installed)")
                continue
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, provider, str(directory), str(args.threads)], capture_output=True, text=True
        )
        if done.returncode != 0:
            print(f"{provider}: failed\n{done.stderr[-2000:]}")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if not rows:
        return
    ref = next((r for r in rows if r["provider"] == "lowrank"), rows[0])
    print("\n| provider | load s | peak RSS rise MiB | model MiB | time ÷ lowrank | peak ÷ lowrank |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['provider']} | {r['seconds']:.1f} | {r['peak_rise'] / 2**20:.0f} | {r['model_bytes'] / 2**20:.0f} | "
            f"{r['seconds'] / ref['seconds']:.2f} | {r['peak_rise'] / max(ref['peak_rise'], 1):.2f} |"
        )
    bound = ref["model_bytes"] + 2 * meta["largest_tensor_bytes"] + 150 * 2**20
    print(f"\nlowrank bound (model + 2 x largest tensor + 150 MiB): {bound / 2**20:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
