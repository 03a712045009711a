"""Logs, plots and markdown reports of training runs (matplotlib's Agg backend: PNG files, no display).

A run directory gets ``log.jsonl`` and ``log.csv`` (one row per optimizer step), ``evals.jsonl``,
``loss.png`` (train loss per step, eval loss points with the before-training evaluation at step 0),
``delta_w.png`` (‖ΔW_t‖_F = ‖W_t − W_{t−1}‖_F per step: the total over tracked matrices and the largest
few, plus the cumulative ‖W_t − W_0‖_F), ``step_time.png`` and ``report.md``. A comparison directory gets
``compare_loss.png`` (both curves), ``compare_scatter.png`` (loss B vs loss A per step, y = x, colour =
step with a colour bar), ``compare_delta_w.png`` and ``compare.md`` with the time saving
r = 1 − median step time B / median step time A (with a bootstrap interval) and final metrics. The
plotting functions return the matplotlib figures; every file goes through :mod:`lowrank.files`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lowrank import files  # noqa: E402

_CSV_COLUMNS = (
    "step",
    "loss",
    "lr",
    "grad_norm",
    "targets",
    "tokens",
    "time_s",
    "cpu_time_s",
    "tokens_per_s",
    "peak_mem_mb",
    "delta_w_total",
    "delta_w_cumulative",
)


def _save_figure(fig, path: Path) -> None:
    try:
        files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def write_logs(out_dir: Path, history: Sequence[dict], evals: Sequence[dict]) -> None:
    """``log.jsonl`` + ``log.csv`` (per step) and ``evals.jsonl`` (per evaluation)."""
    out_dir = Path(out_dir)
    files.write_text(out_dir / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    files.write_text(out_dir / "evals.jsonl", "".join(json.dumps(e) + "\n" for e in evals))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    files.write_text(out_dir / "log.csv", buf.getvalue())


def _integer_steps(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")


def _legend_outside(ax, **kwargs) -> None:
    """Legend to the right of the axes (never over the data), readable type."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, **kwargs)


def _is_lora(method: str) -> bool:
    return method in ("lora", "qlora")


def plot_run(
    out_dir: Path,
    history: Sequence[dict],
    evals: Sequence[dict],
    *,
    model: str = "model",
    method: str = "",
    before: dict | None = None,
    top_k: int = 5,
) -> dict[str, Figure]:
    """``loss.png``, ``delta_w.png`` and ``step_time.png`` for one run; returns the figures by file name.

    ``before``: metrics evaluated before training (drawn at step 0 of the loss plot).
    """
    out_dir = Path(out_dir)
    what = f"{model} ({method})" if method else model
    steps = [h["step"] for h in history]
    figures = {}

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["loss"] for h in history], label="train loss (per step)")
    eval_steps, eval_losses = [e["step"] for e in evals], [e["loss"] for e in evals]
    if before is not None and "loss" in before:
        eval_steps, eval_losses = [0, *eval_steps], [before["loss"], *eval_losses]
    if eval_steps:
        ax.plot(eval_steps, eval_losses, "o-", label="eval loss (step 0: before training)")
    ax.set(ylabel="loss", title=f"Loss per step: {what}")
    _integer_steps(ax)
    _legend_outside(ax)
    figures["loss.png"] = fig

    fig, ax = plt.subplots(figsize=(7, 4))
    lora = " (LoRA: ΔW = s·B·A)" if _is_lora(method) else ""
    ax.plot(steps, [h["delta_w_total"] for h in history], color="black", lw=2, label="‖W_t − W_{t−1}‖_F, all tracked")
    if history and "delta_w_cumulative" in history[-1]:
        ax.plot(
            steps,
            [h["delta_w_cumulative"] for h in history],
            color="tab:red",
            lw=2,
            ls="--",
            label="‖W_t − W_0‖_F (cumulative), all tracked",
        )
    if history and history[-1]["delta_w"]:
        totals = {n: sum(h["delta_w"].get(n, 0.0) for h in history) for n in history[-1]["delta_w"]}
        largest = sorted(totals, key=totals.get, reverse=True)[:top_k]
        for name, label in zip(largest, _matrix_labels(largest), strict=True):
            ax.plot(steps, [h["delta_w"].get(name, float("nan")) for h in history], lw=1, label=label)
    ax.set(ylabel="Frobenius norm", title=f"Weight change per step, ‖ΔW_t‖_F{lora}: {what}")
    if history and min(h["delta_w_total"] for h in history) > 0:
        ax.set_yscale("log")  # per-step changes shrink with the lr schedule; the cumulative one grows
    _integer_steps(ax)
    _legend_outside(ax)
    figures["delta_w.png"] = fig

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [h["time_s"] * 1000 for h in history], label="wall time")
    if history and "cpu_time_s" in history[0]:
        ax.plot(steps, [h["cpu_time_s"] * 1000 for h in history], label="CPU time (all threads)")
    ax.set(ylabel="ms per step", title=f"Time per optimizer step: {what}")
    _integer_steps(ax)
    _legend_outside(ax)
    figures["step_time.png"] = fig
    for name, fig in figures.items():
        _save_figure(fig, out_dir / name)
    return figures


def _matrix_labels(names: Sequence[str], width: int = 40) -> list[str]:
    """Readable legend labels: the prefix every name shares is dropped ('bert.encoder.layer.0.attention.self.query'
    -> 'layer 0: attention.self.query'); what is still too long is cut in the middle, never at the front."""
    if len(names) > 1:
        prefix = os.path.commonprefix([n.split(".") for n in names])
    else:
        prefix = names[0].split(".")[:-3] if names else []
    labels = []
    for name in names:
        parts = name.split(".")[len(prefix) :]
        if prefix and prefix[-1] in ("layer", "layers", "h", "block", "blocks") and parts and parts[0].isdigit():
            text = f"layer {parts[0]}: " + ".".join(parts[1:])
        else:
            text = ".".join(parts) or name
        labels.append(text if len(text) <= width else text[: width // 2 - 1] + "…" + text[-(width // 2) :])
    return labels


def _metrics_table(rows: dict[str, dict[str, float]]) -> str:
    keys = sorted({k for m in rows.values() for k, v in m.items() if isinstance(v, (int, float))})
    lines = ["| | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_fmt(rows[name].get(key)) for name in rows) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_run_report(
    out_dir: Path,
    title: str,
    summary: dict,
    metrics: dict[str, dict[str, float]],
    history: Sequence[dict],
    total_time_s: float,
) -> None:
    """``report.md``: settings, metrics before/after, timings, and the plots."""
    times = [h["time_s"] for h in history]
    lines = [
        f"# {title}",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(summary, indent=2, default=str),
        "```",
        "",
        "## Metrics",
        "",
        _metrics_table(metrics),
        "",
        "## Time",
        "",
        f"- optimizer steps: {len(history)}",
        f"- total training time: {total_time_s:.2f} s",
        f"- time per step: mean {1000 * sum(times) / max(len(times), 1):.1f} ms, "
        f"max {1000 * max(times, default=0):.1f} ms",
        f"- final train loss: {history[-1]['loss']:.4f}" if history else "- no steps run",
        f"- final ‖ΔW‖_F (tracked total): {history[-1]['delta_w_total']:.4g}" if history else "",
        "",
        "## Plots",
        "",
        "![loss](loss.png)",
        "![delta_w](delta_w.png)",
        "![step time](step_time.png)",
        "",
    ]
    files.write_text(Path(out_dir) / "report.md", "\n".join(lines))


def time_saving(total_a: float, total_b: float) -> float:
    """r = (T_A − T_B) / T_A: the fraction of A's training time that B saves (negative: B is slower)."""
    return (total_a - total_b) / total_a if total_a > 0 else 0.0


def step_time_saving(
    history_a: Sequence[dict], history_b: Sequence[dict], *, resamples: int = 2000, seed: int = 0
) -> dict:
    """r = 1 − median(step time B) / median(step time A), with a 90% bootstrap interval over steps.

    Per-step times are robust where one total is not (a stalled step moves a median little). On the
    CPU the process CPU time per step is used when both runs logged it (it does not count time the
    process waits for cores other programs hold); the first step (allocation, lazy init) is left out
    when there are more.
    """
    clock = "cpu_time_s" if all("cpu_time_s" in h for h in (*history_a, *history_b)) else "time_s"
    a = np.array([h[clock] for h in history_a[1:] or history_a], dtype=float)
    b = np.array([h[clock] for h in history_b[1:] or history_b], dtype=float)
    if not len(a) or not len(b) or np.median(a) <= 0:
        return {"r": 0.0, "r_low": 0.0, "r_high": 0.0, "steps": 0, "clock": clock}
    r = 1.0 - float(np.median(b) / np.median(a))
    rng = np.random.default_rng(seed)
    ra = np.median(rng.choice(a, (resamples, len(a))), axis=1)
    rb = np.median(rng.choice(b, (resamples, len(b))), axis=1)
    boot = 1.0 - rb / np.maximum(ra, 1e-12)
    low, high = np.quantile(boot, [0.05, 0.95])
    return {
        "r": r,
        "r_low": float(low),
        "r_high": float(high),
        "steps": int(min(len(a), len(b))),
        "clock": "CPU time per step" if clock == "cpu_time_s" else "wall time per step",
        "median_step_a_s": float(np.median(a)),
        "median_step_b_s": float(np.median(b)),
    }


def plot_comparison(
    names: tuple[str, str],
    histories: tuple[Sequence[dict], Sequence[dict]],
    *,
    model: str = "model",
    methods: tuple[str, str] | None = None,
) -> dict[str, Figure]:
    """The comparison's figures by file name (not yet saved); ``methods`` name each side's method in the titles."""
    (a, b), (ha, hb) = names, histories
    if methods is not None:
        a, b = (f"{n} ({m})" if m and m != n else n for n, m in zip(names, methods, strict=True))
    figures = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, h in ((a, ha), (b, hb)):
        ax.plot([e["step"] for e in h], [e["loss"] for e in h], label=f"{name}: train loss")
    ax.set(ylabel="train loss", title=f"Loss per step, {a} vs {b}: {model}")
    _integer_steps(ax)
    _legend_outside(ax)
    figures["compare_loss.png"] = fig

    n = min(len(ha), len(hb))
    la, lb = [e["loss"] for e in ha[:n]], [e["loss"] for e in hb[:n]]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = ax.scatter(la, lb, s=14, c=[e["step"] for e in ha[:n]], cmap="viridis", label="one optimizer step")
    if n:
        bar = fig.colorbar(points, ax=ax, label="optimizer step (colour)")
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        lo, hi = min(la + lb), max(la + lb)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x (equal loss)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    ax.set(xlabel=f"loss of {a}", ylabel=f"loss of {b}", title=f"Per-step train loss, {b} vs {a}: {model}")
    figures["compare_scatter.png"] = fig

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, h in ((a, ha), (b, hb)):
        ax.plot([e["step"] for e in h], [e["delta_w_total"] for e in h], label=f"{name}: ‖W_t − W_{{t−1}}‖_F")
        if h and "delta_w_cumulative" in h[0]:
            ax.plot(
                [e["step"] for e in h], [e["delta_w_cumulative"] for e in h], ls="--", label=f"{name}: ‖W_t − W_0‖_F"
            )
    ax.set(ylabel="Frobenius norm (all tracked)", title=f"Weight change per step, {a} vs {b}: {model}")
    _integer_steps(ax)
    _legend_outside(ax)
    figures["compare_delta_w.png"] = fig
    return figures


def write_comparison(
    out_dir: Path,
    names: tuple[str, str],
    histories: tuple[Sequence[dict], Sequence[dict]],
    times: tuple[float, float],
    metrics: tuple[dict, dict],
    settings: tuple[dict, dict],
    *,
    model: str = "model",
    methods: tuple[str, str] | None = None,
) -> dict:
    """Side-by-side plots and ``compare.md``; returns the summary numbers."""
    out_dir = Path(out_dir)
    (a, b), (ha, hb) = names, histories
    for name, fig in plot_comparison(names, histories, model=model, methods=methods).items():
        _save_figure(fig, out_dir / name)
    saving = step_time_saving(ha, hb)
    summary = {
        "time_a_s": times[0],
        "time_b_s": times[1],
        "time_saving_r": saving["r"],
        "time_saving": saving,
        "time_saving_total_r": time_saving(*times),
        "final_loss_a": ha[-1]["loss"] if ha else None,
        "final_loss_b": hb[-1]["loss"] if hb else None,
        "metrics_a": metrics[0],
        "metrics_b": metrics[1],
    }
    lines = [
        f"# Comparison: A = {a}, B = {b}",
        "",
        "Both runs start from the same initial weights and see the same data order.",
        "",
        "## Settings",
        "",
        "| | A | B |",
        "|---|---|---|",
    ]
    for key in sorted(set(settings[0]) | set(settings[1])):
        va, vb = settings[0].get(key), settings[1].get(key)
        if va != vb and key != "output":
            lines.append(f"| {key} | {va} | {vb} |")
    lines += [
        "",
        "## Results",
        "",
        _metrics_table({f"A: {a}": metrics[0], f"B: {b}": metrics[1]}),
        "",
        f"- training time: T_A = {times[0]:.2f} s, T_B = {times[1]:.2f} s (totals; one noisy reading each)",
        f"- time saving r = 1 − median step time B / median step time A = {saving['r']:+.3f}, "
        f"90% bootstrap interval {saving['r_low']:+.3f} .. {saving['r_high']:+.3f} over {saving['steps']} steps "
        f"({saving['clock']}; the first step left out)",
        f"- from the totals, (T_A − T_B) / T_A = {summary['time_saving_total_r']:+.3f}",
        "",
        "![loss](compare_loss.png)",
        "![scatter](compare_scatter.png)",
        "![delta_w](compare_delta_w.png)",
        "",
    ]
    files.write_text(out_dir / "compare.md", "\n".join(lines))
    files.write_json(out_dir / "compare.json", summary)
    return summary


__all__ = [
    "plot_comparison",
    "step_time_saving",
    "plot_run",
    "time_saving",
    "write_comparison",
    "write_logs",
    "write_run_report",
]
