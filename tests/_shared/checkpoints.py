"""Checkpoint directories of tiny transformers models built from config (random weights, no downloads):
what the streamed-loading, saving and distributed tests read."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

VOCAB = 128
#: (architecture, tied embeddings) pairs the loading tests cover
CASES = (("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False), ("gpt2", True), ("bert", False))


def tiny_model(arch: str, tied: bool = False, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A small model of ``arch`` (hidden 64) in eval mode, fp32; ``tied``: output head shares the embedding."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4
    )
    if arch == "llama":
        config = transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=tied)
        model = transformers.LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=tied)
        model = transformers.Qwen2ForCausalLM(config)
    elif arch == "gpt2":  # Conv1D layers; GPT-2 always ties lm_head to wte
        config = transformers.GPT2Config(
            n_embd=64, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config)
    elif arch == "bert":
        config = transformers.BertConfig(**common, max_position_embeddings=64, num_labels=3)
        model = transformers.BertForSequenceClassification(config)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return model.eval()


def write_checkpoint(model: torch.nn.Module, directory: Path, sharded: bool = False) -> Path:
    """``model.save_pretrained`` into ``directory`` (several shards + an index when ``sharded``)."""
    kwargs = {"max_shard_size": "60KB"} if sharded else {"max_shard_size": "10GB"}
    model.save_pretrained(directory, **kwargs)
    index = directory / "model.safetensors.index.json"
    assert index.is_file() == sharded, sorted(p.name for p in directory.iterdir())
    if sharded:
        assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    return directory


def tokens(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def word_tokenizer():
    """A word-level tokenizer over the shipped data sets' vocabulary (a small vocabulary: fast tiny models)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from lowrank import data as D

    split = pre_tokenizers.Whitespace().pre_tokenize_str
    words = set()
    for name in ("topics_train.jsonl", "topics_eval.jsonl", "records_train.jsonl", "records_eval.jsonl"):
        for _, record in D.read_records(D.shipped(name)):
            for value in record.values():
                words |= {w for w, _ in split(value.lower())}
    special = ["[PAD]", "[UNK]", "[EOS]"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + sorted(words))}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def tiny_llama_dir(directory: Path) -> Path:
    """A tiny tied Llama checkpoint with :func:`word_tokenizer`'s vocabulary and tokenizer files (for the CLI)."""
    tok = word_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
