"""Evaluation: loss and perplexity; accuracy and macro-F1 (classification); greedy generation, ROUGE, and
the share of generated tokens that fall in a frequent-token set (generation).

ROUGE follows the usual convention (docs/train.md): ``rouge_score.RougeScorer([...], use_stemmer=True)``,
``scorer.score(reference, prediction)`` (reference first), F-measure averaged over examples, in [0, 1].
For ROUGE-Lsum each text is split into sentences on ``.``/``!``/``?`` followed by white space and joined
with newlines (a regex instead of nltk's punkt, which would need a download).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

from lowrank.data import collate, target_count
from lowrank.loss import autocast_for, loss_sum

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@torch.no_grad()
def evaluate(
    model,
    data: Sequence[dict],
    task: str,
    *,
    batch_size: int = 16,
    pad_token_id: int = 0,
    device: torch.device | str | None = None,
    precision: str = "auto",
) -> dict[str, float]:
    """Mean loss per target and its perplexity; for classification also ``accuracy`` and ``f1`` (macro)."""
    if not data:
        raise ValueError("evaluation data is empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    predictions, labels = [], []
    for start in range(0, len(data), batch_size):
        batch = collate(data[start : start + batch_size], pad_token_id)
        count += target_count(batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(precision, device):
            loss, logits = loss_sum(model, batch, task)
        total += loss.item()
        if task == "classification":
            predictions += logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
    model.train(was_training)
    mean = total / max(count, 1)
    metrics = {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}
    if task == "classification":
        metrics.update(classification_metrics(predictions, labels))
    return metrics


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes present in labels or predictions."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need equally many predictions and labels (> 0), got {len(predictions)} and {len(labels)}")
    accuracy = sum(p == t for p, t in zip(predictions, labels, strict=True)) / len(labels)
    f1s = []
    for c in sorted(set(labels) | set(predictions)):
        tp = sum(p == c and t == c for p, t in zip(predictions, labels, strict=True))
        fp = sum(p == c and t != c for p, t in zip(predictions, labels, strict=True))
        fn = sum(p != c and t == c for p, t in zip(predictions, labels, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": accuracy, "f1": sum(f1s) / len(f1s)}


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int,
    max_length: int | None = None,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids), stopping at ``eos_token_id`` (not included).

    One prompt at a time (no padding, so any causal LM that maps input_ids -> logits works).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        new: list[int] = []
        for _ in range(max_new_tokens):
            if max_length is not None and ids.shape[1] >= max_length:
                break
            out = model(input_ids=ids)
            logits = out.logits if hasattr(out, "logits") else out
            token = int(logits[0, -1].argmax())
            if token == eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
        outputs.append(new)
    model.train(was_training)
    return outputs


def _sentences_on_lines(text: str) -> str:
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures (stemming on) of predictions against references."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not references:
        raise ValueError(
            f"need equally many predictions and references (> 0), got {len(predictions)} and {len(references)}"
        )
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(_sentences_on_lines(reference), _sentences_on_lines(prediction))
        for key in ROUGE_TYPES:
            sums[key] += scores[key].fmeasure
    return {key: value / len(references) for key, value in sums.items()}


def frequent_tokens(sequences: Sequence[Sequence[int]], k: int) -> set[int]:
    """The ``k`` most frequent token ids over ``sequences`` (ties broken by smaller id)."""
    counts = Counter(t for seq in sequences for t in seq)
    return {t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]}


def frequent_share(generated: Sequence[Sequence[int]], frequent: set[int]) -> float:
    """Fraction of generated tokens that are in ``frequent`` (0 when nothing was generated)."""
    total = sum(len(seq) for seq in generated)
    return sum(t in frequent for seq in generated for t in seq) / total if total else 0.0


def evaluate_generation(
    model,
    data: Sequence[dict],
    tokenizer,
    *,
    frequent: set[int],
    max_new_tokens: int = 32,
    max_length: int | None = None,
    device=None,
) -> dict:
    """Greedy outputs for each example's prompt; ROUGE against its reference and the frequent-token share."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    generated = generate(
        model,
        [e["prompt_ids"] for e in data],
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        max_length=max_length,
        device=device,
    )
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]
    metrics = rouge(texts, [e["reference"] for e in data])
    metrics["frequent_token_share"] = frequent_share(generated, frequent)
    return {"metrics": metrics, "predictions": texts}


__all__ = [
    "ROUGE_TYPES",
    "classification_metrics",
    "evaluate",
    "evaluate_generation",
    "frequent_share",
    "frequent_tokens",
    "generate",
    "rouge",
]
