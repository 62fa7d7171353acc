"""The reasoning tasks by name, and the two ways to draw from one: training batches (never a held-out instance)
and the held-out set (only held-out instances), both deterministic by seed."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from parloop.reasoning.addition import Addition
from parloop.reasoning.batch import Batch
from parloop.reasoning.phop import PHop
from parloop.reasoning.split import held_out_part, is_held_out
from parloop.reasoning.tracing import Tracing


class Task(Protocol):
    name: str
    knob: str  # what the difficulty counts
    vocab_size: int
    chance: float  # the accuracy of a uniform guess at one answer token

    def seq_len(self, difficulty: int, filler: int) -> int: ...
    def sample(self, rng: np.random.Generator, n: int, difficulty: int) -> Batch: ...
    def with_filler(self, batch: Batch, filler: int) -> Batch: ...


TASKS = {"phop": PHop, "tracing": Tracing, "addition": Addition}
HELD_OUT_SEED = 2**31 - 1  # the held-out set's stream; training streams are keyed by (seed, step)


def make_task(name: str, **options: Any) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown reasoning task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name](**options)


def _draw(task: Task, rng: np.random.Generator, n: int, difficulty: int, part: str) -> Batch:
    """n instances from `part` ("train", "val" or "test"): rows from elsewhere are dropped and more drawn."""
    parts, have = [], 0
    while have < n:
        batch = task.sample(rng, max(n - have, 8) * 2, difficulty)
        keep = ~is_held_out(batch.inputs) if part == "train" else held_out_part(batch.inputs, part)
        batch = batch.rows(keep)
        parts.append(batch)
        have += len(batch)
    return Batch.concat(parts).rows(np.arange(n))


def training_batch(task: Task, seed: int, step: int, n: int, difficulty: int, filler: int = 0) -> Batch:
    """Step `step`'s batch for a model trained with `seed`: every model with that seed sees the same batches."""
    rng = np.random.default_rng([seed, step])
    return task.with_filler(_draw(task, rng, n, difficulty, "train"), filler)


def held_out_set(task: Task, instances: int, difficulty: int, filler: int = 0, part: str = "test") -> Batch:
    """At least `instances` held-out instances (rows, or labelled positions for per-position tasks) of `part`
    ("test", or "val" for choosing learning rates); the same for every model and seed."""
    rng = np.random.default_rng([HELD_OUT_SEED, difficulty, part == "val"])
    parts, have = [], 0
    while have < instances:
        batch = _draw(task, rng, 64, difficulty, part)
        parts.append(batch)
        have += batch.instances()
    return task.with_filler(Batch.concat(parts), filler)
