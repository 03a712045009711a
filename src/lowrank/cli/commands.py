"""The commands: ``finetune``, ``eval``, ``compare``, ``merge``, ``quantize``, ``env``.

Each takes the parsed flags and returns an exit status. Bad input (data, flags, checkpoints) raises a
user error (see :func:`lowrank.cli.parser.user_errors`) before anything is written to the output
directory; every file is written atomically through :mod:`lowrank.files`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

from lowrank import files
from lowrank.cli.loading import Run, embedded_minilm, rebuild, resolve_method, run_record, train_config
from lowrank.cli.parser import CliError, finetune_parser


def _check_output(out: Path, resume: bool, args) -> None:
    if resume:
        if not (out / "run.json").is_file():
            raise CliError(f"--resume: {out} holds no run (run.json missing)")
        saved = files.read_json(out / "run.json", what="run record")
        now = run_record(args)
        diff = sorted(k for k in set(saved) | set(now) if k != "label_names" and saved.get(k) != now.get(k))
        if diff:
            raise CliError(
                f"--resume: {out} was written by a run with other settings: "
                + ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in diff[:6])
            )
    elif out.exists() and any(out.iterdir()):
        raise CliError(f"output directory {out} exists and is not empty; choose another one or pass --resume")


def _print_metrics(title: str, metrics: dict) -> None:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "perplexity")
    print(f"{title}: {shown}", flush=True)


def run_finetune(args, out: Path | None = None) -> dict:
    from lowrank import report
    from lowrank.train import list_checkpoints, train

    out = Path(out or args.output)
    args.output = str(out)
    main_rank = _join_distributed(args)  # --distributed: every rank checks, rank 0 alone writes
    _check_output(out, args.resume, args)
    run = Run(args)  # everything is validated before the first write
    if args.resume and not list_checkpoints(out / "checkpoints"):
        print(f"{out}: no checkpoint was written before the interruption; starting from step 0", flush=True)
        run.config.resume = False
    args.label_names = run.labels
    _barrier(args)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        files.write_json(out / "run.json", run_record(args))
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
    if not main_rank:
        return {"result": result, "before": before, "after": after, "run": run}
    _print_metrics("after ", after)
    trainable = {n: p.detach().cpu().contiguous() for n, p in run.model.named_parameters() if p.requires_grad}
    files.write_safetensors(out / "trainable.safetensors", trainable)
    if resolve_method(args) in ("qlora", "lora"):
        _save_adapter(run.model, out / "adapter")
    metrics = {
        "before": before,
        "after": after,
        "steps": result.steps,
        "train_time_s": result.total_time_s,
        "stopped_early": result.stopped_early,
    }
    files.write_json(out / "metrics.json", metrics)
    report.write_logs(out, result.history, result.evals)
    report.plot_run(out, result.history, result.evals, title=f"({args.task})")
    strip = {
        name: {m: v for m, v in d.items() if not m.startswith("_")}
        for name, d in (("before", before), ("after", after))
    }
    report.write_run_report(
        out, f"lowrank finetune: {args.task}", run_record(args), strip, result.history, result.total_time_s
    )
    print(f"{result.steps} steps in {result.total_time_s:.1f} s; report: {out / 'report.md'}", flush=True)
    return {"result": result, "before": before, "after": after, "run": run}


def _join_distributed(args) -> bool:
    """Join the torchrun process group for ``--distributed`` (a clear error without torchrun); True on rank 0."""
    if getattr(args, "distributed", "none") == "none":
        return True
    from lowrank import distributed
    from lowrank.train import resolve_device

    return distributed.setup(args.distributed, resolve_device(args.device), args.batch_size).is_main


def _barrier(args) -> None:
    if getattr(args, "distributed", "none") != "none":
        import torch.distributed

        torch.distributed.barrier()


def _save_adapter(model, path: Path) -> None:
    from lowrank.adapters import save_adapter

    if path.exists():
        shutil.rmtree(path)
    save_adapter(model, path)


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
        tuple(run_record(s) for _, s in sides),
    )
    print(f"time saving r = (T_A - T_B)/T_A = {summary['time_saving_r']:+.3f}; report: {out / 'compare.md'}")
    return 0


def _apply_overrides(args, overrides: str) -> argparse.Namespace:
    argv = []
    for item in filter(None, (s.strip() for s in (overrides or "").split(","))):
        if "=" not in item:
            raise CliError(f"override {item!r}: expected key=value (e.g. method=full,lr=1e-3)")
        key, value = item.split("=", 1)
        argv += [f"--{key.replace('_', '-')}", value] if value != "" else [f"--{key.replace('_', '-')}"]
    base = {k: v for k, v in vars(args).items() if k not in ("a", "b", "name_a", "name_b", "func", "command")}
    ns = argparse.Namespace(**base)
    try:
        finetune_parser().parse_args(argv, namespace=ns)
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
    with files.atomic_directory(out) as tmp:
        merged.save_pretrained(str(tmp))
        run.tokenizer.save_pretrained(str(tmp))
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
    from lowrank import env

    return env.main([])


COMMANDS = {
    "finetune": cmd_finetune,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "merge": cmd_merge,
    "quantize": cmd_quantize,
    "env": cmd_env,
}
