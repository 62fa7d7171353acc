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
    """Per cell: the validation bits per byte of each multiplier and the chosen one (the lowest; the preset's
    first multiplier of 1.0 when there was no sweep)."""
    chosen = {}
    for cell in cells:
        tried = {run.lr_multiplier: bpb for run, bpb in val_bpb.items() if run.cell == cell}
        best = min(tried, key=tried.__getitem__) if tried else 1.0
        chosen[cell.name] = {"multiplier": best, "val_bpb": {f"{m:g}": v for m, v in sorted(tried.items())}}
    return chosen
