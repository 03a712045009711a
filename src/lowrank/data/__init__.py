"""Data for fine-tuning: read JSONL/CSV files, validate them, tokenize, and collate batches.

Two kinds of records are understood:

* classification: ``{"text": str, "label": str | int}``
* generation:     ``{"prompt": str, "response": str}``

Every problem is reported as a :class:`DataError` naming the file and the 1-based line (for CSV the
line of the row, header = line 1). Examples are plain dicts::

    classification: {"input_ids": list[int], "labels": int}
    generation:     {"input_ids": list[int], "labels": list[int] (-100 over the prompt),
                     "prompt_ids": list[int], "reference": str}

The shipped data sets (written for the project, see ``make_datasets.py``) are found with
:func:`shipped`: ``topics_train.jsonl`` / ``topics_eval.jsonl`` (4 topics of customer-support
messages, 280 / 80) and ``records_train.jsonl`` / ``records_eval.jsonl`` (record -> sentence, 240 / 60).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100
TASKS = ("classification", "generation")
_FIELDS = {"classification": ("text", "label"), "generation": ("prompt", "response")}


class DataError(ValueError):
    """A data file is missing, malformed, empty, or does not fit the model."""


def shipped(name: str) -> Path:
    """Path of a data set shipped inside the package (e.g. ``"topics_train.jsonl"``)."""
    path = Path(__file__).resolve().parent / name
    if not path.is_file():
        available = sorted(p.name for p in path.parent.iterdir() if p.suffix in (".jsonl", ".csv"))
        raise DataError(f"no shipped data set {name!r}; available: {available}")
    return path


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a ``.jsonl`` or ``.csv`` file; blank JSONL lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    records: list[tuple[int, dict]] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if suffix == ".jsonl" or suffix == ".json":
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                    records.append((line_no, record))
            elif suffix == ".csv":
                reader = csv.DictReader(f)
                if not reader.fieldnames:
                    raise DataError(f"{path}:1: the CSV file has no header row")
                for row in reader:
                    if None in row:  # more cells than header columns
                        raise DataError(f"{path}:{reader.line_num}: more cells than the header's {reader.fieldnames}")
                    records.append((reader.line_num, dict(row)))
            else:
                raise DataError(f"data file {str(path)!r}: expected a .jsonl or .csv file, got suffix {suffix!r}")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None
    if not records:
        raise DataError(f"data file {str(path)!r} holds no records (empty split)")
    return records


def detect_task(records: Sequence[tuple[int, dict]], path: str | Path) -> str:
    """``"classification"`` or ``"generation"`` from the fields of the first record."""
    _, first = records[0]
    for task, fields in _FIELDS.items():
        if all(k in first for k in fields):
            return task
    raise DataError(
        f"{path}:{records[0][0]}: cannot tell the task from fields {sorted(first)}; "
        "expected 'text' + 'label' (classification) or 'prompt' + 'response' (generation)"
    )


def _field(record: dict, key: str, path, line_no: int, kinds=(str,)):
    if key not in record:
        raise DataError(f"{path}:{line_no}: missing field {key!r} (fields present: {sorted(record)})")
    value = record[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{path}:{line_no}: field {key!r} must be {expected}, got {value!r}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{path}:{line_no}: field {key!r} is empty")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_classification_records(records: Sequence[tuple[int, dict]], path) -> None:
    """Every record has a non-empty ``text`` and a ``label`` that is a string or an integer (file:line otherwise)."""
    for line_no, record in records:
        _field(record, "text", path, line_no)
        _field(record, "label", path, line_no, kinds=(str, int))


def _label_kind(value) -> str:
    return "integer" if _is_int(value) else "string"


def check_label_kinds(records: Sequence[tuple[int, dict]], path, kind: str, reference: str) -> None:
    """All labels of ``records`` are of ``kind`` ("integer" / "string"), the kind the labels of ``reference`` have."""
    for line_no, record in records:
        if _label_kind(record["label"]) != kind:
            raise DataError(
                f"{path}:{line_no}: label {record['label']!r} is a {_label_kind(record['label'])} but the labels of "
                f"{reference} are {kind}s; use one kind of label in every file"
            )


_DEFAULT_NAME = re.compile(r"^LABEL_(\d+)$")


@dataclass
class LabelSet:
    """Class names in head order: ``names[i]`` is class ``i`` (the head's ``id2label``).

    ``source`` says where the names come from ("training data", "model head", "run"); it appears in
    the error for a label that is not one of them.
    """

    names: list[str]
    source: str = "run"

    @classmethod
    def from_training(cls, records: Sequence[tuple[int, dict]], path) -> LabelSet:
        """Names of a new head from the training labels (checked first with check_classification_records).

        Integer labels 0..max keep their values; string labels are sorted for a stable order. One
        kind of label only, and at least two classes.
        """
        kind = _label_kind(records[0][1]["label"])
        check_label_kinds(records, path, kind, f"{path} (line {records[0][0]})")
        raw = [r["label"] for _, r in records]
        if len(set(raw)) < 2:
            raise DataError(
                f"{path}: every training record has the label {raw[0]!r}; a classifier needs at least two classes"
            )
        if kind == "integer":
            if min(raw) < 0:
                line = next(n for n, r in records if r["label"] < 0)
                raise DataError(f"{path}:{line}: integer label {min(raw)} is negative; expected class indices >= 0")
            return cls([str(i) for i in range(max(raw) + 1)], "training data")
        return cls(sorted(set(raw)), "training data")

    @classmethod
    def from_config(cls, id2label: dict) -> LabelSet:
        """Names of a trained head from its ``config.id2label`` (keys may be strings after a JSON round trip)."""
        table = {int(k): str(v) for k, v in id2label.items()}
        if sorted(table) != list(range(len(table))):
            raise DataError(f"the model's id2label {id2label!r} does not number its classes 0..{len(table) - 1}")
        return cls([table[i] for i in range(len(table))], "model head (config.id2label)")

    def id2label(self, head_size: int) -> dict[int, str]:
        return {i: self.names[i] if i < len(self.names) else f"LABEL_{i}" for i in range(head_size)}

    def index(self, value, path, line_no: int, head_size: int) -> int:
        key = str(value)
        if key in self.names:
            idx = self.names.index(key)
        elif _is_int(value) and all(_DEFAULT_NAME.match(n) for n in self.names) and 0 <= value < len(self.names):
            idx = value  # a head with transformers' default names LABEL_0.. and integer labels
        else:
            raise DataError(
                f"{path}:{line_no}: label {value!r} is not one of the known labels {self.names} "
                f"(from the {self.source})"
            )
        if idx >= head_size:
            raise DataError(
                f"{path}:{line_no}: label {value!r} is class {idx}, outside the model head's range 0..{head_size - 1}"
            )
        return idx


def check_token_ids(ids: Sequence[int], vocab_size: int | None, path, line_no: int) -> None:
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        raise DataError(
            f"{path}:{line_no}: token id {max(ids)} is outside the model's embedding table ({vocab_size} rows): "
            "the tokenizer does not belong to this model"
        )


def _check_length(n: int, max_length: int, path, line_no: int, what: str) -> None:
    if n > max_length:
        raise DataError(
            f"{path}:{line_no}: {what} is {n} tokens, longer than the model allows ({max_length}); "
            "shorten it or pass a larger --max-length if the model supports it"
        )


def load_classification(
    path, tokenizer, max_length: int, labels: LabelSet, head_size: int, records=None, vocab_size: int | None = None
) -> list[dict]:
    """Tokenized classification examples; every label must fall inside the head (``head_size``)."""
    records = read_records(path) if records is None else records
    examples = []
    for line_no, record in records:
        text = _field(record, "text", path, line_no)
        label = _field(record, "label", path, line_no, kinds=(str, int))
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        _check_length(len(ids), max_length, path, line_no, "the text")
        check_token_ids(ids, vocab_size, path, line_no)
        examples.append({"input_ids": list(ids), "labels": labels.index(label, path, line_no, head_size)})
    return examples


def _boundary_ids(tokenizer) -> tuple[list[int], int]:
    """Tokens between prompt and response, and the end-of-response id."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise DataError("the tokenizer has neither an eos nor a sep token; generation needs an end-of-response token")
    return [end], end


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids the model is given to generate a response (prompt, then the boundary token)."""
    boundary, _ = _boundary_ids(tokenizer)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    return bos + list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + boundary


def load_generation(path, tokenizer, max_length: int, records=None, vocab_size: int | None = None) -> list[dict]:
    """Tokenized prompt -> response examples; the loss covers the response and its end token only."""
    records = read_records(path) if records is None else records
    _, end = _boundary_ids(tokenizer)
    examples = []
    for line_no, record in records:
        prompt = _field(record, "prompt", path, line_no)
        response = _field(record, "response", path, line_no)
        prompt_ids = encode_prompt(tokenizer, prompt)
        response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [end]
        _check_length(len(prompt_ids) + len(response_ids), max_length, path, line_no, "prompt + response")
        check_token_ids(prompt_ids + response_ids, vocab_size, path, line_no)
        examples.append(
            {
                "input_ids": prompt_ids + response_ids,
                "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
                "prompt_ids": prompt_ids,
                "reference": response,
            }
        )
    return examples


def collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``/``attention_mask`` (B, T); ``labels`` (B,) or (B, T)."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    sequence_labels = isinstance(examples[0]["labels"], list)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long) if sequence_labels else None
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        attention_mask[i, :n] = 1
        if sequence_labels:
            labels[i, :n] = torch.tensor(e["labels"])
    if not sequence_labels:
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Number of loss terms in a batch: examples (classification) or next-token targets (generation)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.numel()
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "DataError",
    "LabelSet",
    "check_classification_records",
    "check_label_kinds",
    "check_token_ids",
    "collate",
    "detect_task",
    "encode_prompt",
    "load_classification",
    "load_generation",
    "read_records",
    "shipped",
    "target_count",
]
