"""The report's PNG figures: evaluations against R, the R=2 - R=1 gap against scale, the offset cost, and the
per-loop diagnostics; every mean over seeds drawn with its 95 % interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from parloop.study.analysis import METRICS, Groups, average_diagnostics, cell_loops, gap_vs_scale, offset_costs
from parloop.study.stats import Interval, mean_interval

# the per-loop panels of diagnostics.png: (key in the diagnostics, title, loop of the first value)
DIAGNOSTIC_PANELS = (
    ("logit_lens_loss", "logit-lens loss (nats/token)", 0), ("relative_update", "relative update", 1),
    ("update_cosine", "cosine of successive updates", 2), ("attention_js", "attention JS (bits)", 1),
    ("effective_rank", "effective rank", 0), ("gate_mean", "gate: weight on global branch", 1))
MODE_STYLES = {"parallel": "-", "sequential_shared": "--", "sequential": ":"}


def _figure(width: float, height: float, rows: int, cols: int) -> tuple[Figure, np.ndarray]:
    """A figure drawn by Agg (no GUI backend, no pyplot state) and its axes, always as an array."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(rows, cols))


def _errorbar(ax: Axes, xs: list[float], intervals: list[Interval], **style: Any) -> None:
    """Means with their 95 % intervals (no bar where one seed gave no interval)."""
    half = [0.0 if i.n < 2 else i.half_width for i in intervals]
    ax.errorbar(xs, [i.mean for i in intervals], yerr=half, capsize=3, **{"marker": "o", **style})


def plot_evaluations(path: Path, cells: dict[str, dict[int, dict[str, Any]]], modes: list[str]) -> None:
    """Each evaluation against R at one scale: a line per mode (R = 1 shared), compute-matched R = 1 as crosses."""
    fig, axes = _figure(4 * len(METRICS), 3.4, 1, len(METRICS))
    for ax, (key, title, higher) in zip(axes, METRICS, strict=True):
        for mode in modes:
            names = (["r1"] if "r1" in cells else []) + [n for n in cells if n.startswith(f"{mode}-r")]
            _errorbar(ax, [cell_loops(cells, n) for n in names],
                      [mean_interval([m["evaluation"][key] for m in cells[n].values()]) for n in names],
                      linestyle=MODE_STYLES.get(mode, "-"), label=mode)
        matched = [n for n in cells if n.startswith("r1-x")]
        if matched:
            _errorbar(ax, [next(iter(cells[n].values()))["depth"] for n in matched],
                      [mean_interval([m["evaluation"][key] for m in cells[n].values()]) for n in matched],
                      linestyle="none", marker="x", color="k", label="R = 1, R x layers")
        ax.set(title=f"{title} ({'higher' if higher else 'lower'} is better)", xlabel="loops R")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_gap_vs_scale(path: Path, groups: Groups) -> None:
    """Test bits per byte of parallel R minus R = 1 against parameters x tokens, a line per R."""
    fig, axes = _figure(5.5, 4, 1, 1)
    ax = axes[0]
    ax.axhline(0.0, color="grey", lw=0.8)
    for r, points in sorted(gap_vs_scale(groups).items()):
        points = [p for p in points if p["gap"] is not None]
        _errorbar(ax, [p["compute"] for p in points], [p["gap"] for p in points], label=f"R = {r}")
    ax.set(xscale="log", xlabel="parameters x training tokens (R = 1 model)",
           ylabel="test bits/byte: parallel R minus R = 1", title="gap against scale (95 % intervals over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_offset_cost(path: Path, groups: Groups) -> None:
    """How much worse parallel is than sequential_shared, against R, a line per scale, a panel per metric."""
    fig, axes = _figure(4 * len(METRICS), 3.2, 1, len(METRICS))
    offsets = offset_costs(groups)
    for ax, (key, title, _) in zip(axes, METRICS, strict=True):
        ax.axhline(0.0, color="grey", lw=0.8)
        for scale, per_r in offsets.items():
            rs = [r for r in sorted(per_r) if per_r[r][key] is not None]
            _errorbar(ax, rs, [per_r[r][key] for r in rs], label=scale)
        loops = sorted({r for per_r in offsets.values() for r in per_r})
        # ticks at the trained R only: with a single R the default locator labels fractions of a loop
        ax.set(title=f"offset cost: {title}", xlabel="loops R", xticks=loops,
               xlim=(loops[0] - 0.5, loops[-1] + 0.5) if loops else None)
    axes[0].legend(fontsize=7, title="scale")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_panel(ax: Axes, diagnostics: dict[str, dict[int, dict[str, Any]]], key: str, first: int) -> None:
    """One measure against the loop, a line per model: one colour per R and one line style per mode."""
    for mode, per_r in diagnostics.items():
        for r, d in sorted(per_r.items()):
            if not d[key]:
                continue
            values = d[key]
            if key in ("attention_js", "gate_mean"):  # per layer: the mean over layers
                values = np.mean(np.asarray(values), axis=0)
            ax.plot(range(first, first + len(values)), values, MODE_STYLES.get(mode, "-"), color=f"C{r % 10}",
                    marker="o", label=f"{mode} R={r}")


def looped_diagnostics(cells: dict[str, dict[int, dict[str, Any]]], modes: list[str]) -> dict[str, dict[int, Any]]:
    """{mode: {R: the seed-averaged per-loop diagnostics}} of the looped models at one scale."""
    out: dict[str, dict[int, Any]] = {}
    for mode in modes:
        for name in (n for n in cells if n.startswith(f"{mode}-r")):
            diag = average_diagnostics(cells[name])
            if diag is not None:
                out.setdefault(mode, {})[cell_loops(cells, name)] = diag
    return out


def plot_diagnostics(path: Path, cells: dict[str, dict[int, dict[str, Any]]], modes: list[str]) -> None:
    fig, axes = _figure(13, 7, 2, 3)
    diagnostics = looped_diagnostics(cells, modes)
    for ax, (key, title, first) in zip(axes.flat, DIAGNOSTIC_PANELS, strict=True):
        _plot_panel(ax, diagnostics, key, first)
        ax.set(title=title, xlabel="loop")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
