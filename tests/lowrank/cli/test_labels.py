"""Classification labels go through the head's id2label / label2id."""

from __future__ import annotations

import json

import torch
import transformers
from cli_runs import TOPICS, bert_config, cls_args, word_tokenizer

from lowrank import data as D
from lowrank.cli import main


def test_a_trained_head_scores_through_its_id2label(model_dirs, tmp_path, capsys):
    """Head rows in a non-alphabetical order: eval maps data labels through id2label, as a pipeline would."""
    order = ["technical", "account", "shipping", "billing"]
    tok = word_tokenizer()
    torch.manual_seed(1)
    model = transformers.BertForSequenceClassification(
        bert_config(
            len(tok), num_labels=4, id2label=dict(enumerate(order)), label2id={n: i for i, n in enumerate(order)}
        )
    ).eval()
    model.save_pretrained(tmp_path / "cls")
    tok.save_pretrained(tmp_path / "cls")
    data = D.shipped("topics_eval.jsonl")
    records = D.read_records(data)
    with torch.no_grad():
        predicted = [
            model.config.id2label[int(model(**tok(r["text"], return_tensors="pt")).logits.argmax())] for _, r in records
        ]
    expected = sum(p == r["label"] for p, (_, r) in zip(predicted, records, strict=True)) / len(records)

    assert main(["eval", "--model", str(tmp_path / "cls"), "--data", str(data)]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["accuracy"] == expected
    labels = D.LabelSet.from_config(json.loads((tmp_path / "cls" / "config.json").read_text())["id2label"])
    assert labels.names == order and labels.index("account", data, 1, 4) == 1


def test_a_new_head_is_named_from_the_training_data_and_keeps_the_names(model_dirs, tmp_path):
    out = tmp_path / "run"
    assert main(cls_args(model_dirs, out, "--max-steps", "1", "--method", "full")) == 0
    assert json.loads((out / "run.json").read_text())["label_names"] == TOPICS
    merged = tmp_path / "merged"
    out_lora = tmp_path / "lora"
    assert main(cls_args(model_dirs, out_lora, "--max-steps", "1")) == 0
    assert main(["merge", "--run", str(out_lora), "--output", str(merged)]) == 0
    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(TOPICS)}
    assert config["label2id"] == {n: i for i, n in enumerate(TOPICS)}


def test_integer_labels_on_a_head_with_default_names(tmp_path):
    labels = D.LabelSet.from_config({"0": "LABEL_0", "1": "LABEL_1"})
    assert labels.index(1, "f.jsonl", 1, 2) == 1 and labels.index("LABEL_0", "f.jsonl", 2, 2) == 0
