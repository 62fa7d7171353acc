"""`parloop quickstart`: the whole project in about ten minutes on a 2-core laptop, with nothing downloaded.

1. builds a code corpus from the Python standard library's own sources (`parloop data build`);
2. trains a small PLT model with R = 2 loops and a matched R = 1 model (same recipe, same tokens; only
   `plt_num_loops` differs), and prints their validation bits per byte side by side;
3. completes a code prompt with each model;
4. ends with the `parloop bench` table (decode latency and KV-cache bytes per loop mode and loop count).

Everything goes under one run directory, named at the end. Running the command again reuses what is done (the
corpus, finished trainings) and continues an interrupted training from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from parloop.bench import BenchOptions, format_table, run_bench
from parloop.inference.loading import load_model
from parloop.train.corpus import build_corpus, summary_table
from parloop.train.errors import USER_ERRORS, exit_code
from parloop.train.metrics import format_metrics
from parloop.train.recipe import load_recipe
from parloop.train.trainer import train

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
DEFAULT_PROMPT = "def fibonacci(n):\n"
LOOP_COUNTS = (2, 1)


def _header(text: str) -> None:
    print(f"\n== {text}", flush=True)


def comparison_table(results: dict[int, dict[str, Any]]) -> str:
    rows = [f"{'R':>2}  {'parameters':>10}  {'val bpb':>8}  {'test bpb':>8}  {'val loss':>8}  {'tokens':>10}  "
            f"{'tokens/s':>8}  {'train s':>7}"]
    for loops, m in sorted(results.items()):
        rows.append(f"{loops:>2}  {m['parameters']:>10,}  {m['val_bpb']:>8.4f}  {m['test_bpb']:>8.4f}  "
                    f"{m['val_loss']:>8.4f}  {m['tokens']:>10,}  {m['tokens_per_s']:>8,.0f}  "
                    f"{m['train_seconds']:>7.0f}")
    return "\n".join(rows)


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


def bench_table(args: argparse.Namespace) -> str:
    options = BenchOptions(preset=args.bench_preset, loops=(1, 2), context=args.bench_context,
                           new_tokens=args.bench_new_tokens)
    return format_table(run_bench(options))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=Path("runs/quickstart"),
                        help="everything goes here; rerunning with the same directory reuses finished work")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="training recipe of both models")
    parser.add_argument("--set", dest="overrides", action="append", default=argparse.SUPPRESS,
                        metavar="SECTION.FIELD=VALUE",
                        help="override a recipe field for both models, e.g. --set train.max_steps=50 (repeatable)")
    parser.add_argument("--source", default="stdlib",
                        help="corpus source: 'stdlib' (the Python standard library), a directory, a glob or a "
                        ".jsonl file, as for `parloop data build`")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary of the corpus")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="code prompt to complete")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="length of each completion")
    parser.add_argument("--bench-preset", default="100m", help="model shape of the closing `parloop bench` table")
    parser.add_argument("--bench-context", type=int, default=256, help="prompt tokens prefilled before decoding")
    parser.add_argument("--bench-new-tokens", type=int, default=16, help="timed decode steps per bench row")
    parser.add_argument("--no-bench", action="store_true", help="skip the closing bench table")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    run_dir: Path = args.run_dir
    data_dir = run_dir / "data"
    try:
        recipes = {r: load_recipe(args.recipe, [*getattr(args, "overrides", []), f"data.dir={data_dir}",
                                                f"model.plt_num_loops={r}", f"name=quickstart-r{r}"])
                   for r in LOOP_COUNTS}
        source = "the Python standard library" if args.source == "stdlib" else args.source
        _header(f"1/4  corpus: {source} -> {data_dir}")
        meta = build_corpus(args.source, data_dir, vocab_size=args.vocab_size)
        print(summary_table(meta))
        results = {}
        for step, loops in enumerate(LOOP_COUNTS, 2):
            recipe = recipes[loops]
            _header(f"{step}/4  training R = {loops} ({recipe.train.max_steps} steps of "
                    f"{recipe.train.batch_size} x {recipe.train.seq_len} tokens) -> {run_dir / f'r{loops}'}")
            results[loops] = train(recipe, run_dir / f"r{loops}", resume=True)
            print(format_metrics(results[loops]))
    except USER_ERRORS as e:
        return exit_code(e, "parloop quickstart", "run the same command again to continue where it stopped")

    _header("validation bits per byte, R = 2 next to the matched R = 1 (same recipe and tokens)")
    print(comparison_table(results))
    gap = results[1]["val_bpb"] - results[2]["val_bpb"]
    print(f"R = 2 is {abs(gap):.4f} bits per byte {'better' if gap > 0 else 'worse'} than R = 1 on held-out "
          f"standard-library files")

    _header(f"3/4  completions of {args.prompt!r} (sampled, seed 0)")
    samples = {}
    for loops in LOOP_COUNTS:
        samples[loops] = complete(results[loops]["model_dir"], args.prompt, args.max_new_tokens)
        print(f"--- R = {loops} ---\n{args.prompt}{samples[loops]}")

    bench = None
    if not args.no_bench:
        _header("4/4  parloop bench: decode latency and KV-cache bytes per loop mode and loop count")
        bench = bench_table(args)
        print(bench)

    seconds = time.perf_counter() - started
    summary = {"results": {f"r{k}": v for k, v in results.items()}, "prompt": args.prompt,
               "completions": {f"r{k}": v for k, v in samples.items()}, "bench_table": bench,
               "wall_seconds": seconds}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _header(f"done in {seconds / 60:.1f} min; everything is under {run_dir}/")
    print(f"  data/         corpus, tokenizer, test_files.txt\n"
          f"  r2/, r1/      recipe.yaml, metrics.jsonl, curves.png, tensorboard/, checkpoints/, model/\n"
          f"  summary.json  the numbers above\n"
          f"next: parloop generate --model {results[2]['model_dir']} 'import os'  |  "
          f"tensorboard --logdir {run_dir}")
    return 0
