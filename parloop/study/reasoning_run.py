"""Running the reasoning track's jobs: one job trains one model (`parloop.reasoning.train`) and evaluates it on the
held-out validation (sweep) or test (compared models) set, writing one JSON record. Jobs run in worker processes
(`workers` at once, each with `threads` torch threads), longest first; a job whose record exists with the same
settings is not run again, so an interrupted track resumes where it stopped (an unfinished model restarts)."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from parloop.reasoning.evaluate import evaluate
from parloop.reasoning.tasks import held_out_set, make_task
from parloop.reasoning.train import ReasoningRun, train_model
from parloop.study.reasoning_grid import Point, ReasoningCell, ReasoningPreset


@dataclass(frozen=True)
class Job:
    """A model to train at a point: a compared model (`part` "test", a seed of the grid) or a sweep run ("val",
    the sweep seed)."""

    point: Point
    cell: ReasoningCell
    seed: int
    lr_multiplier: float
    part: str = "test"

    def path(self, study: Path) -> Path:
        if self.part == "val":
            return study / "sweep" / self.point.name / self.cell.name / f"lr-x{self.lr_multiplier:g}.json"
        return study / "models" / self.point.name / self.cell.name / f"seed{self.seed}.json"

    def cost(self) -> int:
        """Layer passes per token: what a training step costs, relative to R = 1 with one layer."""
        return self.point.layers * self.cell.depth * self.cell.loops


def run_spec(job: Job, preset: ReasoningPreset) -> ReasoningRun:
    options = next(t.options for t in preset.tasks if t.name == job.point.task)
    return ReasoningRun(task=job.point.task, difficulty=job.point.difficulty,
                        layers=job.point.layers * job.cell.depth, loops=job.cell.loops, mode=job.cell.mode,
                        seed=job.seed, lr=preset.lr * job.lr_multiplier, steps=preset.steps,
                        batch_size=preset.batch_size, filler=job.cell.filler, curriculum=preset.curriculum,
                        model={**preset.model, **preset.variants.get(job.cell.variant, {})},
                        task_options=dict(options))


def _settings(job: Job, preset: ReasoningPreset) -> dict[str, Any]:
    return {"run": run_spec(job, preset).to_dict(), "held_out": preset.held_out, "part": job.part}


def saved(job: Job, preset: ReasoningPreset, study: Path) -> dict[str, Any] | None:
    """The job's record when it was made with the same settings."""
    path = job.path(study)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("settings") == _settings(job, preset) else None


def execute(job: Job, preset: ReasoningPreset, study: Path) -> dict[str, Any]:
    """Train and evaluate one job, write its record (whole or not at all) and return it."""
    if preset.threads:
        torch.set_num_threads(preset.threads)
    spec = run_spec(job, preset)
    task = make_task(spec.task, **spec.task_options)
    model, figures = train_model(spec, task, preset.device)
    evaluation = evaluate(model, held_out_set(task, preset.held_out, spec.difficulty, spec.filler, job.part))
    record = {"task": spec.task, "difficulty": spec.difficulty, "layers": job.point.layers, "point": job.point.name,
              "name": job.cell.name, "loops": spec.loops, "mode": spec.mode, "depth": job.cell.depth,
              "filler": spec.filler, "seed": job.seed, "lr": spec.lr, "lr_multiplier": job.lr_multiplier,
              "part": job.part, "training": figures, "evaluation": evaluation, "settings": _settings(job, preset)}
    path = job.path(study)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return record


def run_jobs(jobs: Sequence[Job], preset: ReasoningPreset, study: Path, desc: str) -> list[dict[str, Any]]:
    """Every job's record, running those not done yet (`preset.workers` processes; in this process for one)."""
    records = {job: saved(job, preset, study) for job in jobs}
    todo = sorted((j for j, r in records.items() if r is None), key=Job.cost, reverse=True)
    print(f"{desc}: {len(jobs)} models, {len(jobs) - len(todo)} already done", file=sys.stderr)
    bar = tqdm(total=sum(j.cost() for j in todo), desc=desc, unit="layer-pass", file=sys.stderr, dynamic_ncols=True)
    if preset.workers <= 1:
        for job in todo:
            records[job] = execute(job, preset, study)
            bar.update(job.cost())
    else:
        with ProcessPoolExecutor(preset.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(execute, job, preset, study): job for job in todo}
            for future in as_completed(futures):
                records[futures[future]] = future.result()
                bar.update(futures[future].cost())
    bar.close()
    return [records[job] for job in jobs]
