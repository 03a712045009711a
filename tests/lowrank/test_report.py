"""Plots and reports: titles, series and axes checked on the matplotlib figures (not pixels)."""

from __future__ import annotations

import pytest
from matplotlib.ticker import MaxNLocator

from lowrank import report


def history(n: int = 6, scale: float = 1.0) -> list[dict]:
    return [
        {
            "step": t,
            "loss": 2.0 * scale / t,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "targets": 8,
            "tokens": 64,
            "time_s": 0.01 * scale,
            "cpu_time_s": 0.02 * scale * (1 + 0.01 * t),
            "tokens_per_s": 6400.0,
            "peak_mem_mb": 10.0,
            "delta_w": {
                "bert.encoder.layer.0.attention.self.query": 0.1 / t,
                "bert.encoder.layer.1.output.dense": 0.05,
            },
            "delta_w_total": 0.12 / t,
            "delta_w_cumulative": 0.12 * t,
        }
        for t in range(1, n + 1)
    ]


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_run_plots(tmp_path, method):
    evals = [{"step": 3, "loss": 1.0}, {"step": 6, "loss": 0.5}]
    figures = report.plot_run(tmp_path, history(), evals, model="minilm", method=method, before={"loss": 2.5})
    assert set(figures) == {"loss.png", "delta_w.png", "step_time.png"}
    assert all((tmp_path / name).stat().st_size > 1000 for name in figures)

    (loss,) = figures["loss.png"].axes
    assert "minilm" in loss.get_title() and method in loss.get_title() and "Loss" in loss.get_title()
    eval_line = next(line for line in loss.get_lines() if "eval" in line.get_label())
    assert list(eval_line.get_xdata()) == [0, 3, 6] and eval_line.get_ydata()[0] == 2.5  # before training at 0
    assert isinstance(loss.xaxis.get_major_locator(), MaxNLocator) and loss.xaxis.get_major_locator()._integer
    legend = loss.get_legend()
    assert legend.get_bbox_to_anchor().x0 > loss.get_window_extent().x1 - 1  # outside, right of the axes

    (delta,) = figures["delta_w.png"].axes
    title = delta.get_title()
    assert "per step" in title and "minilm" in title and method in title
    assert ("s·B·A" in title) == (method == "qlora")  # LoRA's formula only on LoRA runs
    series = {line.get_label(): list(line.get_ydata()) for line in delta.get_lines()}
    assert series["‖W_t − W_{t−1}‖_F, all tracked"] == pytest.approx([0.12 / t for t in range(1, 7)])
    assert series["‖W_t − W_0‖_F (cumulative), all tracked"] == pytest.approx([0.12 * t for t in range(1, 7)])
    assert "layer 0: attention.self.query" in legend_texts(delta)  # common prefix dropped, not cut at the front

    (time_ax,) = figures["step_time.png"].axes
    assert {"wall time", "CPU time (all threads)"} <= set(legend_texts(time_ax))


def test_comparison_plots_and_time_saving(tmp_path):
    a, b = history(8, 1.0), history(8, 0.5)
    summary = report.write_comparison(
        tmp_path, ("lora16", "qlora"), (a, b), (1.0, 0.6), ({"loss": 1}, {"loss": 2}), ({}, {}), model="minilm"
    )
    t = summary["time_saving"]
    assert t["r"] == pytest.approx(0.5) and t["clock"] == "CPU time per step" and t["steps"] == 7
    assert t["r_low"] <= t["r"] <= t["r_high"]
    assert "90% bootstrap interval" in (tmp_path / "compare.md").read_text()

    figures = report.plot_comparison(("lora16", "qlora"), (a, b), model="minilm", methods=("lora", "qlora"))
    scatter = figures["compare_scatter.png"]
    ax, bar = scatter.axes  # the colour bar is a second axes
    assert bar.get_ylabel() == "optimizer step (colour)"
    assert "minilm" in ax.get_title() and "lora16 (lora)" in ax.get_title()
    assert "y = x (equal loss)" in legend_texts(ax)
    delta = figures["compare_delta_w.png"].axes[0]
    assert {"lora16 (lora): ‖W_t − W_0‖_F", "qlora: ‖W_t − W_{t−1}‖_F"} <= set(legend_texts(delta))
