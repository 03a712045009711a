"""The commands: ``finetune``, ``eval``, ``compare``, ``merge``, ``quantize``, ``env``.

Each takes the parsed (and already checked, see :func:`lowrank.cli.parser.check_args`) flags and
returns an exit status. Bad input raises a user error before anything is written to the output
directory; every file is written atomically through :mod:`lowrank.files`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from lowrank import files
from lowrank.cli.loading import (
    Run,
    is_quantized_checkpoint,
    model_dir,
    read_model_config,
    rebuild,
    resolve_method,
)
from lowrank.cli.parser import CliError, apply_overrides, check_output, run_record


def _print_metrics(title: str, metrics: dict) -> None:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "perplexity")
    print(f"{title}: {shown}", flush=True)


def _public(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def run_finetune(args, out: Path | None = None) -> dict:
    from dataclasses import asdict

    from lowrank import trackers
    from lowrank.models import summary
    from lowrank.train import list_checkpoints, train

    out = Path(out or args.output)
    args.output = str(out)
    main_rank = _join_distributed(args)  # --distributed: every rank checks, rank 0 alone writes
    check_output(out, args.resume, args)
    run = Run(args)  # everything is validated before the first write
    if args.resume and not list_checkpoints(out / "checkpoints"):
        print(f"{out}: no checkpoint was written before the interruption; starting from step 0", flush=True)
        run.config.resume = False
    args.label_names = run.labels
    _barrier(args)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
    if main_rank and not args.resume:  # a resumed run's run.json was checked equal by check_output
        files.write_json(out / "run.json", run_record(args))
    counts = summary(run.model)  # 4-bit weights count their original number of elements
    method = resolve_method(args)
    print(
        f"[{args.task}] model {args.model} ({method}), {len(run.train_data)} train / "
        f"{len(run.eval_data)} eval examples, trainable parameters {counts.trainable_params:,} of "
        f"{counts.total_params:,} ({100 * counts.trainable_fraction:.2f}%)",
        flush=True,
    )
    try:
        reporter = trackers.open_trackers(run.config.report_to, {**run_record(args), **asdict(run.config)}, str(out))
    except trackers.TrackerError as err:
        raise CliError(str(err)) from None
    before = run.metrics()
    _print_metrics("before", before)
    reporter.log_metrics(before, 0, "before")
    result = train(
        run.model,
        run.train_data,
        run.eval_data,
        run.config,
        param_groups=run.param_groups,
        unfreeze=run.schedule,
        reporter=reporter,
    )
    after = run.metrics()
    if not main_rank:
        return {"result": result, "before": before, "after": after, "run": run}
    _print_metrics("after ", after)
    reporter.log_metrics(after, result.steps, "after")
    try:
        _write_outputs(out, args, run, result, before, after, method)
    except OSError as e:
        last = result.checkpoints[-1] if result.checkpoints else None
        kept = f"the final checkpoint {last} is intact" if last else "no checkpoint was written"
        raise CliError(
            f"cannot write the run's outputs in {out}: {e.strerror or e}; {kept} "
            "(free space or fix permissions, then rerun with --resume to write them)"
        ) from None
    reporter.log_files([out / name for name in ("loss.png", "delta_w.png", "step_time.png", "report.md")])
    reporter.close()
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""
    print(
        f"{result.steps} steps{resumed} in {result.total_time_s:.1f} s of training in all"
        + (f" ({result.session_time_s:.1f} s in this session)" if result.resumed_from is not None else "")
        + f"; report: {out / 'report.md'}",
        flush=True,
    )
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


def _write_outputs(out: Path, args, run, result, before: dict, after: dict, method: str) -> None:
    from lowrank import report

    trainable = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    files.write_safetensors(out / "trainable.safetensors", trainable)
    if method in ("qlora", "lora"):
        from lowrank.adapters import save_adapter

        with files.atomic_directory(out / "adapter") as tmp:
            save_adapter(run.model, tmp)
    metrics = {
        "before": before,
        "after": after,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "train_time_s": result.total_time_s,
        "stopped_early": result.stopped_early,
    }
    files.write_json(out / "metrics.json", metrics)
    report.write_logs(out, result.history, result.evals)
    report.plot_run(out, result.history, result.evals, model=args.model, method=method, before=before)
    report.write_run_report(
        out,
        f"lowrank finetune: {args.task}, {args.model} ({method})",
        run_record(args),
        {"before": _public(before), "after": _public(after)},
        result.history,
        result.total_time_s,
    )


def cmd_finetune(args) -> int:
    run_finetune(args)
    return 0


def cmd_eval(args) -> int:
    if args.run:
        run = rebuild(Path(args.run), eval=args.data)
    else:
        ns = argparse.Namespace(
            **{
                **vars(args),
                "eval": args.data,
                "train": args.data,
                "method": "full",
                "output": None,
            }
        )
        run = Run(ns, evaluate_only=True)
    metrics = run.metrics()
    _print_metrics("eval", metrics)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_compare(args) -> int:
    from lowrank import report

    out = Path(args.output)
    sides = [(name, apply_overrides(args, o)) for name, o in ((args.name_a, args.a), (args.name_b, args.b))]
    for name, side in sides:  # both checked before either trains
        check_output(out / name, False, side)
    runs = [run_finetune(side, out / name) for name, side in sides]
    summary = report.write_comparison(
        out,
        (sides[0][0], sides[1][0]),
        tuple(r["result"].history for r in runs),
        tuple(r["result"].total_time_s for r in runs),
        tuple(_public(r["after"]) for r in runs),
        tuple(run_record(s) for _, s in sides),
        model=args.model,
        methods=tuple(resolve_method(s) for _, s in sides),
    )
    t = summary["time_saving"]
    print(
        f"time saving r = 1 - median step time B / A = {t['r']:+.3f} "
        f"(90% interval {t['r_low']:+.3f} .. {t['r_high']:+.3f} over {t['steps']} steps, {t['clock']}); "
        f"report: {out / 'compare.md'}"
    )
    return 0


def cmd_merge(args) -> int:
    from lowrank.adapters import merge_adapters

    run = rebuild(Path(args.run))
    if getattr(run.model, "lowrank_config", None) is None:
        raise CliError(
            f"--run {args.run} trained without adapters (method {resolve_method(run.args)}): nothing to merge"
        )
    merged = merge_adapters(run.model)
    out = Path(args.output)
    with files.atomic_directory(out) as tmp:
        merged.save_pretrained(str(tmp))
        run.tokenizer.save_pretrained(str(tmp))
    print(f"merged model written to {out}")
    return 0


def cmd_quantize(args) -> int:
    import torch
    from safetensors import SafetensorError

    from lowrank import nf4
    from lowrank.cli.loading import _quiet_transformers
    from lowrank.models import Conv1D, linear_module_names

    transformers = _quiet_transformers()
    path = model_dir("minilm" if args.model in ("default", "minilm") else args.model)
    if path != model_dir("minilm") and is_quantized_checkpoint(read_model_config(path)):
        raise CliError(f"--model {path} is already a 4-bit checkpoint; quantize takes a 16/32-bit model")
    try:
        model = transformers.AutoModel.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CliError(f"cannot load model {str(path)!r}: {first} (a truncated or corrupted checkpoint?)") from None
    linears = [(n, model.get_submodule(n)) for n in linear_module_names(model)]
    if not linears:
        raise CliError(f"{path}: the model has no linear layers (nn.Linear / Conv1D) to quantize")
    bytes_before = bytes_after = numel = 0
    err_sq = ref_sq = 0.0
    abs_err_sum, max_err = 0.0, 0.0
    t0 = time.perf_counter()
    for _, layer in linears:
        w = layer.weight.detach()
        if Conv1D and isinstance(layer, Conv1D):  # GPT-2 stores (in, out); quantize (out, in) as prepare_model does
            w = w.T.contiguous()
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
