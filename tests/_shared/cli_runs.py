"""Tiny local models and argument lists for the ``lowrank`` command's tests (tests/lowrank/cli/)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from lowrank import data as D

SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]
TOPICS = ["account", "billing", "shipping", "technical"]


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizer over the shipped data sets' vocabulary (small vocab: fast tiny models)."""
    split = pre_tokenizers.Whitespace().pre_tokenize_str
    words = set()
    for name in ("topics_train.jsonl", "topics_eval.jsonl", "records_train.jsonl", "records_eval.jsonl"):
        for _, record in D.read_records(D.shipped(name)):
            for value in record.values():
                words |= {w for w, _ in split(value.lower())}
    vocab = {t: i for i, t in enumerate(SPECIAL + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def bert_config(vocab_size: int, **extra) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        **extra,
    )


def save_tiny_models(root: Path) -> dict[str, str]:
    """bert (no head), llama (causal), gpt2 (Conv1D) with the word tokenizer, saved under ``root``."""
    tok = word_tokenizer()
    torch.manual_seed(0)
    bert = transformers.BertModel(bert_config(len(tok)))
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
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
    )
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=2
        )
    )
    dirs = {}
    for name, model in (("bert", bert), ("llama", llama), ("gpt2", gpt2)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


def cls_args(model_dirs, out, *extra) -> list[str]:
    return [
        "finetune",
        "--model",
        model_dirs["bert"],
        "--output",
        str(out),
        "--batch-size",
        "16",
        "--lr",
        "5e-3",
        "--no-progress",
        *extra,
    ]


def gen_args(model_dirs, out, *extra) -> list[str]:
    return [
        "finetune",
        "--task",
        "generation",
        "--model",
        model_dirs["llama"],
        "--method",
        "full",
        "--output",
        str(out),
        "--batch-size",
        "16",
        "--lr",
        "1e-2",
        "--max-new-tokens",
        "12",
        "--no-progress",
        *extra,
    ]


def tree(path: Path) -> dict[str, int]:
    """Every file under ``path`` with its mtime (to check that a failed command changed nothing)."""
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(Path(path).rglob("*"))}
