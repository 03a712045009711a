"""Every bad input ends in ONE stderr line ``lowrank: error: ...`` naming the value, exit status 2, and
leaves the output directory as it was (in-process ``main([...])``: no subprocess start-up per case)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from cli_runs import bert_config, cls_args, gen_args, tree, word_tokenizer

from lowrank import data as D
from lowrank.cli import main


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def jsonl(path: Path, records) -> str:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, model_dirs):
    """Model directories that are broken in one way each."""
    root = tmp_path_factory.mktemp("bad_models")
    tok = word_tokenizer()
    small = transformers.BertModel(bert_config(10))  # embedding table smaller than the tokenizer's vocabulary
    small.save_pretrained(root / "small_vocab")
    tok.save_pretrained(root / "small_vocab")
    truncated = root / "truncated"
    truncated.mkdir()
    for f in Path(model_dirs["bert"]).iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    return {"small_vocab": str(root / "small_vocab"), "truncated": str(truncated)}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, model_dirs):
    """A finished qlora run (2 steps) whose trainable.safetensors is then truncated in a copy."""
    root = tmp_path_factory.mktemp("finished")
    torch.set_num_threads(1)
    assert main(cls_args(model_dirs, root / "run", "--max-steps", "2")) == 0
    damaged = root / "damaged"
    shutil.copytree(root / "run", damaged)
    blob = (damaged / "trainable.safetensors").read_bytes()
    (damaged / "trainable.safetensors").write_bytes(blob[: len(blob) // 3])
    only = root / "only_checkpoint_damaged"
    shutil.copytree(root / "run", only)
    for ckpt in (only / "checkpoints").glob("step-*"):
        blob = (ckpt / "trainable.safetensors").read_bytes()
        (ckpt / "trainable.safetensors").write_bytes(blob[:100])
    return {"run": root / "run", "damaged": damaged, "only_damaged": only}


def finetune_cases(tmp: Path, models: dict, bad: dict) -> dict:
    """case -> (extra finetune flags, expected text in the error line)."""
    d = tmp / "data"
    d.mkdir(exist_ok=True)
    topics = [{"text": "my card was charged twice", "label": "billing"}, {"text": "reset password", "label": "account"}]
    bad_json = write(d / "bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    return {
        # flags (checked before any model loads)
        "r 0": (["--r", "0"], "--r 0: expected a LoRA rank >= 1"),
        "r -1": (["--r", "-1"], "--r -1: expected a LoRA rank >= 1"),
        "r 100000": (["--r", "100000"], "--r 100000: expected 1 <= r <= 32"),
        "blocksize 0": (["--blocksize", "0"], "--blocksize 0: expected one of (32, 64"),
        "blocksize 63": (["--blocksize", "63"], "--blocksize 63: expected one of"),
        "blocksize 100": (["--blocksize", "100"], "--blocksize 100: expected one of"),
        "dropout 1.5": (["--lora-dropout", "1.5"], "--lora-dropout 1.5: expected a probability in [0, 1)"),
        "dropout -0.1": (["--lora-dropout", "-0.1"], "--lora-dropout -0.1: expected a probability"),
        "alpha nan": (["--alpha", "nan"], "--alpha nan: expected a finite number > 0"),
        "alpha 0": (["--alpha", "0"], "--alpha 0.0: expected a finite number > 0"),
        "alpha -1": (["--alpha", "-1"], "--alpha -1.0: expected a finite number > 0"),
        "seed -1": (["--seed", "-1"], "seed=-1 is out of range"),
        "device tpu": (["--device", "tpu"], "device='tpu' is out of range: expected auto, cpu, cuda or cuda:N"),
        "max-length 0": (["--max-length", "0"], "--max-length 0: expected an integer >= 1"),
        "max-length -5": (["--max-length", "-5"], "--max-length -5: expected an integer >= 1"),
        "warmup beyond run": (["--warmup-steps", "5"], "--warmup-steps 5: expected at most the run's 1 steps"),
        "epochs 1e9": (["--epochs", "1e9", "--max-steps", None], "optimizer steps over 280 examples; expected at most"),
        "lr out of range": (["--lr", "2"], "lr=2.0 is out of range"),
        "batch size": (["--batch-size", "0"], "batch_size=0 is out of range"),
        "not an int": (["--r", "x"], "argument --r: invalid int value: 'x'"),
        "unknown flag": (["--rank", "4"], "unrecognized arguments: --rank 4"),
        # output directory
        "output is a file": (["--output", write(d / "a_file", "x")], "is a file; expected a directory"),
        "output under a file": (["--output", str(d / "a_file" / "run")], "is under the file"),
        # models
        "bad model dir": (["--model", str(d)], "expected 'default'"),
        "truncated model.safetensors": (["--model", bad["truncated"]], "cannot load model"),
        "token ids beyond the embedding": (["--model", bad["small_vocab"]], "outside the model's embedding table"),
        "unknown target": (["--target-modules", "nonexistent_proj"], "nonexistent_proj"),
        # PEFT-option flags
        "init unknown": (["--init", "svd"], "argument --init: invalid choice: 'svd'"),
        "bias unknown": (["--bias", "some"], "argument --bias: invalid choice: 'some'"),
        "loftq-iters 0": (["--init", "loftq", "--loftq-iters", "0"], "--loftq-iters 0: expected an integer >= 1"),
        "loftq on a dense base": (
            ["--method", "lora", "--init", "loftq"],
            "--init loftq fits the quantization error: expected --method qlora, got --method lora",
        ),
        "dora with pissa": (
            ["--use-dora", True, "--init", "pissa"],
            "--use-dora with --init pissa: expected --init kaiming",
        ),
        "dora without adapters": (
            ["--method", "full", "--use-dora", True],
            "--use-dora shapes LoRA adapters: expected --method qlora or lora, got --method full",
        ),
        "exclude-modules empty": (["--exclude-modules", ","], "--exclude-modules ',': expected a module name"),
        "exclude every target": (["--exclude-modules", ".*"], "exclude_modules"),
        # data
        "missing file": (["--train", str(d / "nope.jsonl")], "nope.jsonl' does not exist"),
        "malformed line": (["--train", bad_json], "bad.jsonl:2: not valid JSON"),
        "empty split": (["--eval", write(d / "empty.jsonl", "\n")], "holds no records (empty split)"),
        "label outside head": (["--num-labels", "2"], "outside the model head's range 0..1"),
        "too long": (["--max-length", "8"], "longer than the model allows (8)"),
        "longer than model": (["--max-length", "4096"], "larger than the model allows (64)"),
        "wrong task data": (["--train", str(D.shipped("records_train.jsonl"))], "holds generation records"),
        "eval-only label": (
            [
                "--train",
                jsonl(d / "t.jsonl", topics),
                "--eval",
                jsonl(d / "e.jsonl", [*topics, {"text": "x", "label": "spam"}]),
            ],
            "e.jsonl:3: label 'spam' is not one of the known labels ['account', 'billing'] (from the training data)",
        ),
        "mixed label kinds": (
            [
                "--train",
                jsonl(d / "ti.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}]),
                "--eval",
                jsonl(d / "es.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "1"}]),
            ],
            "es.jsonl:2: label '1' is a string but the labels of",
        ),
        "one-class training data": (
            ["--train", jsonl(d / "one.jsonl", [{"text": "a", "label": "billing"}, {"text": "b", "label": "billing"}])],
            "every training record has the label 'billing'; a classifier needs at least two classes",
        ),
        "float label": (
            ["--train", jsonl(d / "f.jsonl", [*topics, {"text": "x", "label": 1.5}])],
            "f.jsonl:3: field 'label' must be str or int, got 1.5",
        ),
        "missing label": (
            ["--train", jsonl(d / "m.jsonl", [*topics, {"text": "x"}])],
            "m.jsonl:3: missing field 'label'",
        ),
    }


def _argv(base: list[str], extra: list) -> list[str]:
    argv = list(base)
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in argv:  # replace a base flag's value (or drop the flag: value None)
            i = argv.index(flag)
            del argv[i : i + 2]
        if value is True:  # a switch without a value
            argv.append(flag)
        elif value is not None:
            argv += [flag, value]
    return argv


def assert_one_line_error(capsys, expected: str) -> None:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lowrank: error: ") and expected in lines[0], err


with tempfile.TemporaryDirectory() as _names_only:
    CASES = list(finetune_cases(Path(_names_only), {}, {"truncated": "", "small_vocab": ""}))


@pytest.mark.parametrize("case", CASES)
def test_finetune_bad_input(case, model_dirs, bad_models, tmp_path, capsys):
    extra, expected = finetune_cases(tmp_path, model_dirs, bad_models)[case]
    out = tmp_path / "out"
    assert main(_argv(cls_args(model_dirs, out, "--max-steps", "1"), extra)) == 2
    assert_one_line_error(capsys, expected)
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output(model_dirs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(cls_args(model_dirs, locked / "run", "--max-steps", "1")) == 2
        assert_one_line_error(capsys, "cannot write in")
        assert not (locked / "run").exists()
    finally:
        locked.chmod(0o700)


def test_other_commands_bad_input(model_dirs, finished_run, tmp_path, capsys):
    run, damaged, only = finished_run["run"], finished_run["damaged"], finished_run["only_damaged"]
    topics = str(D.shipped("topics_eval.jsonl"))
    cases = {
        "eval untrained head": (
            ["eval", "--model", model_dirs["bert"], "--data", topics],
            "no trained classification head",
        ),
        "eval truncated trainable": (["eval", "--run", str(damaged)], "trainable.safetensors cannot be read"),
        "eval without run or data": (["eval"], "eval needs --run DIR"),
        "merge truncated trainable": (
            ["merge", "--run", str(damaged), "--output", str(tmp_path / "m")],
            "trainable.safetensors cannot be read",
        ),
        "merge into existing": (["merge", "--run", str(run), "--output", str(run)], "exists; expected a new directory"),
        "quantize blocksize": (["quantize", "--model", model_dirs["bert"], "--blocksize", "63"], "--blocksize 63"),
        "quantize a 4-bit checkpoint": (["quantize", "--model", str(tmp_path / "q4")], "already a 4-bit checkpoint"),
        "resume over damaged checkpoints only": (
            [*cls_args(model_dirs, only, "--max-steps", "2"), "--resume"],
            "no intact checkpoint in",
        ),
        "resume with other settings": (
            [*cls_args(model_dirs, run, "--max-steps", "2", "--r", "4"), "--resume"],
            "written by a run with other settings: r=8 (now 4)",
        ),
        "compare bad override": (
            [*cls_args(model_dirs, tmp_path / "cmp", "--max-steps", "1"), "--a", "r=0"],
            "--r 0: expected a LoRA rank >= 1",
        ),
        "compare unknown override": (
            [*cls_args(model_dirs, tmp_path / "cmp", "--max-steps", "1"), "--a", "rank=4"],
            "override 'rank=4': unrecognized arguments: --rank 4",
        ),
    }
    cases["compare bad override"][0][0] = cases["compare unknown override"][0][0] = "compare"
    _quantized_checkpoint(model_dirs, tmp_path / "q4")
    for name, (argv, expected) in cases.items():
        before = {p: tree(p) for p in (run, damaged, only)}
        assert main(argv) == 2, name
        assert_one_line_error(capsys, expected)
        assert {p: tree(p) for p in (run, damaged, only)} == before, name
        assert not (tmp_path / "m").exists() and not (tmp_path / "cmp").exists(), name


def _quantized_checkpoint(model_dirs, path: Path) -> None:
    import lowrank

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    lowrank.prepare_model(model, r=4, quantize="nf4")
    lowrank.save_quantized(model, path)
    word_tokenizer().save_pretrained(path)


def test_a_4bit_checkpoint_loads_as_model(model_dirs, tmp_path, capsys):
    """--model DIR with a bitsandbytes-format 4-bit checkpoint: trained with qlora, refused with lora."""
    _quantized_checkpoint(model_dirs, tmp_path / "q4")
    args = gen_args({"llama": str(tmp_path / "q4")}, tmp_path / "run", "--max-steps", "2", "--max-new-tokens", "2")
    args[args.index("--method") + 1] = "qlora"
    assert main(args) == 0
    assert "trainable parameters" in capsys.readouterr().out
    args[args.index("--method") + 1] = "lora"
    args[args.index("--output") + 1] = str(tmp_path / "run2")
    assert main(args) == 2
    assert_one_line_error(capsys, "is a 4-bit checkpoint: train it with --method qlora or --method head")
