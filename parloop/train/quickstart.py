"""`parloop quickstart`: the whole project in under ten minutes on an idle 2-core machine, with nothing downloaded.

1. builds a code corpus from the Python standard library's own sources (`parloop data build`);
2. times the first steps of each model and prints an estimate of the training time, then trains a matched R = 1
   model and a PLT model with R = 2 loops (same recipe, same tokens and seed; only `plt_num_loops` differs),
   once per seed (`--seeds`, default 1);
3. prints their bits per byte next to a bigram baseline counted from the same tokens, what the R = 2 - R = 1
   difference can and cannot show, what the numbers mean at this scale, and writes `curves.png` (every model on
   the same axes);
4. samples a continuation of a code prompt from each seed-0 model;
5. ends with the `parloop bench` table (decode latency and KV-cache bytes per loop mode and loop count).

Everything goes under one run directory: `data/`, one directory per model (`r1/`, `r2/`; `r1-seed1/`, ... for
more seeds), `results.json` (every number printed) and `curves.png`. Running the command again reuses what is
done (the corpus, finished trainings) and continues an interrupted training from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from parloop.bench import BenchOptions, format_table, run_bench
from parloop.inference.loading import load_model
from parloop.threads import idle_cores
from parloop.train.baseline import bigram_bpb
from parloop.train.checkpointer import FINAL_METRICS
from parloop.train.corpus import Corpus, build_corpus, summary_table
from parloop.train.distributed import World
from parloop.train.errors import USER_ERRORS, exit_code
from parloop.train.metrics import METRICS_FILE, format_metrics, plot_runs
from parloop.train.quickreasoning import ReasoningSize, compare
from parloop.train.quickreport import (
    comparison_lines,
    model_label,
    paired_differences,
    results_table,
    scale_lines,
    timing_lines,
)
from parloop.train.recipe import Recipe, load_recipe
from parloop.train.trainer import Trainer, train

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_PROMPT = "def fibonacci(n):\n"
LOOP_COUNTS = (1, 2)
RESULTS_FILE = "results.json"
FIGURE_FILE = "curves.png"


class Steps:
    """Numbered section headers "k/N  title" that always match the number of sections this run prints."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def header(self, text: str) -> None:
        self.done += 1
        print(f"\n== {self.done}/{self.total}  {text}", flush=True)


def model_dir_name(loops: int, seed_index: int, seed: int) -> str:
    return f"r{loops}" if seed_index == 0 else f"r{loops}-seed{seed}"


def plan(args: argparse.Namespace, data_dir: Path) -> list[tuple[Recipe, Path]]:
    """(recipe, run directory) of every model, R = 1 before R = 2 for each seed."""
    base = load_recipe(args.recipe, [*args.overrides, f"data.dir={data_dir}"])
    runs = []
    for i in range(args.seeds):
        seed = base.train.seed + i
        for loops in LOOP_COUNTS:
            name = model_dir_name(loops, i, seed)
            recipe = load_recipe(args.recipe, [*args.overrides, f"data.dir={data_dir}",
                                               f"model.plt_num_loops={loops}", f"train.seed={seed}",
                                               f"name=quickstart-{name}"])
            runs.append((recipe, args.run_dir / name))
    return runs


def time_first_steps(recipe: Recipe, steps: int = 2) -> tuple[float, float]:
    """Wall seconds per training step and per evaluation of `recipe`'s model on this machine now, from a throwaway
    model: one step to warm up, then `steps` timed steps and one timed evaluation."""
    trainer = Trainer(recipe, Corpus(recipe.data.dir), World.from_env())
    trainer.train_step()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    per_step = (time.perf_counter() - started) / steps
    started = time.perf_counter()
    trainer.evaluate("val")
    return per_step, time.perf_counter() - started


def estimate_training(runs: list[tuple[Recipe, Path]]) -> float:
    """Print and return the training time (s) of the runs not finished yet, from the first steps of each loop
    count timed on this machine now."""
    todo = [(r, d) for r, d in runs if not (d / FINAL_METRICS).is_file()]
    if not todo:
        print("every model is already trained; reusing them")
        return 0.0
    timed = {}
    for recipe, _ in todo:
        loops = recipe.model["plt_num_loops"]
        if loops not in timed:
            timed[loops] = time_first_steps(recipe)
    total = 0.0
    for recipe, _ in todo:
        t = recipe.train
        per_step, per_eval = timed[recipe.model["plt_num_loops"]]
        total += t.max_steps * per_step + (-(-t.max_steps // t.eval_interval) + 1) * per_eval
    rates = ", ".join(f"R = {r}: {s:.2f} s/step" for r, (s, _) in sorted(timed.items()))
    print(f"timed the first steps of each model just now ({rates}, wall-clock on this machine with "
          f"{torch.get_num_threads()} CPU thread(s))\n"
          f"estimated training time for {len(todo)} model(s): {total / 60:.1f} min "
          f"(more if other programs start using the CPU)", flush=True)
    return total


def train_all(runs: list[tuple[Recipe, Path]]) -> list[dict[str, Any]]:
    """Train every run (resuming or reusing what is done) and return their metrics with label and seed."""
    models = []
    for k, (recipe, run_dir) in enumerate(runs, 1):
        loops, seed = recipe.model["plt_num_loops"], recipe.train.seed
        t = recipe.train
        print(f"\nmodel {k}/{len(runs)}: {model_label(loops, seed)} ({t.max_steps} steps of {t.batch_size} x "
              f"{t.seq_len} tokens) -> {run_dir}", flush=True)
        metrics = train(recipe, run_dir, resume=True)
        print(format_metrics(metrics), flush=True)
        models.append({**metrics, "label": model_label(loops, seed), "seed": seed})
    return models


def complete(model_dir: str | Path, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    """A sampled continuation of `prompt` (temperature 0.8, top-p 0.95, fixed seed) by the model in `model_dir`."""
    model, tokenizer = load_model(Path(model_dir), device="cpu")
    # Every document in the training stream follows an end-of-text token, so a prompt that starts with it
    # reads as the start of a file.
    ids = [tokenizer.bos_token_id] + tokenizer(prompt)["input_ids"]
    torch.manual_seed(seed)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8,
                         top_p=0.95, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def reasoning_step(args: argparse.Namespace, steps: Steps) -> dict[str, Any]:
    """Where loops pay off: R = 1 against parallel R = 2 on a task that needs depth, with its interval."""
    size = ReasoningSize(steps=args.reasoning_steps, seeds=args.reasoning_seeds, held_out=args.reasoning_held_out)
    steps.header(f"reasoning: R = 1 and parallel R = 2 on 1-hop induction with one layer, a task that needs a "
                 f"second layer's depth ({size.seeds} seeds each, {size.steps} steps; accuracy on held-out sequences)")
    result = compare(args.run_dir / "reasoning", size, workers=max(1, torch.get_num_threads()))
    print("\n".join(result.pop("lines")))
    return result


def bench_table(args: argparse.Namespace) -> str:
    options = BenchOptions(preset=args.bench_preset, loops=(1, 2), context=args.bench_context,
                           new_tokens=args.bench_new_tokens)
    return format_table(run_bench(options))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=Path("runs/quickstart"),
                        help="everything goes here; rerunning with the same directory reuses finished work")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="training recipe of every model")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE",
                        help="override a recipe field for every model, e.g. --set train.max_steps=50 (repeatable)")
    parser.add_argument("--seeds", type=int, default=1, choices=range(1, 11), metavar="N",
                        help="train R = 1 and R = 2 with N seeds each (1 to 10; each seed adds the training time "
                        "of one pair) to measure the seed-to-seed spread on this run")
    parser.add_argument("--source", default="stdlib",
                        help="corpus source: 'stdlib' (the Python standard library), a directory, a glob or a "
                        ".jsonl file, as for `parloop data build`")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE vocabulary of the corpus")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="code prompt to complete")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="length of each completion")
    parser.add_argument("--bench-preset", default="100m", help="model shape of the closing `parloop bench` table")
    parser.add_argument("--bench-context", type=int, default=256, help="prompt tokens prefilled before decoding")
    parser.add_argument("--bench-new-tokens", type=int, default=16, help="timed decode steps per bench row")
    parser.add_argument("--no-bench", action="store_true", help="skip the closing bench table")
    parser.add_argument("--no-reasoning", action="store_true", help="skip the reasoning step (R = 1 against "
                        "parallel R = 2 on 1-hop induction: about a minute of training on 2 idle cores)")
    parser.add_argument("--reasoning-steps", type=int, default=ReasoningSize.steps,
                        help="training steps of each reasoning model")
    parser.add_argument("--reasoning-seeds", type=int, default=ReasoningSize.seeds, choices=range(2, 11),
                        metavar="N", help="seeds of the reasoning comparison (2 to 10: an interval needs two)")
    parser.add_argument("--reasoning-held-out", type=int, default=ReasoningSize.held_out,
                        help="held-out sequences each reasoning model is scored on")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of torch; 0 = the cores other programs leave idle (load average), at "
                        "least 1: on a quiet 2-core machine two threads train about twice as fast as one, but when "
                        "other programs keep the cores busy two threads wait for each other and are far slower")


def report(models: list[dict[str, Any]], runs: list[tuple[Recipe, Path]], run_dir: Path,
           shipped: bool) -> dict[str, Any]:
    """Print the results table and what it shows, write the overlay figure; returns what results.json holds.
    `shipped`: every model trained with the shipped recipe unchanged."""
    bigram = {**bigram_bpb(runs[0][0]), "seed": runs[0][0].train.seed}
    table = results_table(models, bigram)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    print(table)
    for line in [*comparison_lines(models, shipped), *scale_lines(models, bigram), *timing_lines(models, load, cores)]:
        print(f"- {line}")
    figure = run_dir / FIGURE_FILE
    plot_runs({m["label"]: d / METRICS_FILE for m, (_, d) in zip(models, runs, strict=True)}, figure,
              f"parloop quickstart: every model of {run_dir} (same recipe and tokens; only R and the seed differ)",
              {"bigram counts (same training tokens)": bigram["val_bpb"]})
    return {"models": models, "bigram": bigram, "differences": paired_differences(models), "table": table,
            "load_average": load, "cpu_count": cores, "figure": str(figure)}


def _sections(args: argparse.Namespace, runs: list[tuple[Recipe, Path]], steps: Steps) -> dict[str, Any]:
    """Steps 2 to the end: training, results, completions and the bench table."""
    first = runs[0][0].train
    steps.header(f"training {len(runs)} models: R = 1 and R = 2, {args.seeds} seed(s) each, {first.max_steps} "
                 f"steps of {first.batch_size} x {first.seq_len} tokens")
    estimated = estimate_training(runs)
    started = time.perf_counter()
    models = train_all(runs)
    trained = time.perf_counter() - started
    steps.header("results: bits per byte on held-out standard-library files (lower is better)"
                 if args.source == "stdlib" else "results: bits per byte on held-out files (lower is better)")
    # the data and recipe the project measured the seed spread with (quickreport.PROJECT_SEED_SPREAD)
    shipped = (Path(args.recipe).resolve() == DEFAULT_RECIPE and not args.overrides and args.source == "stdlib"
               and args.vocab_size == DEFAULT_VOCAB_SIZE)
    summary = {**report(models, runs, args.run_dir, shipped), "training_seconds": trained,
               "estimated_training_seconds": estimated}
    summary["reasoning"] = None
    if not args.no_reasoning:
        summary["reasoning"] = reasoning_step(args, steps)
    steps.header(f"samples: each seed-{first.seed} model continues {args.prompt!r} (temperature 0.8, seed 0)")
    print("Samples from models this small and this briefly trained are not working code: read them as a picture "
          "of what each model has picked up of Python's look.")
    summary["prompt"], summary["completions"] = args.prompt, {}
    for recipe, run_dir in runs[:len(LOOP_COUNTS)]:
        label = model_label(recipe.model["plt_num_loops"], recipe.train.seed)
        summary["completions"][label] = text = complete(run_dir / "model", args.prompt, args.max_new_tokens)
        print(f"--- {label} ---\n{args.prompt}{text}")
    summary["bench_table"] = None
    if not args.no_bench:
        steps.header("parloop bench: decode latency and KV-cache bytes per loop mode and loop count "
                     f"({args.bench_preset} preset, random weights)")
        summary["bench_table"] = bench_table(args)
        print(summary["bench_table"])
    return summary


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars would interleave with ours
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads or idle_cores())
    run_dir: Path = args.run_dir
    data_dir = run_dir / "data"
    steps = Steps(6 - args.no_bench - args.no_reasoning)
    try:
        runs = plan(args, data_dir)
        source = "the Python standard library" if args.source == "stdlib" else args.source
        steps.header(f"corpus: {source} -> {data_dir}")
        print(summary_table(build_corpus(args.source, data_dir, vocab_size=args.vocab_size)))
        summary = _sections(args, runs, steps)
    except USER_ERRORS as e:
        return exit_code(e, "parloop quickstart", "run the same command again to continue where it stopped")
    summary["wall_seconds"] = seconds = time.perf_counter() - started
    (run_dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndone in {seconds / 60:.1f} min (wall-clock; training took {summary['training_seconds'] / 60:.1f} min, "
          f"estimated {summary['estimated_training_seconds'] / 60:.1f} min); everything is under {run_dir}/\n"
          f"  data/          corpus, tokenizer, test_files.txt\n"
          f"  r1/, r2/, ...  one model each: recipe.yaml, metrics.jsonl, curves.png, tensorboard/, model/\n"
          f"  results.json   every number printed above\n"
          f"figure: {summary['figure']}  (training and validation curves of every model, same axes)\n"
          f"next: parloop generate --model {runs[1][1] / 'model'} 'import os'  |  parloop study  |  "
          f"tensorboard --logdir {run_dir}")
    return 0
