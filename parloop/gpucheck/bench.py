"""The GPU check's decode bench: `parloop bench`'s measurements (`parloop.bench.runner.Measurer`) point by point,
in priority order, within a time share, the result file rewritten after every point.

A point is one model at one batch size: PLT in a loop mode at a loop count R, or `transformers`' Llama with the
R = 1 weights (static cache, compiled forward). On a GPU every point compiles its decode step once (CUDA graphs),
which costs far more than the timing itself, so the points that decide the acceptance figures come first
(parallel R = 1, the reference, R = 2, R = 4 at batch 1 for each preset, then batch 16), then R = 3 and the
sequential modes. A point whose predicted time no longer fits the share is skipped and listed as such.

Run as `python -m parloop.gpucheck.bench --out FILE --share SECONDS [--dry-run]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from parloop.bench.bandwidth import measure_memory_bandwidth
from parloop.bench.models import build_plt, plt_config
from parloop.bench.options import BenchOptions, check_options
from parloop.bench.runner import Measurer
from parloop.bench.timing import significant
from parloop.model import PLTForCausalLM

REFERENCE = "reference"  # a point's mode for the transformers Llama


@dataclass(frozen=True)
class Settings:
    """What the bench part measures: presets largest first (the bandwidth figure is the largest's)."""

    presets: tuple[str, ...] = ("1b", "100m")
    batches: tuple[int, ...] = (1, 16)
    dtype: str = "bfloat16"
    device: str = "cuda"
    context: int = 512
    warmup: int = 10
    new_tokens: int = 64
    bandwidth_mb: int = 1024
    compile: bool | None = None  # None: on for CUDA (the bench's default)
    # seconds per R = 1 point on an H100 (model build, compile, timing) before any point is measured; docs/gpu.md
    point_seconds: dict[str, float] = field(default_factory=lambda: {"1b": 25.0, "100m": 15.0, "tiny": 1.0})
    first_point_seconds: float = 12.0  # the first compile in a process also starts Inductor's workers


GPU = Settings()
DRY_RUN = Settings(presets=("tiny",), batches=(1, 2), device="cpu", context=24, warmup=1, new_tokens=6,
                   bandwidth_mb=8, compile=False)


@dataclass(frozen=True)
class Point:
    preset: str
    batch: int
    mode: str  # a loop mode, or REFERENCE
    loops: int

    def cost_factor(self) -> float:
        """Compile work relative to R = 1 (tracing measured on a CPU, docs/gpu.md): parallel R >= 2 passes the
        layers once with the gates and windows added (1.3x at R = 2 and at R = 4), the sequential modes compile
        one graph per loop index (R x)."""
        if self.mode.startswith("sequential"):
            return float(self.loops)
        return 1.0 if self.loops == 1 or self.mode == REFERENCE else 1.3


ACCEPTANCE_POINTS = ((1, "parallel"), (0, REFERENCE), (2, "parallel"), (4, "parallel"))
OTHER_POINTS = ((3, "parallel"), (2, "sequential_shared"), (2, "sequential"), (4, "sequential_shared"),
                (4, "sequential"))


def points(settings: Settings) -> list[Point]:
    """Every point in measuring order: the acceptance points per batch and preset, then the others."""
    order = []
    for group in (ACCEPTANCE_POINTS, OTHER_POINTS):
        order += [Point(p, b, mode, max(r, 1)) for b in settings.batches for p in settings.presets
                  for r, mode in group]
    return order


class Models:
    """The models of each preset, built once: R = 1 from the seed, every other one with its weights."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.measurers: dict[tuple[str, int], Measurer] = {}
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        self.models: dict[tuple[str, str, int], PLTForCausalLM] = {}
        self.bandwidth_gbs = 0.0

    def options(self, preset: str, batch: int) -> BenchOptions:
        s = self.settings
        return BenchOptions(preset=preset, batch=batch, context=s.context, warmup=s.warmup, new_tokens=s.new_tokens,
                            dtype=s.dtype, device=s.device, bandwidth_mb=s.bandwidth_mb, compile=s.compile)

    def measurer(self, preset: str, batch: int) -> Measurer:
        if (preset, batch) not in self.measurers:
            options = self.options(preset, batch)
            self.measurers[preset, batch] = Measurer(options, check_options(options), self.bandwidth_gbs)
        return self.measurers[preset, batch]

    def model(self, preset: str, mode: str, loops: int) -> PLTForCausalLM:
        key = (preset, "parallel", 1) if loops == 1 else (preset, mode, loops)
        if key not in self.models:
            options = self.options(preset, 1)
            max_length = options.context + options.warmup + options.new_tokens
            config = plt_config(options.model_shape(), loops, key[1], options.window, max_length)
            with torch.device(options.device):  # initialized where it runs: a 1B model's CPU init takes seconds
                model = build_plt(config, self.states.get(preset), options.seed)
            if loops == 1:
                self.states[preset] = model.state_dict()  # in float32: what every other model loads
            self.models[key] = self.measurer(preset, 1).place(model)
        return self.models[key]

    def measure(self, point: Point) -> dict[str, Any]:
        measurer = self.measurer(point.preset, point.batch)
        base = self.model(point.preset, "parallel", 1)
        if point.mode == REFERENCE:
            return measurer.reference(base, self.states[point.preset], generate=False)
        return measurer.row(self.model(point.preset, point.mode, point.loops), point.batch, self.settings.context)


class Budget:
    """The share's clock: a point is started only when its predicted time fits what is left. Predictions are the
    settings' per-point seconds, scaled by how the points measured so far compared with theirs."""

    def __init__(self, settings: Settings, share_s: float) -> None:
        self.settings, self.share_s, self.started = settings, share_s, time.perf_counter()
        self.estimated = self.measured = 0.0

    def estimate(self, point: Point) -> float:
        first = 0.0 if self.measured else self.settings.first_point_seconds
        return first + self.settings.point_seconds.get(point.preset, 10.0) * point.cost_factor()

    def predict(self, point: Point) -> float:
        ratio = self.measured / self.estimated if self.estimated else 1.0
        return self.estimate(point) * ratio

    def left(self) -> float:
        return self.share_s - (time.perf_counter() - self.started)

    def record(self, point: Point, seconds: float) -> None:
        self.estimated += self.estimate(point)
        self.measured += seconds


def _write(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


@dataclass
class Outcome:
    """What became of one point: its row, or the reason it has none (skipped for time, or the error it raised)."""

    point: Point
    seconds: float  # measured, or predicted for a skipped point
    row: dict[str, Any] | None = None
    error: str | None = None


def measure_points(settings: Settings, share_s: float, models: Models) -> Iterator[Outcome]:
    """Every point in order, measured or skipped. A point that fails is reported and the next one measured: one
    mode that does not compile must not cost the figures of the others."""
    budget = Budget(settings, share_s)
    for point in points(settings):
        predicted = budget.predict(point)
        if predicted > budget.left():
            yield Outcome(point, predicted)
            continue
        started = time.perf_counter()
        try:
            outcome = Outcome(point, 0.0, row=models.measure(point))
        except Exception as err:  # reported in the result, with the traceback in the log
            traceback.print_exc()
            outcome = Outcome(point, 0.0, error=f"{type(err).__name__}: {err}"[:500])
        outcome.seconds = time.perf_counter() - started
        budget.record(point, outcome.seconds)
        yield outcome


def _file(result: dict[str, Any], outcome: Outcome) -> str:
    """Put `outcome` where it belongs in `result`; returns its log line."""
    p = outcome.point
    entry = dict(preset=p.preset, batch=p.batch, mode=p.mode, loops=p.loops)
    what = f"{p.preset} batch {p.batch} {p.mode} R={p.loops}: "
    if outcome.error is not None:
        result["errors"].append({**entry, "error": outcome.error, "seconds": round(outcome.seconds, 1)})
        return what + f"FAILED after {outcome.seconds:.1f} s: {outcome.error}"
    if outcome.row is None:
        result["skipped"].append({**entry, "predicted_s": round(outcome.seconds, 1)})
        return what + f"skipped, predicted {outcome.seconds:.1f} s"
    target = result["references"] if p.mode == REFERENCE else result["rows"]
    target.append({**entry, **outcome.row, "seconds": round(outcome.seconds, 1)})
    return what + f"{outcome.seconds:.1f} s"


def run_bench_part(settings: Settings, share_s: float, out: Path) -> dict[str, Any]:
    """Measure the points that fit `share_s` seconds; `out` holds the result after every point."""
    started = time.perf_counter()
    models = Models(settings)
    device = check_options(models.options(settings.presets[-1], 1))
    models.bandwidth_gbs = measure_memory_bandwidth(device, settings.bandwidth_mb)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict[str, Any] = dict(
        settings={k: v for k, v in asdict(settings).items() if k != "point_seconds"}, share_s=share_s,
        machine=dict(device=str(device), device_name=name, torch_version=torch.__version__,
                     copy_bandwidth_gbs=significant(models.bandwidth_gbs)),
        rows=[], references=[], skipped=[], errors=[])
    _write(out, result)
    for outcome in measure_points(settings, share_s, models):
        print(_file(result, outcome), flush=True)
        result["seconds"] = round(time.perf_counter() - started, 1)
        _write(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parloop.gpucheck.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="result JSON, rewritten after every point")
    parser.add_argument("--share", type=float, default=140.0, help="seconds this part may take")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help=f"batch sizes to measure (default {' '.join(map(str, GPU.batches))}; a second call can "
                        "measure those the first had no time for)")
    parser.add_argument("--presets", nargs="+", choices=GPU.presets, default=None,
                        help=f"presets to measure (default {' '.join(GPU.presets)})")
    parser.add_argument("--dry-run", action="store_true", help="the tiny preset on the CPU, eager")
    args = parser.parse_args(argv)
    settings = DRY_RUN if args.dry_run else GPU
    if args.batches:
        settings = replace(settings, batches=tuple(args.batches))
    if args.presets and not args.dry_run:
        settings = replace(settings, presets=tuple(p for p in GPU.presets if p in args.presets))
    result = run_bench_part(settings, args.share, args.out)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
