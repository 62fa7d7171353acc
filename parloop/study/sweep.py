"""The per-model learning-rate sweep: each model of the grid gets the learning rate that suits it, chosen on
validation bits per byte at the smallest scale with a seed of its own (docs/study.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from parloop.study.grid import Cell, Preset, Run, Scale


def sweep_runs(cells: Sequence[Cell], scale: Scale, preset: Preset) -> list[Run]:
    """The sweep's runs: every cell at `scale` with the sweep seed and every multiplier (none for a single one)."""
    if len(preset.lr_multipliers) < 2:
        return []
    return [Run(cell, scale, preset.sweep_seed, m) for cell in cells for m in preset.lr_multipliers]


def sweep_dir(study: Path, run: Run) -> Path:
    return study / "sweep" / run.scale.name / run.cell.name / f"lr-x{run.lr_multiplier:g}"


def choose_learning_rates(cells: Sequence[Cell], preset: Preset,
                          val_bpb: Mapping[Run, float]) -> dict[str, dict[str, Any]]:
    """Per cell: the validation bits per byte of each multiplier, the chosen one (the lowest; the preset's first
    multiplier of 1.0 when there was no sweep) and `edge`: "largest" or "smallest" when the chosen one is at that end
    of a sweep of three or more multipliers, so that the best rate may lie outside the swept range (None otherwise;
    two multipliers, as in `--quick`, cannot bracket an optimum, so every choice would be an edge)."""
    chosen = {}
    for cell in cells:
        tried = {run.lr_multiplier: bpb for run, bpb in val_bpb.items() if run.cell == cell}
        best = min(tried, key=tried.__getitem__) if tried else 1.0
        edge = {max(tried): "largest", min(tried): "smallest"}.get(best) if len(tried) > 2 else None
        chosen[cell.name] = {"multiplier": best, "val_bpb": {f"{m:g}": v for m, v in sorted(tried.items())},
                             "edge": edge}
    return chosen


def edge_warning(sweep: Mapping[str, Mapping[str, Any]]) -> str | None:
    """A sentence naming the models whose chosen multiplier is at an end of the sweep (None if there are none)."""
    at_edge = [f"{name} (the {s['edge']}, x {s['multiplier']:g})" for name, s in sweep.items() if s.get("edge")]
    if not at_edge:
        return None
    return ("The sweep chose a multiplier at an end of its range for " + ", ".join(at_edge) + ": the best learning "
            "rate may lie outside it. Check by moving the sweep's centre (--set train.lr=...) or training those "
            "models at a rate beyond the range (docs/study.md, 'Learning rates').")
