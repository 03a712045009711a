"""Logs, plots and markdown reports of training runs (matplotlib's Agg backend: PNG files, no display).

A run directory gets ``log.jsonl`` and ``log.csv`` (one row per optimizer step), ``evals.jsonl``,
``loss.png`` (train loss per step, eval loss points), ``delta_w.png`` (‖ΔW_t‖_F per step: the total over
tracked matrices and the largest few), ``step_time.png`` and ``report.md``. A comparison directory gets
``compare_loss.png`` (both curves), ``compare_scatter.png`` (loss B vs loss A per step with y = x),
``compare_delta_w.png`` and ``compare.md`` with the time saving r = (T_A − T_B) / T_A and final metrics.
Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lowrank import files  # noqa: E402

_CSV_COLUMNS = (
    "step",
    "loss",
    "lr",
    "grad_norm",
    "targets",
    "tokens",
    "time_s",
    "tokens_per_s",
    "peak_mem_mb",
    "delta_w_total",
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


def plot_run(out_dir: Path, history: Sequence[dict], evals: Sequence[dict], title: str = "", top_k: int = 6) -> None:
    """``loss.png``, ``delta_w.png`` and ``step_time.png`` for one run."""
    out_dir = Path(out_dir)
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [h["loss"] for h in history], label="train loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="eval loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title=f"Loss {title}".strip())
    ax.legend()
    _save_figure(fig, out_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [h["delta_w_total"] for h in history], color="black", lw=2, label="total (tracked)")
    if history and history[-1]["delta_w"]:
        largest = sorted(history[-1]["delta_w"], key=history[-1]["delta_w"].get, reverse=True)[:top_k]
        for name in largest:
            ax.plot(steps, [h["delta_w"].get(name, float("nan")) for h in history], lw=1, label=name[-40:])
    ax.set(xlabel="optimizer step", ylabel="‖ΔW‖_F", title="Weight change per step (LoRA: s·B·A)")
    ax.legend(fontsize=6)
    _save_figure(fig, out_dir / "delta_w.png")

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(steps, [h["time_s"] * 1000 for h in history])
    ax.set(xlabel="optimizer step", ylabel="ms per step", title="Time per step")
    _save_figure(fig, out_dir / "step_time.png")


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


def write_comparison(
    out_dir: Path,
    names: tuple[str, str],
    histories: tuple[Sequence[dict], Sequence[dict]],
    times: tuple[float, float],
    metrics: tuple[dict, dict],
    settings: tuple[dict, dict],
) -> dict:
    """Side-by-side plots and ``compare.md``; returns the summary numbers."""
    out_dir = Path(out_dir)
    (a, b), (ha, hb) = names, histories
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, h in ((a, ha), (b, hb)):
        ax.plot([e["step"] for e in h], [e["loss"] for e in h], label=name)
    ax.set(xlabel="optimizer step", ylabel="train loss", title="Loss curves")
    ax.legend()
    _save_figure(fig, out_dir / "compare_loss.png")

    n = min(len(ha), len(hb))
    la, lb = [e["loss"] for e in ha[:n]], [e["loss"] for e in hb[:n]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(la, lb, s=10, c=range(n), cmap="viridis")
    if n:
        lo, hi = min(la + lb), max(la + lb)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.legend()
    ax.set(xlabel=f"loss {a}", ylabel=f"loss {b}", title="Per-step loss, B vs A (colour: step)")
    _save_figure(fig, out_dir / "compare_scatter.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, h in ((a, ha), (b, hb)):
        ax.plot([e["step"] for e in h], [e["delta_w_total"] for e in h], label=name)
    ax.set(xlabel="optimizer step", ylabel="‖ΔW‖_F (tracked total)", title="Weight change per step")
    ax.legend()
    _save_figure(fig, out_dir / "compare_delta_w.png")

    r = time_saving(*times)
    summary = {
        "time_a_s": times[0],
        "time_b_s": times[1],
        "time_saving_r": r,
        "final_loss_a": la[-1] if la else None,
        "final_loss_b": lb[-1] if lb else None,
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
        f"- training time: T_A = {times[0]:.2f} s, T_B = {times[1]:.2f} s",
        f"- time saving r = (T_A − T_B) / T_A = {r:+.3f}",
        "",
        "![loss](compare_loss.png)",
        "![scatter](compare_scatter.png)",
        "![delta_w](compare_delta_w.png)",
        "",
    ]
    files.write_text(out_dir / "compare.md", "\n".join(lines))
    files.write_text(out_dir / "compare.json", json.dumps(summary, indent=2))
    return summary


__all__ = ["plot_run", "time_saving", "write_comparison", "write_logs", "write_run_report"]
