"""The ``lowrank`` command on tiny local models: each path, SIGKILL + --resume, every bad input, the main job."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from cli_runs import TOPICS, cls_args, gen_args, tree
from safetensors.torch import load_file

from lowrank import data as D
from lowrank.cli import main, rebuild
from lowrank.models import summary

REPO = Path(__file__).resolve().parents[3]


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
    counts = summary(trained)  # the printed count includes the 4-bit weights (their original element count)
    assert f"trainable parameters {counts.trainable_params:,} of {counts.total_params:,}" in printed
    assert counts.total_params > sum(p.numel() for p in trained.parameters())
    batch = D.collate(trained_examples(model_dirs), 0)
    with torch.no_grad():
        expected = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    assert model.config.id2label == dict(enumerate(TOPICS))  # the merged head keeps its class names
    capsys.readouterr()
    assert main(["eval", "--model", str(merged), "--data", str(D.shipped("topics_eval.jsonl"))]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["accuracy"] == metrics["after"]["accuracy"]  # labels mapped through the saved id2label

    # a base model without a trained head would be scored with a random head: refused
    assert main(["eval", "--model", model_dirs["bert"], "--data", str(D.shipped("topics_eval.jsonl"))]) == 2
    assert "has no trained classification head" in capsys.readouterr().err


def trained_examples(model_dirs):
    tok = transformers.AutoTokenizer.from_pretrained(model_dirs["bert"])
    labels = D.LabelSet(TOPICS)
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
    saving = summary["time_saving"]
    assert summary["time_saving_r"] == saving["r"] and saving["r_low"] <= saving["r_high"]
    assert saving["r"] == pytest.approx(1 - saving["median_step_b_s"] / saving["median_step_a_s"])
    printed = capsys.readouterr().out
    assert "time saving r = 1 - median step time B / A" in printed and "90% interval" in printed
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


def test_env_prints_versions_and_backends(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("lowrank ") and "backends on cpu" in text


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_quantize_prints_sizes_and_error(model_dirs, capsys, name):
    assert main(["quantize", "--model", model_dirs[name]]) == 0  # gpt2: Conv1D layers
    text = capsys.readouterr().out
    assert "bits per parameter" in text and "relative Frobenius error" in text and "MiB ->" in text
    assert "quantized 0 " not in text


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


def test_resume_from_another_model_is_refused_and_leaves_the_run_intact(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cls_args(model_dirs, out, "--max-steps", "2", "--save-every", "1")) == 0
    before = tree(out)
    assert main(cls_args(model_dirs, out, "--max-steps", "2", "--save-every", "1", "--r", "4", "--resume")) == 2
    assert "written by a run with other settings: r=8 (now 4)" in capsys.readouterr().err
    assert main(cls_args(model_dirs, out, "--max-steps", "2")) == 2  # no --resume: refuses a non-empty directory
    assert "exists and is not empty" in capsys.readouterr().err
    assert tree(out) == before


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
            reduced += ["--max-steps", "1", "--warmup-steps", "0", "--max-new-tokens", "4", "--eval", str(small[task])]
            reduced += ["--no-progress"]
        assert main(reduced) == 0, command
    printed = capsys.readouterr().out
    assert printed.count("before:") == 4 and printed.count("after :") == 4
    assert (tmp_path / "runs/main/compare/compare.md").is_file()
    assert (tmp_path / "runs/main/classification/adapter/adapter_model.safetensors").is_file()
    assert "rouge1" in (tmp_path / "runs/main/generation/metrics.json").read_text()


def test_resume_before_the_first_checkpoint_starts_from_step_zero(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cls_args(model_dirs, out, "--max-steps", "2")) == 0
    first = (out / "log.jsonl").read_text()
    shutil.rmtree(out / "checkpoints")  # as if killed before the first checkpoint
    assert main(cls_args(model_dirs, out, "--max-steps", "2", "--resume")) == 0
    assert "starting from step 0" in capsys.readouterr().out
    assert [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()] == [
        json.loads(x)["loss"] for x in first.splitlines()
    ]
