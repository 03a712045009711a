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


@dataclass
class LabelSet:
    """Class names in head order; ``names[i]`` is class ``i``."""

    names: list[str]

    @classmethod
    def from_files(cls, *record_lists: Sequence[tuple[int, dict]]) -> LabelSet:
        """Integer labels 0..max keep their values; string labels are sorted for a stable order."""
        raw = [r.get("label") for records in record_lists for _, r in records]
        if raw and all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            return cls([str(i) for i in range(max(raw) + 1)])
        return cls(sorted({str(v) for v in raw}))

    def index(self, value, path, line_no: int, head_size: int) -> int:
        key = str(value)
        if key not in self.names:
            raise DataError(f"{path}:{line_no}: label {value!r} is not one of the known labels {self.names}")
        idx = self.names.index(key)
        if idx >= head_size:
            raise DataError(
                f"{path}:{line_no}: label {value!r} is class {idx}, outside the model head's range 0..{head_size - 1}"
            )
        return idx


def _check_length(n: int, max_length: int, path, line_no: int, what: str) -> None:
    if n > max_length:
        raise DataError(
            f"{path}:{line_no}: {what} is {n} tokens, longer than the model allows ({max_length}); "
            "shorten it or pass a larger --max-length if the model supports it"
        )


def load_classification(path, tokenizer, max_length: int, labels: LabelSet, head_size: int, records=None) -> list[dict]:
    """Tokenized classification examples; every label must fall inside the head (``head_size``)."""
    records = read_records(path) if records is None else records
    examples = []
    for line_no, record in records:
        text = _field(record, "text", path, line_no)
        label = _field(record, "label", path, line_no, kinds=(str, int))
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        _check_length(len(ids), max_length, path, line_no, "the text")
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


def load_generation(path, tokenizer, max_length: int, records=None) -> list[dict]:
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
    "collate",
    "detect_task",
    "encode_prompt",
    "load_classification",
    "load_generation",
    "read_records",
    "shipped",
    "target_count",
]
