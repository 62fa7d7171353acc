"""`parloop study --track reasoning`: the reasoning track from the command line (docs/study.md, "The reasoning
track"). The options it reads: --out, --preset/--quick, --seeds, --loops, --threads, --workers, --no-lr-sweep,
--device;
the bits-per-byte track's other options are refused."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from parloop.study.estimate import format_duration
from parloop.study.grid import STUDY_MODES
from parloop.study.reasoning_grid import REASONING_PRESETS, ReasoningPreset
from parloop.study.reasoning_track import run_track, scaled


def reasoning_preset(args: argparse.Namespace) -> ReasoningPreset:
    """The chosen preset with the command line's changes."""
    preset = REASONING_PRESETS["quick" if args.quick else (args.preset or "default")]
    loops = tuple(sorted({r for r in args.loops if r > 1})) if args.loops else None
    return scaled(preset, seeds=args.seeds, loops=loops, threads=args.threads,
                  workers=args.workers, lr_multipliers=None if args.lr_sweep else (1.0,),
                  device=None if args.device == "auto" else args.device)


# options of the bits-per-byte track that the reasoning track has no use for: refused, never silently ignored
BPB_ONLY = {"estimate": "--estimate", "scales": "--scales", "data": "--data", "overrides": "--set",
            "eval_bytes": "--eval-bytes", "programs": "--programs", "lines": "--lines", "humaneval": "--humaneval"}


def unsupported(args: argparse.Namespace) -> list[str]:
    """The bits-per-byte-only options given on this command line."""
    given = [flag for key, flag in BPB_ONLY.items() if getattr(args, key) not in (None, False, [])]
    if not args.compute_matched:
        given.append("--no-compute-matched")
    if sorted(args.modes) != sorted(STUDY_MODES):
        given.append("--modes")
    return given


def _problem(preset: ReasoningPreset) -> str | None:
    if preset.seeds < 1:
        return "--seeds must be >= 1"
    if not preset.loops or 2 not in preset.loops:
        return "--loops must include 2 for the reasoning track (R = 2 is trained at every point)"
    if preset.workers < 1:
        return "--workers must be >= 1"
    return None


def run_reasoning(args: argparse.Namespace) -> int:
    if given := unsupported(args):
        print(f"parloop study --track reasoning: error: {', '.join(given)} belong(s) to the bits-per-byte track; the "
              "reasoning track's grid and sizes come from its preset (docs/study.md, 'The reasoning track')",
              file=sys.stderr)
        return 2
    preset = reasoning_preset(args)
    if problem := _problem(preset):
        print(f"parloop study --track reasoning: error: {problem}", file=sys.stderr)
        return 2
    if preset.device == "cuda" and not torch.cuda.is_available():
        print("parloop study --track reasoning: error: this preset trains on a GPU and none is visible; use the "
              "default preset on a CPU", file=sys.stderr)
        return 2
    if preset.threads:
        torch.set_num_threads(preset.threads)
    study: Path = args.out
    study.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run_track(preset, study, {"preset": asdict(preset)})
    v = results["verdict"]
    print(f"reasoning track: depth-hungry points: {', '.join(results['hungry']) or 'none'}; recommended loop "
          f"count: {'R = ' + str(v) if v else 'no verdict (no point needs depth)'}")
    print(f"report: {study / 'report.md'}  ({format_duration(time.perf_counter() - started)})")
    return 0
