"""Data files: reading, validation (file:line in every error), tokenization, collation, shipped sets."""

import json

import pytest
import torch

from lowrank import data as D


class WordTokenizer:
    """Whitespace tokenizer with a growing vocabulary (ids from 10), eos = 2, sep = 3, pad = 0."""

    eos_token_id, sep_token_id, bos_token_id, pad_token_id = 2, 3, None, 0

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]
        return {"input_ids": ids + ([self.sep_token_id] if add_special_tokens else [])}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_and_csv_records_with_line_numbers(tmp_path):
    jsonl = write(tmp_path, "a.jsonl", '{"text": "a b", "label": "x"}\n\n{"text": "c", "label": "y"}\n')
    assert D.read_records(jsonl) == [(1, {"text": "a b", "label": "x"}), (3, {"text": "c", "label": "y"})]
    csv_path = write(tmp_path, "a.csv", 'prompt,response\n"p, q",r\n"multi\nline",s\n')
    records = D.read_records(csv_path)
    assert records == [(2, {"prompt": "p, q", "response": "r"}), (4, {"prompt": "multi\nline", "response": "s"})]
    assert D.detect_task(records, csv_path) == "generation"


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n', r"bad\.jsonl:2: not valid JSON"),
        ("list.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', r"list\.jsonl:2: expected a JSON object"),
        ("empty.jsonl", "\n\n", r"holds no records \(empty split\)"),
        ("empty.csv", "", r"no header row"),
        ("cells.csv", "text,label\na,b,c\n", r"cells\.csv:2: more cells"),
        ("x.txt", "text", r"expected a \.jsonl or \.csv file"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, expected):
    with pytest.raises(D.DataError, match=expected):
        D.read_records(write(tmp_path, name, text))


def test_missing_file():
    with pytest.raises(D.DataError, match="does not exist"):
        D.read_records("/nonexistent/data.jsonl")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(D.DataError, match="not UTF-8"):
        D.read_records(path)


def test_unknown_fields(tmp_path):
    path = write(tmp_path, "f.jsonl", '{"question": "a", "answer": "b"}\n')
    with pytest.raises(D.DataError, match=r"f\.jsonl:1: cannot tell the task"):
        D.detect_task(D.read_records(path), path)


def test_classification_validation(tmp_path):
    tok = WordTokenizer()
    path = write(
        tmp_path,
        "c.jsonl",
        "\n".join(
            json.dumps(r)
            for r in [
                {"text": "good movie", "label": "pos"},
                {"text": "bad movie", "label": "neg"},
                {"text": "fine", "label": "neutral"},
            ]
        )
        + "\n",
    )
    labels = D.LabelSet.from_training(D.read_records(path), path)
    assert labels.names == ["neg", "neutral", "pos"]
    examples = D.load_classification(path, tok, 16, labels, head_size=3)
    assert [e["labels"] for e in examples] == [2, 0, 1]
    assert examples[0]["input_ids"][-1] == tok.sep_token_id
    with pytest.raises(D.DataError, match=r"c\.jsonl:1: label 'pos' is class 2, outside the model head's range 0\.\.1"):
        D.load_classification(path, tok, 16, labels, head_size=2)
    with pytest.raises(D.DataError, match=r"c\.jsonl:1: the text is 3 tokens, longer than the model allows \(2\)"):
        D.load_classification(path, tok, 2, labels, head_size=3)
    bad = write(
        tmp_path, "b.jsonl", '{"text": "a", "label": 0}\n{"text": "", "label": 1}\n{"text": "c", "label": 1.5}\n'
    )
    with pytest.raises(D.DataError, match=r"b\.jsonl:2: field 'text' is empty"):
        D.load_classification(bad, tok, 16, D.LabelSet(["0", "1"]), 2)
    missing = write(tmp_path, "m.jsonl", '{"text": "a"}\n')
    with pytest.raises(D.DataError, match=r"m\.jsonl:1: missing field 'label'"):
        D.load_classification(missing, tok, 16, D.LabelSet(["0"]), 1)


def test_integer_labels_keep_their_values(tmp_path):
    path = write(tmp_path, "i.jsonl", '{"text": "a", "label": 2}\n{"text": "b", "label": 0}\n')
    labels = D.LabelSet.from_training(D.read_records(path), path)
    assert labels.names == ["0", "1", "2"]
    assert [e["labels"] for e in D.load_classification(path, WordTokenizer(), 8, labels, 3)] == [2, 0]


def test_generation_examples_mask_the_prompt(tmp_path):
    tok = WordTokenizer()
    path = write(tmp_path, "g.jsonl", '{"prompt": "a b c", "response": "x y"}\n')
    (example,) = D.load_generation(path, tok, 16)
    assert example["prompt_ids"] == [10, 11, 12, tok.eos_token_id]
    assert example["input_ids"] == [10, 11, 12, 2, 13, 14, 2]
    assert example["labels"] == [-100] * 4 + [13, 14, 2]
    assert example["reference"] == "x y"
    with pytest.raises(D.DataError, match=r"g\.jsonl:1: prompt \+ response is 7 tokens"):
        D.load_generation(path, tok, 6)


def test_collate_and_target_count():
    batch = D.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert D.target_count(batch) == 2  # next-token targets: 6 and 7 (the first position is never a target)
    cls = D.collate([{"input_ids": [1, 2], "labels": 3}, {"input_ids": [4], "labels": 0}], 0)
    assert cls["labels"].tolist() == [3, 0] and D.target_count(cls) == 2
    assert cls["input_ids"].dtype == torch.long


def test_shipped_data_sets():
    train = [r for _, r in D.read_records(D.shipped("topics_train.jsonl"))]
    evals = [r for _, r in D.read_records(D.shipped("topics_eval.jsonl"))]
    assert len(train) >= 200 and len(evals) >= 50
    classes = {r["label"] for r in train}
    assert len(classes) == 4 and {r["label"] for r in evals} <= classes
    assert not {r["text"] for r in train} & {r["text"] for r in evals}, "held-out split overlaps training"
    gen_train = [r for _, r in D.read_records(D.shipped("records_train.jsonl"))]
    gen_eval = [r for _, r in D.read_records(D.shipped("records_eval.jsonl"))]
    assert len(gen_train) >= 200 and not {r["prompt"] for r in gen_train} & {r["prompt"] for r in gen_eval}
    with pytest.raises(D.DataError, match="no shipped data set"):
        D.shipped("nope.jsonl")
