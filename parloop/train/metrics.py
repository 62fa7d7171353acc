"""What a training run reports: console lines, `metrics.jsonl`, TensorBoard scalars and the curve plots (one run's
`curves.png`, or several runs overlaid on the same axes)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def say(message: str) -> None:
    """A line on stderr that does not break the training progress bar."""
    tqdm.write(message, file=sys.stderr)


def format_metrics(metrics: dict[str, Any]) -> str:
    """The final metrics of a run in one line."""
    return (f"val loss {metrics['val_loss']:.4f}  val bpb {metrics['val_bpb']:.4f}  test bpb "
            f"{metrics['test_bpb']:.4f}  {metrics['tokens_per_s']:,.0f} tokens/s  "
            f"({metrics['tokens']:,} tokens in {metrics['train_seconds']:.0f} s, wall-clock)")


class MetricsLog:
    """`metrics.jsonl` and TensorBoard scalars of a run directory, written by the main process only.

    A resumed run first drops the records past the step it resumes from, so the log reads as one run.
    """

    def __init__(self, run_dir: Path, resumed_step: int, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        path = run_dir / METRICS_FILE
        kept = []
        if resumed_step and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resumed_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` (with `kind` and `step`); its finite float values also go to TensorBoard."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, float) and math.isfinite(value):
                self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.writer.close()


def read_curves(metrics_path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float, float]]]:
    """`(train, val)` of a `metrics.jsonl`: (step, training loss) and (step, validation loss, validation bpb)."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"], r["val_bpb"]) for r in records if r["kind"] == "eval"]
    return train, val


def plot_runs(runs: Mapping[str, Path], out: Path, title: str, baseline: Mapping[str, float] | None = None) -> None:
    """Training and validation loss (left) and validation bits per byte (right) against the step, every run of
    `runs` ({label: metrics.jsonl}) in its own colour on the same two axes; `baseline` ({label: bpb}) adds
    horizontal reference lines to the bits-per-byte panel. Saved as a PNG."""
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    loss_ax, bpb_ax = fig.subplots(1, 2)
    for i, (label, path) in enumerate(runs.items()):
        color, prefix = f"C{i}", f"{label}: " if label else ""
        train, val = read_curves(path)
        if train:
            loss_ax.plot(*zip(*train, strict=True), color=color, linewidth=0.8, alpha=0.6, label=f"{prefix}train")
        if val:
            steps, losses, bpbs = zip(*val, strict=True)
            loss_ax.plot(steps, losses, "o-", color=color, markersize=3, label=f"{prefix}validation")
            bpb_ax.plot(steps, bpbs, "o-", color=color, markersize=3, label=label or "validation")
    for j, (label, value) in enumerate((baseline or {}).items()):
        bpb_ax.axhline(value, color="grey", linestyle=("--", ":", "-.")[j % 3], linewidth=1, label=label)
    loss_ax.set(xlabel="step", ylabel="loss (nats/token)", title="training and validation loss")
    bpb_ax.set(xlabel="step", ylabel="bits per byte (lower is better)", title="validation bits per byte")
    for ax in (loss_ax, bpb_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def plot_curves(metrics_path: Path, out: Path, title: str | None = None) -> None:
    """The curves of one run (see `plot_runs`), titled `title` (default: the run directory's name)."""
    plot_runs({"": metrics_path}, out, title or metrics_path.parent.name)
