"""One QLoRA training step of a Llama-shaped model: lowrank vs PEFT + bitsandbytes. Tokens/s and peak memory.

Model: random weights in the Llama-3-8B configuration (hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab
128,256), 8 decoder layers on GPU; 2 tiny layers on CPU. Batch 1 × 2048 tokens (64 on CPU), bf16.
LoRA r = 16, alpha = 32, no dropout, on all seven projections of every layer; their bases NF4 with double
quant (blocksize 64); embeddings, norms and the LM head frozen in bf16. No gradient checkpointing and no
fp32 up-casting of the frozen parts, on both sides (PEFT's ``prepare_model_for_kbit_training`` is not
applied, so both run the same numerics budget). Optimizer: ``torch.optim.AdamW`` over the adapters for both.

A step is ``loss = model(ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad()``; its
synchronised wall time is the figure (median of 3, after 3 untimed steps). Work per step, for the fraction-of-peak
column (an MFU): ``4·T·(linear + head params)`` (forward and dX; frozen weights get no dW) ``+ 6·L·T²·H``
(causal attention, forward and backward); the adapters' work is left out.
Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps, model and optimizer state included.
"""

from __future__ import annotations

import gc
import re

import pytest
import torch
from _harness import DEVICE, DTYPE, ON_GPU, SUITE, TINY, optional_module, skip_reason

import lowrank

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LLAMA_TINY = dict(
    LLAMA3_8B, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=512
)
LAYERS = 2 if TINY else 8
SEQ_LEN = 64 if TINY else 2048
BATCH = 1
RANK, ALPHA = 16, 32
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TIMED_STEPS = 3

PROVIDERS = ("lowrank", "peft_bnb") if SUITE == "goal" else ("lowrank", "peft_bnb", "lowrank:torch")


def build_llama():
    """A randomly initialised Llama (bf16, on the benchmark device)."""
    transformers = optional_module("transformers")[0]
    config = transformers.LlamaConfig(num_hidden_layers=LAYERS, **(LLAMA_TINY if TINY else LLAMA3_8B))
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device(DEVICE):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(DTYPE), config


def step_flops(config) -> float:
    h, t, layers = config.hidden_size, BATCH * SEQ_LEN, config.num_hidden_layers
    kv = h // config.num_attention_heads * config.num_key_value_heads
    linear = layers * (h * h * 2 + h * kv * 2 + 3 * h * config.intermediate_size)
    head = h * config.vocab_size
    return 4.0 * t * (linear + head) + 6.0 * layers * SEQ_LEN**2 * h * BATCH


def prepare_lowrank(model):
    return lowrank.prepare_model(
        model, r=RANK, alpha=ALPHA, dropout=0.0, target_modules="all-linear", quantize="nf4", double_quant=True
    )


def prepare_peft_bnb(model):
    """Swap every decoder-layer nn.Linear for a bitsandbytes NF4 Linear4bit, then wrap with PEFT LoRA."""
    bnb = optional_module("bitsandbytes")[0]
    peft = optional_module("peft")[0]
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=DTYPE,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64
                )
                if child.bias is not None:
                    quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, quantized.to(DEVICE))  # Params4bit quantizes when moved to the device
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(PROJECTIONS), task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(bench, provider: str, monkeypatch) -> None:
    base_provider, _, backend = provider.partition(":")
    reason = skip_reason(base_provider)
    if reason:
        pytest.skip(f"{provider}: {reason}")
    if optional_module("transformers")[0] is None:
        pytest.skip(f"{provider}: transformers is not installed ({optional_module('transformers')[1]})")
    if backend:  # the whole step with one backend forced, to show what the kernels contribute
        monkeypatch.setenv("LOWRANK_BACKEND", backend)
    model, config = build_llama()
    model = prepare_lowrank(model) if base_provider == "lowrank" else prepare_peft_bnb(model)
    gc.collect()
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(config.vocab_size, (BATCH, SEQ_LEN), generator=generator).to(DEVICE)
    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    if ON_GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    static_bytes = torch.cuda.memory_allocated() if ON_GPU else None
    flops = step_flops(config)
    info = bench.run(
        step,
        op="train_step",
        case={
            "model": f"llama3-8b-shaped x{LAYERS} layers" if not TINY else f"llama-tiny x{LAYERS}",
            "seq": SEQ_LEN,
            "r": RANK,
        },
        provider=provider,
        flops=flops,
        ours=provider == "lowrank",
        rounds=TIMED_STEPS,
        warmup_calls=1,
        kernel_timing=False,
        extra={
            "trainable_params": sum(p.numel() for p in trainable),
            "adapter_tensors": len(adapters),
            "adapters_per_projection_ok": _adapters_on_all_projections(adapters),
            "static_mem_bytes": static_bytes,
        },
    )
    peak = torch.cuda.max_memory_allocated() if ON_GPU else None
    first, last = float(losses[0]), float(losses[-1])
    outcome = {
        "tokens_per_s": BATCH * SEQ_LEN / info["wall_median_s"],
        "peak_mem_bytes": peak,
        "loss_first": first,
        "loss_last": last,
    }
    info.update(outcome)  # the record written when the test ends holds this dict
    bench.benchmark.extra_info.update(outcome)
    assert torch.isfinite(torch.tensor([first, last])).all(), f"non-finite loss: {first} -> {last}"


def _adapters_on_all_projections(names: list[str]) -> bool:
    """Both providers must adapt the same 7 projections × layers (else the comparison is unfair)."""
    found = {(int(m.group(1)), m.group(2)) for n in names if (m := re.search(r"layers\.(\d+)\..*?(\w+_proj)", n))}
    return found == {(i, p) for i in range(LAYERS) for p in PROJECTIONS}
