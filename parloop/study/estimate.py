"""The up-front time estimate of a study, and the running estimate of what is left while it trains."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from parloop.train.corpus import Corpus
from parloop.train.distributed import World
from parloop.train.recipe import Recipe
from parloop.train.trainer import Trainer

# What an evaluation costs, as a share of the model's training time: measured on the default CPU preset (the
# held-out bits per byte, the generation tasks and the per-loop diagnostics of one model against its training),
# and used until the study has timed evaluations of its own.
EVALUATION_SHARE = 0.25


def training_seconds(recipe: Recipe, corpus: Corpus, timed_steps: int = 2) -> float:
    """Seconds to train `recipe`: its step count times the time of a training step of the real model, timed
    after one warm-up step (the fastest of `timed_steps`, since a shared machine only ever slows a step down).
    An upper bound for a compiled recipe, which is timed eager."""
    # eager: compiling every model only to time it would take longer than most of the runs it estimates
    trainer = Trainer(replace(recipe, train=replace(recipe.train, compile=False)), corpus, World())
    trainer.train_step()
    times = []
    for _ in range(timed_steps):
        started = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - started)
    return min(times) * recipe.train.max_steps


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Jobs of known estimated cost done one after another: after each, what is done and what is left, the
    estimate of the rest scaled by how the finished jobs compared with their estimates."""

    def __init__(self, names: Sequence[str], estimates: Sequence[float], pending: Sequence[int]) -> None:
        self.names, self.estimates, self.pending = list(names), list(estimates), list(pending)
        self.spent = self.estimated_done = 0.0
        self.started = time.perf_counter()

    def remaining(self) -> float:
        ratio = self.spent / self.estimated_done if self.estimated_done else 1.0
        return ratio * sum(self.estimates[i] for i in self.pending)

    def start(self, index: int) -> None:
        print(f"[{index + 1}/{len(self.names)}] {self.names[index]}", file=sys.stderr)
        self.job_started = time.perf_counter()

    def finish(self, index: int) -> None:
        if index in self.pending:
            self.pending.remove(index)
            self.spent += time.perf_counter() - self.job_started
            self.estimated_done += self.estimates[index]
        print(f"    elapsed {format_duration(time.perf_counter() - self.started)}, about "
              f"{format_duration(self.remaining())} left", file=sys.stderr)


def is_trained(run_dir: Path) -> bool:
    """A finished training run (the trainer wrote its final metrics)."""
    return (run_dir / "final_metrics.json").is_file()
