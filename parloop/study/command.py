"""`parloop study`: plan, estimate, train, evaluate and report the loop-count study from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from parloop.config import LOOP_MODES
from parloop.study.corpus import prepare_data
from parloop.study.estimate import Progress, format_duration
from parloop.study.flops import plan_compute
from parloop.study.grid import PRESETS, STUDY_MODES, Preset, pick_scales
from parloop.study.plan import Plan, estimate_times, make_plan
from parloop.study.reasoning_command import run_reasoning
from parloop.study.reasoning_grid import REASONING_PRESETS
from parloop.study.report import write_report
from parloop.study.run import recipe_for, run_model
from parloop.study.sweep import choose_learning_rates, edge_warning, sweep_dir
from parloop.train.errors import USER_ERRORS, exit_code
from parloop.train.trainer import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default, quick = PRESETS["default"], PRESETS["quick"]
    unset = None  # options whose default comes from the preset
    parser.description = (
        "Train matched PLT models for each loop count and loop mode, with non-looped baselines (same parameters; "
        "same compute), several seeds and model sizes, evaluate them on held-out data, measure each loop, and "
        "write report.md (means with 95 % intervals over seeds, a recommendation by a fixed rule), results.json "
        "and PNG plots to --out. Prints a time estimate first. Resumable: run the same command again to continue.")
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="study directory")
    parser.add_argument("--track", choices=("bpb", "reasoning"), default="bpb",
                        help="bpb: bits per byte of code models (the grid below); reasoning: depth-hungry synthetic "
                        "tasks (p-hop induction, program tracing, addition) at several difficulties, with a depth "
                        "check before any verdict (docs/study.md, 'The reasoning track')")
    parser.add_argument("--workers", type=int, default=None,
                        help="reasoning track: training processes at once (default: the preset's; 2 on a CPU)")
    parser.add_argument("--preset", choices=sorted(set(PRESETS) | set(REASONING_PRESETS)), default=unset,
                        help="default: CPU, about 2 h on 2 cores; quick: a smoke test in minutes; gpu: one H100, "
                        "about a minute: a check of the GPU path (9.6M parameters, 1.6M tokens a model, bf16; "
                        "docs/gpu.md), not a result on loops; --track reasoning also "
                        "has hard, a longer run at its hardest p-hop point")
    parser.add_argument("--quick", action="store_true", help="the same as --preset quick: for tests and smoke "
                        "checks, not for conclusions")
    parser.add_argument("--loops", type=int, nargs="+", default=unset,
                        help=f"loop counts R to train (default {' '.join(map(str, default.loops))}; --quick "
                        f"{' '.join(map(str, quick.loops))})")
    parser.add_argument("--modes", nargs="+", default=list(STUDY_MODES), choices=LOOP_MODES,
                        help="loop modes to train (sequential_shared is parallel without the cross-loop offset; "
                        "sequential is the vanilla looped transformer)")
    parser.add_argument("--seeds", type=int, default=unset,
                        help=f"seeds per model, 0..N-1: each sets the initial weights and the data order (default "
                        f"{default.seeds}; --quick {quick.seeds}); at least 2 for an interval and a verdict")
    parser.add_argument("--scales", nargs="+", default=None, metavar="SCALE",
                        help="model sizes and token budgets to train, by name (default all of the preset's: "
                        + "; ".join(f"{name}: {', '.join(s.name for s in p.scales)}" for name, p in PRESETS.items())
                        + ")")
    parser.add_argument("--no-compute-matched", dest="compute_matched", action="store_false",
                        help="leave out the compute-matched baselines (R = 1 with R x the layers)")
    parser.add_argument("--no-lr-sweep", dest="lr_sweep", action="store_false",
                        help="train every model at the recipe's learning rate instead of sweeping it per model")
    parser.add_argument("--estimate", action="store_true", help="print the plan and its time estimate, then stop")
    parser.add_argument("--data", default=unset,
                        help="train on this existing `parloop data build` corpus instead of building the preset's "
                        "(the study adds its generated programs to the train split of a copy)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a field of the training recipe for every model, e.g. --set "
                        "model.plt_normalize_per_loop=false --set train.lr=1e-3 (the sweep's centre; repeatable)")
    for name, what in (("eval_bytes", "held-out bytes per split for bits per byte and line completion"),
                       ("programs", "held-out code-reasoning programs"),
                       ("lines", "held-out lines for line completion"), ("humaneval", "HumanEval problems")):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=unset,
                            help=f"{what} (default {getattr(default, name)}; --quick {getattr(quick, name)})")
    parser.add_argument("--threads", type=int, default=unset,
                        help="torch CPU threads for training and evaluation (default 1, faster for models this "
                        "small, above all on a busy machine; --preset gpu: torch's choice)")
    parser.add_argument("--device", default="auto", help="device for evaluation: auto, cpu or cuda (training uses "
                        "the recipe's train.device)")


def _preset(args: argparse.Namespace) -> Preset:
    """The chosen preset with the options given on the command line (absent ones keep the preset's value)."""
    preset = PRESETS["quick" if args.quick else args.preset or "default"]
    chosen = {k: getattr(args, k) for k in ("eval_bytes", "programs", "lines", "humaneval", "threads", "seeds")
              if getattr(args, k) is not None}
    if args.loops is not None:
        chosen["loops"] = tuple(sorted(set(args.loops)))
    if not args.lr_sweep:
        chosen["lr_multipliers"] = (1.0,)
    return replace(preset, **chosen)


def _check(preset: Preset) -> str | None:
    if any(r < 1 for r in preset.loops):
        return "--loops must be >= 1"
    if preset.seeds < 1:
        return "--seeds must be >= 1"
    return None


def _train_sweep(plan: Plan, progress: Progress, study: Path, preset: Preset, corpus: Path,
                 overrides: list[str]) -> dict[str, Any]:
    """The learning-rate sweep's runs, then the multiplier chosen for each cell."""
    val_bpb = {}
    for i, run in enumerate(plan.sweep):
        progress.start(i)
        val_bpb[run] = train(recipe_for(run, preset, corpus, overrides), sweep_dir(study, run), resume=True)["val_bpb"]
        progress.finish(i)
    chosen = choose_learning_rates(plan.cells, preset, val_bpb)
    if warning := edge_warning(chosen):
        print(f"warning: {warning}", file=sys.stderr)
    return chosen


def _train_and_evaluate(args: argparse.Namespace, study: Path, preset: Preset, plan: Plan, corpus: Path,
                        held_out: list, device: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sweep's choices and the record of every model of the grid, trained and evaluated in turn."""
    names = [f"sweep {r.name} lr x{r.lr_multiplier:g}" for r in plan.sweep] + [r.name for r in plan.runs]
    pending = [i for i in range(len(names)) if not plan.done(study, i)]
    times = estimate_times(plan, preset, corpus, args.overrides, pending)
    progress = Progress(names, [t.wall for t in times], pending)
    print(f"plan: {len(plan.sweep)} learning-rate sweep runs and {len(plan.runs)} models ({len(plan.cells)} per "
          f"scale and seed), {len(names) - len(pending)} already done. Estimated time: about "
          f"{format_duration(sum(t.wall for t in times))} on this machine as loaded now, about "
          f"{format_duration(sum(t.quiet for t in times))} with nothing else running (a training step of each model "
          f"timed now; evaluations estimated)", file=sys.stderr)
    print(f"training compute: {plan_compute(plan, preset, corpus, args.overrides).describe()}", file=sys.stderr)
    if args.estimate:
        return {}, []
    sweep = _train_sweep(plan, progress, study, preset, corpus, args.overrides)
    models = []
    for i, run in enumerate(plan.with_learning_rates(sweep), len(plan.sweep)):
        progress.start(i)
        models.append(run_model(run, study, preset, corpus, held_out, args.overrides, device))
        progress.finish(i)
    return sweep, models


def run(args: argparse.Namespace) -> int:
    if args.track == "reasoning":
        return run_reasoning(args)
    if args.preset is not None and args.preset not in PRESETS:
        print(f"parloop study: error: --preset {args.preset} belongs to --track reasoning", file=sys.stderr)
        return 2
    preset = _preset(args)
    problem = _check(preset)
    try:
        scales = pick_scales(preset, args.scales)
    except ValueError as e:
        problem = str(e)
    if problem:
        print(f"parloop study: error: {problem}", file=sys.stderr)
        return 2
    if preset.threads:
        torch.set_num_threads(preset.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    study: Path = args.out
    study.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        corpus, held_out = prepare_data(study, preset, args.data)
        plan = make_plan(preset, scales, list(args.modes), args.compute_matched)
        sweep, models = _train_and_evaluate(args, study, preset, plan, corpus, held_out, device)
    except USER_ERRORS as e:
        return exit_code(e, "parloop study", "continue with the same command: finished models are kept")
    if args.estimate:
        return 0
    settings = {"preset": asdict(preset), "scales": [s.name for s in scales], "modes": list(args.modes),
                "compute_matched": args.compute_matched, "overrides": list(args.overrides), "corpus": str(corpus)}
    results = write_report(study, models, args.modes, sweep, settings)
    rec = results["recommendation"]
    verdict = f"R = {rec['loops']}" if rec["loops"] else "no verdict"
    print(f"recommended loop count: {verdict}. {rec['reason']}")
    print(f"report: {study / 'report.md'}  ({format_duration(time.perf_counter() - started)})")
    return 0
