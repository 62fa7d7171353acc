"""`parloop study`: train, evaluate and report the loop-count study from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from parloop.config import LOOP_MODES
from parloop.study.analysis import offset_costs, rows_by_mode
from parloop.study.corpus import prepare_data
from parloop.study.grid import PRESETS, STUDY_MODES, Preset, grid
from parloop.study.report import markdown_tables, write_report
from parloop.study.run import run_cell
from parloop.train.errors import USER_ERRORS, exit_code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default, quick = PRESETS["default"], PRESETS["quick"]
    unset = argparse.SUPPRESS  # options whose default comes from the preset (--quick or not)
    parser.description = (
        "Train matched PLT models for each loop count and loop mode (same layers, width, data order, token "
        "budget and seed), evaluate them on held-out data, measure each loop, and write report.md, results.json "
        "and PNG plots to --out. Resumable: run the same command again to continue.")
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="study directory")
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="loop counts R to train")
    parser.add_argument("--modes", nargs="+", default=list(STUDY_MODES), choices=LOOP_MODES,
                        help="loop modes to train (sequential_shared is parallel without the cross-loop offset)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny preset (30 stdlib files, one-layer model, a few steps): the whole grid in under "
                        "a minute on 2 CPU cores; for tests and smoke checks, not for conclusions")
    parser.add_argument("--budget", type=int, default=unset,
                        help=f"training tokens per model (default {default.budget:,}; --quick {quick.budget:,})")
    parser.add_argument("--data", default=unset,
                        help="train on this existing `parloop data build` corpus instead of building one from the "
                        "standard library (the study adds its generated programs to the train split of a copy)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a field of the training recipe for every model, e.g. --set "
                        "model.num_hidden_layers=4 --set train.lr=1e-3 (repeatable)")
    parser.add_argument("--eval-bytes", type=int, default=unset,
                        help=f"held-out bytes per split for bits per byte and line completion (default "
                        f"{default.eval_bytes:,}; --quick {quick.eval_bytes:,})")
    parser.add_argument("--programs", type=int, default=unset,
                        help=f"held-out code-reasoning programs (default {default.programs}; --quick "
                        f"{quick.programs})")
    parser.add_argument("--lines", type=int, default=unset,
                        help=f"held-out lines for line completion (default {default.lines}; --quick {quick.lines})")
    parser.add_argument("--humaneval", type=int, default=unset,
                        help=f"HumanEval problems, in task order (default all 164; --quick {quick.humaneval})")
    parser.add_argument("--threads", type=int, default=unset,
                        help="torch CPU threads for training and evaluation (default torch's choice; --quick 1, "
                        "which is faster for tiny models and on a busy machine)")
    parser.add_argument("--device", default="auto", help="device for evaluation: auto, cpu or cuda (training uses "
                        "the recipe's train.device)")


def _preset(args: argparse.Namespace) -> Preset:
    """The chosen preset with the options given on the command line (absent ones keep the preset's value)."""
    preset = PRESETS["quick" if args.quick else "default"]
    chosen = {k: getattr(args, k) for k in ("budget", "eval_bytes", "programs", "lines", "humaneval", "threads")
              if hasattr(args, k)}
    return replace(preset, **chosen)


def _train_and_evaluate(args: argparse.Namespace, study: Path, preset: Preset,
                        device: str) -> tuple[Path, list[dict[str, Any]]]:
    """The training corpus and the record of every model of the grid, trained and evaluated in turn."""
    cells = grid(args.loops, args.modes)
    corpus, held_out = prepare_data(study, preset, getattr(args, "data", None))
    models = []
    for i, cell in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {cell.name}", file=sys.stderr)
        models.append(run_cell(cell, study, preset, corpus, held_out, args.overrides, device))
    return corpus, models


def run(args: argparse.Namespace) -> int:
    preset = _preset(args)
    if any(r < 1 for r in args.loops):
        print("parloop study: error: --loops must be >= 1", file=sys.stderr)
        return 2
    if preset.threads:
        torch.set_num_threads(preset.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    study: Path = args.out
    study.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        corpus, models = _train_and_evaluate(args, study, preset, device)
    except USER_ERRORS as e:
        return exit_code(e, "parloop study", "continue with the same command: finished models are kept")
    settings = {"quick": args.quick, "loops": sorted(set(args.loops)), "modes": list(args.modes),
                "overrides": list(args.overrides), "corpus": str(corpus), "preset": asdict(preset)}
    results = write_report(study, models, args.modes, settings)
    by_mode = rows_by_mode(models, args.modes)
    print(markdown_tables(by_mode, offset_costs(by_mode)))
    rec = results["recommendation"]
    print(f"recommended loop count: R = {rec['loops']}. {rec['reason']}")
    print(f"report: {study / 'report.md'}  ({time.perf_counter() - started:.0f} s)")
    return 0
