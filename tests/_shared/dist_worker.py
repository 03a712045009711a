"""One rank of a distributed lowrank.train run (``torchrun ... dist_worker.py OUT MODE [--resume] [--crash-at K]``),
or the same run in one process (``MODE none``). Every rank writes ``result-rank<r>.json`` (losses, grad norms);
rank 0 also writes ``trainable.safetensors`` (the final trainable parameters)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from checkpoints import VOCAB, tiny_model

import lowrank
from lowrank.config import TrainConfig
from lowrank.train import train

STEPS = 6


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    prepared = lowrank.prepare_model(tiny_model("llama"), r=4, alpha=8)
    with torch.no_grad():  # non-zero B: every adapter gets a gradient from the first step
        for name, p in prepared.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return prepared


def data(n: int = 30) -> list[dict]:
    """A copy task with varying lengths (target normalisation across ranks matters)."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        body = torch.randint(10, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        prompt = [1, *body, 3]
        out.append({"input_ids": prompt + body + [2], "labels": [-100] * len(prompt) + body + [2]})
    return out


def config(out: str, mode: str, resume: bool = False, batch_size: int = 4) -> TrainConfig:
    return TrainConfig(
        task="generation",
        batch_size=batch_size,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=1,
        max_steps=STEPS,
        save_every=2,
        keep_last=3,
        output_dir=out,
        resume=resume,
        distributed=mode,
        progress=False,
        seed=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("mode")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--crash-at", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)

    def crash(entry: dict) -> None:  # a kill after this step's checkpoint: the whole job dies
        if entry["step"] == args.crash_at:
            os._exit(17)

    m = model()
    result = train(
        m,
        data(),
        None,
        config(args.out, args.mode, args.resume, args.batch_size),
        on_step=crash if args.crash_at else None,
    )
    rank = int(os.environ.get("RANK", "0"))
    record = {key: [h[key] for h in result.history] for key in ("loss", "grad_norm", "delta_w_total")}
    Path(args.out, f"result-rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        trainable = {n: p.detach().contiguous() for n, p in m.named_parameters() if p.requires_grad}
        lowrank.files.write_safetensors(Path(args.out) / "trainable.safetensors", trainable)


if __name__ == "__main__":
    main()
