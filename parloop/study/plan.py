"""The study's plan: the learning-rate sweep's runs and the grid's runs (every cell at every scale and seed), which
of them are done, and how long the rest should take."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from parloop.study.estimate import EVALUATION_SHARE, Timing, is_trained, training_time
from parloop.study.grid import Cell, Preset, Run, Scale, grid
from parloop.study.run import recipe_for
from parloop.study.sweep import sweep_dir, sweep_runs
from parloop.train.corpus import Corpus


@dataclass
class Plan:
    cells: list[Cell]
    sweep: list[Run]  # at the smallest scale, with the sweep seed
    runs: list[Run]  # the compared models, at the recipe's learning rate until the sweep has chosen

    def with_learning_rates(self, chosen: dict[str, dict[str, Any]]) -> list[Run]:
        """The compared models, each with the multiplier the sweep chose for its cell."""
        return [replace(run, lr_multiplier=chosen[run.cell.name]["multiplier"]) for run in self.runs]

    def done(self, study: Path, index: int) -> bool:
        """Job `index` (the sweep's runs first, then the models) is trained, and a model also evaluated."""
        if index < len(self.sweep):
            return is_trained(sweep_dir(study, self.sweep[index]))
        run_dir = study / "models" / self.runs[index - len(self.sweep)].name
        return is_trained(run_dir) and (run_dir / "evaluation.json").is_file()


def make_plan(preset: Preset, scales: Sequence[Scale], modes: list[str], compute_matched: bool) -> Plan:
    cells = grid(preset.loops, modes, compute_matched)
    runs = [Run(cell, scale, seed) for scale in scales for seed in range(preset.seeds) for cell in cells]
    return Plan(cells, sweep_runs(cells, scales[0], preset), runs)


def estimate_times(plan: Plan, preset: Preset, corpus: Path, overrides: list[str],
                   pending: Sequence[int]) -> list[Timing]:
    """Per job (zero for those not pending): its training time (a step of each distinct model timed now, times its
    steps), plus for a compared model its evaluation (`EVALUATION_SHARE` of its training)."""
    data = Corpus(corpus)
    jobs = plan.sweep + plan.runs
    timed: dict[tuple[str, str], Timing] = {}
    for i in pending:
        key = (jobs[i].scale.name, jobs[i].cell.name)
        if key not in timed:
            timed[key] = training_time(recipe_for(jobs[i], preset, corpus, overrides), data)
    share = [0.0] * len(plan.sweep) + [EVALUATION_SHARE] * len(plan.runs)
    waiting = set(pending)
    return [timed[r.scale.name, r.cell.name] * (1 + share[i]) if i in waiting else Timing(0.0, 0.0)
            for i, r in enumerate(jobs)]
