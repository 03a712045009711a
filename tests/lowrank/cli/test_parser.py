"""The parser answers before torch loads, and every TrainConfig flag reaches TrainConfig."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

from lowrank.cli.parser import build_parser, train_config
from lowrank.config import TrainConfig

# Runs the CLI with the package's own __init__ skipped (its imports are the package face's business):
# what is measured is what lowrank.cli itself imports before it answers.
PROBE = """
import importlib.util, sys, types
spec = importlib.util.find_spec("lowrank")
package = types.ModuleType("lowrank")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["lowrank"] = package
from lowrank.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers", "matplotlib", "numpy") if m in sys.modules)
print(rc, ",".join(heavy) or "none")
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["finetune", "--help"],
        ["finetune", "--r", "0"],
        ["finetune", "--blocksize", "63"],
        ["finetune", "--output", "/dev/null"],
        ["finetune", "--lr", "2"],
        ["compare", "--a", "alpha=nan"],
        ["quantize", "--blocksize", "100"],
    ],
)
def test_help_and_flag_errors_import_neither_torch_nor_transformers(argv):
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    rc, heavy = done.stdout.strip().splitlines()[-1].split()
    assert heavy == "none", done.stdout
    assert rc == ("0" if "--help" in argv else "2")
    if rc == "2":
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("lowrank: error: "), done.stderr


def test_every_flagged_train_config_field_is_a_finetune_flag_that_reaches_train_config(tmp_path):
    parser = build_parser()
    flagged = [f for f in fields(TrainConfig) if f.metadata.get("cli")]
    assert len(flagged) > 20
    for f in flagged:
        spec = f.metadata["cli"]
        flag = spec.get("flag", "--" + f.name.replace("_", "-"))
        if isinstance(f.default, bool):
            argv, want = [flag], not f.default
        else:
            special = {
                "schedule": "linear",
                "optimizer": "paged_adamw",
                "precision": "fp32",
                "device": "cpu",
                "report_to": "tensorboard",
            }
            special["distributed"] = "ddp"
            value = special.get(f.name, "0.5" if f.name in ("lr", "adam_beta1", "adam_beta2") else "3")
            argv, want = [flag, value], (spec.get("type") or type(f.default))(value)
        base = [] if f.name == "eval_every" else ["--eval-every", "1"]  # early stopping needs evaluations
        args = parser.parse_args(["finetune", "--output", str(tmp_path), *base, *argv])
        assert getattr(train_config(args), f.name) == want, f.name
