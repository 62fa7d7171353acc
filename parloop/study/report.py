"""The study's outputs: results.json, report.md (tables and recommendation) and the PNG figures."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from parloop.study.analysis import METRICS, Rows, offset_costs, recommend, rows_by_mode

# the per-loop panels of diagnostics.png: (key in the diagnostics, title, loop of the first value)
DIAGNOSTIC_PANELS = (
    ("logit_lens_loss", "logit-lens loss (nats/token)", 0), ("relative_update", "relative update", 1),
    ("update_cosine", "cosine of successive updates", 2), ("attention_js", "attention JS (bits)", 1),
    ("effective_rank", "effective rank", 0), ("gate_mean", "gate: weight on global branch", 1))


def _fmt(value: Any, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_tables(by_mode: Rows, offset: dict[int, dict[str, float]]) -> str:
    """One table per mode (rows = R, columns = evaluations), then the offset cost per R."""
    head = "| R | " + " | ".join(title for _, title, _ in METRICS) + " | parameters |"
    rule = "|---" * (len(METRICS) + 2) + "|"
    out = []
    for mode, rows in by_mode.items():
        out += [f"### {mode}", "", head, rule]
        for r in sorted(rows):
            ev = rows[r]["evaluation"]
            out.append(f"| {r} | " + " | ".join(_fmt(ev[key]) for key, _, _ in METRICS)
                       + f" | {rows[r]['training']['parameters']:,} |")
        out.append("")
    if offset:
        out += ["### Offset cost (how much worse `parallel` is than `sequential_shared`; positive = the cross-loop "
                "offset costs)", "", "| R | " + " | ".join(title for _, title, _ in METRICS) + " |",
                "|---" * (len(METRICS) + 1) + "|"]
        out += [f"| {r} | " + " | ".join(f"{cost[key]:+.4f}" for key, _, _ in METRICS) + " |"
                for r, cost in sorted(offset.items())]
        out.append("")
    return "\n".join(out)


def diagnostics_tables(by_mode: Rows) -> str:
    """One table per mode of the per-loop measures of every looped model (a row per R and loop)."""
    out = []
    for mode, rows in by_mode.items():
        looped = {r: rows[r]["evaluation"]["diagnostics"] for r in sorted(rows) if r >= 2}
        if not looped:
            continue
        out += [f"### {mode}", "", "| R | loop | logit-lens loss | relative update | update cosine | attention JS "
                "(mean over layers) | effective rank | mean pairwise cosine | gate (mean over layers) |",
                "|---" * 9 + "|"]
        for r, d in looped.items():
            for loop in range(r):
                js = np.mean([layer[loop - 1] for layer in d["attention_js"]]) if loop else None
                gate = np.mean([layer[loop - 1] for layer in d["gate_mean"]]) if loop and d["gate_mean"] else None
                out.append(f"| {r} | {loop} | {_fmt(d['logit_lens_loss'][loop])} | "
                           f"{_fmt(d['relative_update'][loop - 1] if loop else None)} | "
                           f"{_fmt(d['update_cosine'][loop - 2] if loop >= 2 else None, 3)} | {_fmt(js)} | "
                           f"{_fmt(d['effective_rank'][loop], 2)} | {_fmt(d['mean_pairwise_cosine'][loop], 3)} | "
                           f"{_fmt(gate, 3)} |")
        out.append("")
    return "\n".join(out)


def _figure(width: float, height: float, rows: int, cols: int) -> tuple[Figure, np.ndarray]:
    """A figure drawn by Agg (no GUI backend, no pyplot state) and its axes, always as an array."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(rows, cols))


def _plot_evaluations(path: Path, by_mode: Rows) -> None:
    fig, axes = _figure(4 * len(METRICS), 3.4, 1, len(METRICS))
    for ax, (key, title, higher) in zip(axes, METRICS, strict=True):
        for mode, rows in by_mode.items():
            rs = sorted(rows)
            ax.plot(rs, [rows[r]["evaluation"][key] for r in rs], marker="o", label=mode)
        ax.set(title=f"{title} ({'higher' if higher else 'lower'} is better)", xlabel="loops R")
        ax.set_xticks(sorted({r for rows in by_mode.values() for r in rows}))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_panel(ax: Axes, by_mode: Rows, key: str, first: int) -> None:
    """One measure against the loop, a line per model: one colour per R and one line style per mode, the same
    in every panel."""
    for mode, style in zip(by_mode, ("-", "--", ":"), strict=False):
        for r, row in sorted(by_mode[mode].items()):
            d = row["evaluation"].get("diagnostics")
            if not d or not d[key]:
                continue
            values = d[key]
            if key in ("attention_js", "gate_mean"):  # per layer: the mean over layers
                values = np.mean(np.asarray(values), axis=0)
            ax.plot(range(first, first + len(values)), values, style, color=f"C{r % 10}", marker="o",
                    label=f"{mode} R={r}")


def _plot_diagnostics(path: Path, by_mode: Rows) -> None:
    fig, axes = _figure(13, 7, 2, 3)
    for ax, (key, title, first) in zip(axes.flat, DIAGNOSTIC_PANELS, strict=True):
        _plot_panel(ax, by_mode, key, first)
        ax.set(title=title, xlabel="loop")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_offset_cost(path: Path, offset: dict[int, dict[str, float]]) -> None:
    fig, axes = _figure(4 * len(METRICS), 3.2, 1, len(METRICS))
    rs = sorted(offset)
    for ax, (key, title, _) in zip(axes, METRICS, strict=True):
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.plot(rs, [offset[r][key] for r in rs], marker="o", color="C3")
        ax.set(title=f"offset cost: {title}", xlabel="loops R")
        ax.set_xticks(rs)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(study: Path, by_mode: Rows, offset: dict[int, dict[str, float]]) -> list[str]:
    """The report's PNG figures; returns their file names."""
    _plot_evaluations(study / "evaluations.png", by_mode)
    _plot_diagnostics(study / "diagnostics.png", by_mode)
    if not offset:
        return ["evaluations.png", "diagnostics.png"]
    _plot_offset_cost(study / "offset_cost.png", offset)
    return ["evaluations.png", "diagnostics.png", "offset_cost.png"]


def _report_markdown(models: Sequence[dict[str, Any]], by_mode: Rows, offset: dict[int, dict[str, float]],
                     recommendation: dict[str, Any], figures: Sequence[str], settings: dict[str, Any]) -> str:
    counts = models[0]["evaluation"]["counts"]
    preset = settings["preset"]
    report = [
        "# Loop-count study", "",
        f"Models: {len(models)} ({', '.join(m['name'] for m in models)}), each trained on "
        f"{models[0]['training']['tokens']:,} tokens of the same data in the same order with the same seed; only "
        "the loop count R and the loop mode differ. R = 1 is one model, the same in every mode.", "",
        f"Held-out evaluation: bits per byte on {counts['val_files']} validation and {counts['test_files']} test "
        f"files (at most {preset['eval_bytes']:,} bytes each split); code reasoning on {counts['programs']} "
        f"generated programs (exact match of the printed output); line completion on {counts['lines']} test-file "
        f"lines (greedy exact match); HumanEval pass@1 (greedy) on {counts['humaneval']} problems.", "",
        "## Results (rows = loop count, columns = evaluations)", "", markdown_tables(by_mode, offset),
        "## Recommendation", "", f"**R = {recommendation['loops']}.** {recommendation['reason']}", "",
        "## Per-loop diagnostics (test files)", "",
        "Loop 0 is the first pass. Relative update: ||h_r - h_(r-1)|| / ||h_(r-1)||; update cosine: between "
        "h_r - h_(r-1) and h_(r-1) - h_(r-2) (negative = oscillation); attention JS: Jensen-Shannon divergence "
        "of the global attention from the previous loop's; gate: weight of the shared-KV (global) branch.", "",
        diagnostics_tables(by_mode), "## Figures", "",
        *[f"![{name}]({name})" for name in figures], "",
        "## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    return "\n".join(report)


def write_report(study: Path, models: Sequence[dict[str, Any]], modes: Sequence[str], settings: dict[str, Any]) -> dict:
    """results.json, report.md and the figures, from the records of all models."""
    by_mode = rows_by_mode(models, modes)
    offset = offset_costs(by_mode)
    recommendation = recommend(by_mode, offset)
    figures = plot(study, by_mode, offset)
    results = {"settings": settings, "models": list(models), "offset_cost": {str(r): c for r, c in offset.items()},
               "recommendation": recommendation}
    (study / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report = _report_markdown(models, by_mode, offset, recommendation, figures, settings)
    (study / "report.md").write_text(report)
    return results
