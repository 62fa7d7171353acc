"""The up-front time estimate of a study, and the running estimate of what is left while it trains."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from parloop.train.corpus import Corpus
from parloop.train.distributed import World
from parloop.train.recipe import Recipe
from parloop.train.trainer import Trainer

# What an evaluation costs, as a share of the model's training time: about 40 s against 110 s for the default
# preset's R = 1 model at scale s (2 CPU cores shared with other work). The running estimate corrects it with the
# study's own timings as jobs finish.
EVALUATION_SHARE = 0.35


@dataclass(frozen=True)
class Timing:
    """Seconds of a job: `wall` on this machine as loaded now; `quiet` on the same machine with nothing else running
    (on a CPU: the process's CPU time per thread, which other processes do not inflate much; on a GPU: wall)."""

    wall: float
    quiet: float

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.quiet + other.quiet)

    def __mul__(self, factor: float) -> Timing:
        return Timing(self.wall * factor, self.quiet * factor)


def training_time(recipe: Recipe, corpus: Corpus, timed_steps: int = 2) -> Timing:
    """The time to train `recipe`: its step count times the time of a training step of the real model, timed
    after one warm-up step (the fastest of `timed_steps`, since a shared machine only ever slows a step down).
    An upper bound for a compiled recipe, which is timed eager."""
    # eager: compiling every model only to time it would take longer than most of the runs it estimates
    trainer = Trainer(replace(recipe, train=replace(recipe.train, compile=False)), corpus, World())
    trainer.train_step()
    wall, cpu = [], []
    for _ in range(timed_steps):
        started, started_cpu = time.perf_counter(), time.process_time()
        trainer.train_step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - started)
        cpu.append((time.process_time() - started_cpu) / torch.get_num_threads())
    quiet = min(wall) if trainer.device.type == "cuda" else min(min(cpu), min(wall))
    return Timing(min(wall), quiet) * recipe.train.max_steps


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
