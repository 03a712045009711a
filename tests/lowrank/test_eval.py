"""Evaluation: ROUGE against rouge-score itself, classification metrics, loss/perplexity, greedy generation."""

import math

import pytest
import torch
import transformers
from helpers import tiny_llama
from rouge_score import rouge_scorer

from lowrank import data as D
from lowrank.evaluate import classification_metrics, evaluate, frequent_share, frequent_tokens, generate, rouge

PAIRS = [  # (prediction, reference)
    ("the cats were running quickly to the houses", "the cat runs quickly to the house"),
    ("a completely different sentence", "nothing in common here"),
    ("Anna is a baker. She lives in Rome!", "Anna is a baker who lives in Rome. She has a dog."),
]


def test_rouge_matches_rouge_score_with_stemming_and_reference_first():
    ours = rouge([p for p, _ in PAIRS], [r for _, r in PAIRS])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    split = lambda s: s.replace(". ", ".\n").replace("! ", "!\n")  # noqa: E731  sentence per line for Lsum
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        expected = sum(scorer.score(split(r), split(p))[key].fmeasure for p, r in PAIRS) / len(PAIRS)
        assert ours[key] == pytest.approx(expected, abs=1e-12)
    # stemming on: "runs"/"running", "cat"/"cats" match, so ROUGE-1 of the first pair beats the unstemmed score
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False).score(PAIRS[0][1], PAIRS[0][0])["rouge1"].fmeasure
    assert rouge([PAIRS[0][0]], [PAIRS[0][1]])["rouge1"] > plain
    assert rouge(["x y z"], ["x y z"]) == {k: 1.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    with pytest.raises(ValueError, match="equally many"):
        rouge(["a"], [])


def test_classification_metrics_known_values():
    m = classification_metrics([0, 0, 1, 2], [0, 1, 1, 2])
    assert m["accuracy"] == 0.75
    # per-class F1: c0 = 2/3, c1 = 2/3, c2 = 1
    assert m["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_frequent_tokens_and_share():
    assert frequent_tokens([[5, 5, 6], [6, 7, 5]], 2) == {5, 6}
    assert frequent_tokens([[9, 8]], 1) == {8}  # ties go to the smaller id
    assert frequent_share([[5, 9], [6]], {5, 6}) == pytest.approx(2 / 3)
    assert frequent_share([[]], {5}) == 0.0


def test_evaluate_loss_and_perplexity_match_manual_cross_entropy():
    model = tiny_llama(vocab=64).eval()
    examples = [
        {"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]},
        {"input_ids": [1, 9, 10], "labels": [-100, 9, 10]},
    ]
    metrics = evaluate(model, examples, "generation", batch_size=2)
    total, count = 0.0, 0
    for e in examples:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(e["labels"][1:])
        keep = targets != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_evaluate_classification_reports_accuracy_and_f1():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        max_position_embeddings=32,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    examples = [{"input_ids": [1, 2 + i, 3], "labels": i % 3} for i in range(7)]
    metrics = evaluate(model, examples, "classification", batch_size=3)
    batch = D.collate(examples, 0)
    predictions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    assert metrics["accuracy"] == pytest.approx(float((predictions == batch["labels"]).float().mean()))
    assert set(metrics) == {"loss", "perplexity", "accuracy", "f1"}


def test_greedy_generation_matches_transformers_generate():
    model = tiny_llama(vocab=64).eval()
    prompt = [1, 7, 3, 9]
    (ours,) = generate(model, [prompt], max_new_tokens=8, eos_token_id=63)
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=63, pad_token_id=0)
    ref = ref[0, len(prompt) :].tolist()
    if 63 in ref:
        ref = ref[: ref.index(63)]
    assert ours == ref
    assert generate(model, [prompt], max_new_tokens=8, eos_token_id=63, max_length=6)[0] == ours[:2]
