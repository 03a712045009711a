"""The ``lowrank`` command on tiny local models: each path, SIGKILL + --resume, every bad input, the main job."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from lowrank import data as D
from lowrank.cli import main, rebuild

REPO = Path(__file__).resolve().parents[2]
SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = word_tokenizer()
    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
        )
    )
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
    for name, model in (("bert", bert), ("llama", llama)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {"bert": str(root / "bert"), "llama": str(root / "llama")}


def cls_args(model_dirs, out, *extra):
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


def gen_args(model_dirs, out, *extra):
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


def test_finetune_classification_then_eval_and_merge(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cls_args(model_dirs, out, "--max-steps", "4", "--save-every", "2", "--eval-every", "2")) == 0
    printed = capsys.readouterr().out
    assert "before: loss" in printed and "after : loss" in printed and "accuracy" in printed
    for name in (
        "run.json",
        "metrics.json",
        "log.jsonl",
        "log.csv",
        "evals.jsonl",
        "report.md",
        "loss.png",
        "delta_w.png",
        "step_time.png",
        "trainable.safetensors",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "checkpoints/step-000004/state.json",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and set(metrics["after"]) >= {"loss", "accuracy", "f1", "perplexity"}
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
    assert any(k.endswith("lora_A") for k in load_file(str(out / "trainable.safetensors")))

    assert main(["eval", "--run", str(out)]) == 0  # the rebuilt model gives the recorded after-metrics
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["accuracy"] == metrics["after"]["accuracy"]
    assert shown["loss"] == pytest.approx(metrics["after"]["loss"], rel=1e-6)

    merged = tmp_path / "merged"
    assert main(["merge", "--run", str(out), "--output", str(merged)]) == 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    trained = rebuild(out).model.eval()
    batch = D.collate(trained_examples(model_dirs), 0)
    with torch.no_grad():
        expected = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    assert main(["eval", "--model", model_dirs["bert"], "--data", str(D.shipped("topics_eval.jsonl"))]) == 0
    assert '"accuracy"' in capsys.readouterr().out


def trained_examples(model_dirs):
    tok = transformers.AutoTokenizer.from_pretrained(model_dirs["bert"])
    labels = D.LabelSet(["account", "billing", "shipping", "technical"])
    return D.load_classification(D.shipped("topics_eval.jsonl"), tok, 64, labels, 4)[:8]


def test_finetune_generation_learns_and_reports_rouge(model_dirs, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(gen_args(model_dirs, out, "--max-steps", "80", "--warmup-steps", "3")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "frequent_token_share", "loss"):
        assert key in metrics["after"]
    assert metrics["after"]["loss"] < metrics["before"]["loss"] - 1.0
    assert metrics["after"]["rouge1"] > metrics["before"]["rouge1"]


def test_compare_two_configurations(model_dirs, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = cls_args(model_dirs, out, "--max-steps", "3")
    args[0] = "compare"
    assert main(args + ["--a", "method=full", "--b", "method=lora,r=4", "--name-a", "full", "--name-b", "lora"]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert set(summary) >= {"time_a_s", "time_b_s", "time_saving_r", "metrics_a", "metrics_b"}
    assert summary["time_saving_r"] == pytest.approx((summary["time_a_s"] - summary["time_b_s"]) / summary["time_a_s"])
    for name in (
        "compare.md",
        "compare_loss.png",
        "compare_scatter.png",
        "compare_delta_w.png",
        "full/log.jsonl",
        "lora/adapter/adapter_config.json",
    ):
        assert (out / name).is_file(), name
    first_a = json.loads((out / "full" / "log.jsonl").read_text().splitlines()[0])
    first_b = json.loads((out / "lora" / "log.jsonl").read_text().splitlines()[0])
    assert first_a["loss"] == first_b["loss"]  # same initial function (B = 0) and the same first batch
    assert "time saving r" in (out / "compare.md").read_text()


def test_quantize_prints_sizes_and_error(model_dirs, capsys):
    assert main(["quantize", "--model", model_dirs["bert"]]) == 0
    text = capsys.readouterr().out
    assert "bits per parameter" in text and "relative Frobenius error" in text and "MiB ->" in text


def test_kill_and_resume_reproduces_the_uninterrupted_losses(model_dirs, tmp_path):
    steps = [
        "--max-steps",
        "120",
        "--save-every",
        "2",
        "--keep-last",
        "2",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--warmup-steps",
        "5",
        "--max-new-tokens",
        "2",
    ]
    reference = tmp_path / "reference"
    assert main(gen_args(model_dirs, reference, *steps)) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowrank", *gen_args(model_dirs, killed, *steps)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(tmp_path),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # as this process (see one_thread)
    try:
        deadline = time.monotonic() + 120
        while not list((killed / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "metrics.json").exists()
    assert main(gen_args(model_dirs, killed, *steps, "--resume")) == 0
    ref_losses = [json.loads(line)["loss"] for line in (reference / "log.jsonl").read_text().splitlines()]
    got_losses = [json.loads(line)["loss"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert got_losses == ref_losses  # bit for bit


def _bad(model_dirs, tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    gen_file = str(D.shipped("records_train.jsonl"))
    return {
        "missing file": (["--train", str(tmp_path / "nope.jsonl")], "nope.jsonl' does not exist"),
        "malformed line": (["--train", str(bad_json)], "bad.jsonl:2: not valid JSON"),
        "empty split": (["--eval", str(empty)], "holds no records (empty split)"),
        "label outside head": (["--num-labels", "2"], "outside the model head's range 0..1"),
        "too long": (["--max-length", "8"], "longer than the model allows (8)"),
        "longer than model": (["--max-length", "4096"], "larger than the model allows (64)"),
        "lr out of range": (["--lr", "2"], "lr=2.0 is out of range"),
        "batch size": (["--batch-size", "0"], "batch_size=0 is out of range"),
        "wrong task data": (["--train", gen_file], "holds generation records but --task is classification"),
        "unknown target": (["--target-modules", "nonexistent_proj"], "nonexistent_proj"),
        "bad model dir": (["--model", str(tmp_path)], "expected 'default'"),
    }


@pytest.mark.parametrize("case", list(_bad(None, Path("/tmp")).keys()))
def test_bad_input_exits_cleanly_without_writing(model_dirs, tmp_path, capsys, case):
    extra, message = _bad(model_dirs, tmp_path)[case]
    out = tmp_path / "out"
    assert main(cls_args(model_dirs, out, "--max-steps", "1", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowrank: error:") and message in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_resume_from_another_model_is_refused_and_leaves_the_run_intact(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cls_args(model_dirs, out, "--max-steps", "2", "--save-every", "1")) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(cls_args(model_dirs, out, "--max-steps", "2", "--save-every", "1", "--r", "4", "--resume")) == 2
    assert "written by a run with other settings: r=8 (now 4)" in capsys.readouterr().err
    assert main(cls_args(model_dirs, out, "--max-steps", "2")) == 2  # no --resume: refuses a non-empty directory
    assert "exists and is not empty" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def main_job_commands() -> list[list[str]]:
    """The ``lowrank ...`` command lines of scripts/main.sh."""
    commands = []
    for line in (REPO / "scripts" / "main.sh").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0].endswith("/lowrank"):
            commands.append(words[1:])
    return commands


def test_main_job_code_path_in_a_reduced_configuration(tmp_path, capsys, monkeypatch):
    """Every command of scripts/main.sh on the embedded default model: 1 optimizer step, small eval splits."""
    monkeypatch.chdir(tmp_path)
    small = {}
    for task, name in (("classification", "topics_eval.jsonl"), ("generation", "records_eval.jsonl")):
        small[task] = tmp_path / name
        small[task].write_text("".join(D.shipped(name).read_text().splitlines(keepends=True)[:12]))
    commands = main_job_commands()
    assert [c[0] for c in commands] == ["quantize", "finetune", "finetune", "compare"]
    for command in commands:
        reduced = list(command)
        if command[0] != "quantize":
            task = command[command.index("--task") + 1]
            reduced += ["--max-steps", "1", "--max-new-tokens", "4", "--eval", str(small[task]), "--no-progress"]
        assert main(reduced) == 0, command
    printed = capsys.readouterr().out
    assert printed.count("before:") == 4 and printed.count("after :") == 4
    assert (tmp_path / "runs/main/compare/compare.md").is_file()
    assert (tmp_path / "runs/main/classification/adapter/adapter_model.safetensors").is_file()
    assert "rouge1" in (tmp_path / "runs/main/generation/metrics.json").read_text()


def test_resume_before_the_first_checkpoint_starts_from_step_zero(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cls_args(model_dirs, out, "--max-steps", "2")) == 0  # no --save-every: no checkpoint
    first = (out / "log.jsonl").read_text()
    assert main(cls_args(model_dirs, out, "--max-steps", "2", "--resume")) == 0
    assert "starting from step 0" in capsys.readouterr().out
    assert [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()] == [
        json.loads(x)["loss"] for x in first.splitlines()
    ]
