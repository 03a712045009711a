"""The PEFT-option flags (--use-dora, --init, --loftq-iters, --bias, --exclude-modules): a run records them
in run.json and ``eval --run`` / ``merge --run`` rebuild the same model (tiny DoRA and PiSSA runs end to end)."""

import json
import shutil

import pytest
import torch
import transformers
from cli_runs import TOPICS, cls_args
from safetensors.torch import load_file

from lowrank.adapters import load_adapter
from lowrank.cli import main, parser, rebuild
from lowrank.models import BIAS_CHOICES
from lowrank.nn import LinearNF4
from lowrank.nn.lora import DECOMPOSING_INITS, INITS


@pytest.mark.parametrize(
    ("flags", "check"),
    [
        (
            ["--use-dora"],
            lambda m, cfg: cfg.use_dora and any("lora_magnitude_vector" in n for n, _ in m.named_parameters()),
        ),
        (["--init", "pissa", "--bias", "lora_only"], lambda m, cfg: cfg.init == "pissa" and cfg.bias == "lora_only"),
    ],
    ids=["dora", "pissa"],
)
def test_peft_option_run_rebuilds_the_same_model(model_dirs, tmp_path, capsys, flags, check):
    out = tmp_path / "run"
    argv = cls_args(model_dirs, out, "--max-steps", "3", *flags, "--exclude-modules", "attention.output.dense")
    assert main(argv) == 0
    record = json.loads((out / "run.json").read_text())
    assert {k: record[k] for k in ("use_dora", "init", "bias", "exclude_modules")} == {
        "use_dora": "--use-dora" in flags,
        "init": flags[flags.index("--init") + 1] if "--init" in flags else "kaiming",
        "bias": flags[flags.index("--bias") + 1] if "--bias" in flags else "none",
        "exclude_modules": "attention.output.dense",
    }
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] == ("--use-dora" in flags)
    assert not any(t.endswith("attention.output.dense") for t in adapter["target_modules"])
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()

    model = rebuild(out).model.eval()
    assert check(model, model.lowrank_config)
    # the run's adapter/ directory loaded into a fresh copy of the base: the same 4-bit base, the same logits
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"], num_labels=len(TOPICS))
    fresh = load_adapter(fresh, out / "adapter").eval()
    assert any(isinstance(m, LinearNF4) for m in fresh.modules())
    ids = torch.randint(1, 30, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    assert main(["eval", "--run", str(out)]) == 0  # the rebuilt model gives the run's final evaluation
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["accuracy"] == metrics["after"]["accuracy"]
    assert shown["loss"] == pytest.approx(metrics["after"]["loss"], rel=1e-6)
    merged = tmp_path / "merged"
    assert main(["merge", "--run", str(out), "--output", str(merged)]) == 0
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(merged)
    assert not any("lora" in n for n, _ in plain.named_parameters())


def test_flag_choices_follow_the_library():
    assert set(parser.LORA_INITS) == set(INITS) | set(DECOMPOSING_INITS)
    assert parser.LORA_BIAS == BIAS_CHOICES


def test_lora_option_errors_are_user_errors():
    import lowrank

    assert parser.is_user_error(lowrank.LoRAOptionError("r must be a positive int, got 0"))
    assert parser.one_line(lowrank.LoRAOptionError("r must be\n a positive int")) == (
        "lowrank: error: r must be a positive int"
    )


def test_resumed_dora_run_equals_the_uninterrupted_one(model_dirs, tmp_path, capsys):
    steps = ["--max-steps", "3", "--save-every", "1", "--keep-last", "3", "--use-dora", "--bias", "lora_only"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(cls_args(model_dirs, reference, *steps)) == 0
    assert main(cls_args(model_dirs, run, *steps)) == 0
    shutil.rmtree(run / "checkpoints" / "step-000003")  # as if killed before the last checkpoint
    capsys.readouterr()
    assert main(cls_args(model_dirs, run, *steps, "--resume")) == 0
    assert "resumed from step 2 of 3" in capsys.readouterr().out
    want, got = load_file(str(reference / "trainable.safetensors")), load_file(str(run / "trainable.safetensors"))
    assert any("lora_magnitude_vector" in k for k in got) and sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
