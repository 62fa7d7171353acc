"""`parloop study --track reasoning`: the stages of the reasoning track (docs/study.md, "The reasoning track").

1. the learning-rate sweep: at one point per task (its hardest difficulty, the smallest L), R = 1, the
   compute-matched R = 1 of R = 2 and every mode at R = 2, each at every multiplier, with the sweep seed, scored on
   the validation half of the held-out set; every other model takes the choice of its swept counterpart;
2. the depth check: R = 1 and R = 1 with 2 x L layers at every point and seed;
3. at the depth-hungry points (of the base depths `loop_layers`): every mode at R = 2 and filler models; R = 3, 4
   (in `more_loops_modes`, with their compute-matched R = 1 and filler models) at the `more_loops_at` points with
   the largest depth gain, where also `parallel` and `sequential_shared` R = 2 train with each of the preset's
   `variants` of the loop settings; points that do not need depth get none: the track cannot speak about loops
   there;
4. the report."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from parloop.study.reasoning_analysis import choose_multipliers, depth_hungry, group, multiplier
from parloop.study.reasoning_grid import (
    Point,
    ReasoningCell,
    ReasoningPreset,
    depth_cells,
    filler_cells,
    loop_cells,
    points,
    variant_cells,
)
from parloop.study.reasoning_report import write_reasoning_report
from parloop.study.reasoning_run import Job, run_jobs


def sweep_points(preset: ReasoningPreset) -> list[Point]:
    return [Point(t.name, max(t.difficulties), min(preset.layers)) for t in preset.tasks]


def sweep_jobs(preset: ReasoningPreset) -> list[Job]:
    if len(preset.lr_multipliers) < 2:
        return []
    cells = depth_cells() + loop_cells([2])
    return [Job(p, c, preset.sweep_seed, m, part="val") for p in sweep_points(preset) for c in cells
            for m in preset.lr_multipliers]


def compared_jobs(preset: ReasoningPreset, cells: list[ReasoningCell], at: list[Point],
                  chosen: dict[str, Any]) -> list[Job]:
    return [Job(p, c, seed, multiplier(chosen, p.task, c.name)) for p in at for c in cells
            for seed in range(preset.seeds)]


def loop_points(preset: ReasoningPreset, depth: list[dict[str, Any]]) -> dict[Point, list[int]]:
    """{point: the R to train there}: depth-hungry points (every point with `loops_everywhere`, so that `--quick`
    runs every stage whatever its depth check says) at the base depths of `loop_layers`; R > 2 only at the
    `more_loops_at` of them with the largest depth gain."""
    groups = group(depth)
    checks = {p: depth_hungry(groups.get(p.name, {})) for p in points(preset)}
    chosen = [p for p, (hungry, _) in checks.items() if (hungry or preset.loops_everywhere)
              and (preset.loop_layers is None or p.layers in preset.loop_layers)]
    gain = {p: checks[p][1].mean if checks[p][1] is not None else float("-inf") for p in chosen}
    ranked = sorted(chosen, key=lambda p: -gain[p])
    more = set(ranked if preset.more_loops_at is None else ranked[:preset.more_loops_at])
    return {p: sorted(preset.loops) if p in more else [2] for p in chosen}


def later_cells(preset: ReasoningPreset, loops: list[int]) -> list[ReasoningCell]:
    """The looped models at a point (and their deeper compute-matched ones), with filler tokens, and where R > 2 is
    trained the loop-setting variants at R = 2."""
    cells = loop_cells(loops, more_modes=preset.more_loops_modes) + filler_cells(loops, preset.filler_per_loop)
    return cells + (variant_cells(list(preset.variants)) if max(loops) > 2 else [])


def run_track(preset: ReasoningPreset, study: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Every stage, then report.md and results.json in `study`; returns the results."""
    started = time.perf_counter()
    sweep = run_jobs(sweep_jobs(preset), preset, study, "learning-rate sweep")
    chosen = choose_multipliers(sweep)
    grid = points(preset)
    depth = run_jobs(compared_jobs(preset, depth_cells(), grid, chosen), preset, study, "depth check")
    where = loop_points(preset, depth)
    print("loop models at: " + (", ".join(f"{p.name} (R = {', '.join(map(str, rs))})" for p, rs in where.items())
                                or "no point (none is depth-hungry)"), file=sys.stderr)
    later = [j for p, rs in where.items() for j in compared_jobs(preset, later_cells(preset, rs), [p], chosen)]
    models = depth + run_jobs(later, preset, study, "loop models")
    settings = {**settings, "wall_seconds": time.perf_counter() - started}
    return write_reasoning_report(study, models, sweep, chosen, settings)


def scaled(preset: ReasoningPreset, **changes: Any) -> ReasoningPreset:
    """The preset with command-line changes (seeds, workers, ...) applied; absent ones keep the preset's."""
    return replace(preset, **{k: v for k, v in changes.items() if v is not None})
