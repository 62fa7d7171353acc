"""`parloop bench`: its command-line options, and printing or writing what `run_bench` measured."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from parloop.bench.options import (
    DTYPES,
    PRESETS,
    SHAPE_OPTIONS,
    SWEEP_BATCHES,
    SWEEP_CONTEXTS,
    SWEEP_LOOPS,
    BenchError,
    BenchOptions,
)
from parloop.bench.plots import write_plots
from parloop.bench.run7b import WEIGHTS, format_7b_table, run_7b
from parloop.bench.runner import run_bench
from parloop.bench.table import format_table
from parloop.config import LOOP_MODES
from parloop.threads import set_threads


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (random weights)")
    model.add_argument("--preset", choices=list(PRESETS), default="100m",
                       help="model shape: tiny (smoke tests), 100m (hidden 768, 12 layers, 12 heads, 4 KV heads, "
                            "intermediate 2048, vocab 32000, tied embeddings: 100.1M parameters), 1b (hidden 2048, "
                            "22 layers, 32/4 heads, intermediate 5632: 1.03B), 7b (the released LoopCoder-V2: "
                            "hidden 5120, 14 layers, 40/8 heads, intermediate 27648, vocab 76800, 7.6B; a bf16 "
                            "checkpoint built once under --cache-dir, 15.2 GB, and its int8/int4 copies; each "
                            "--weights format measured in a process of its own; try --modes parallel --loops 1 2 "
                            "--context 32 --warmup 2 --new-tokens 8)")
    for option, name in SHAPE_OPTIONS:
        model.add_argument(f"--{option.replace('_', '-')}", type=_positive_int, default=None,
                           help=f"override the preset's {name}%(default).0s")
    model.add_argument("--window", type=int, default=64, help="sliding window W of loops >= 1 (keys t-W..t)")
    model.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights and activations")
    model.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    model.add_argument("--weights", choices=WEIGHTS, nargs="+", default=None,
                       help="--preset 7b: the weight formats to measure, side by side (default: all)%(default).0s")
    model.add_argument("--cache-dir", type=Path, default=None,
                       help="--preset 7b: where the checkpoints are built once and kept (default: "
                            "$PARLOOP_CACHE/bench-7b, $PARLOOP_CACHE defaulting to ~/.cache/parloop)%(default).0s")


def _add_measure_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to measure")
    what.add_argument("--engine", choices=["parloop", "vllm"], default="parloop",
                      help="parloop: this table. vllm: decode in vLLM through parloop's plugin, one-pass against "
                           "loop-by-loop decoding (the fork's algorithm) for each --loops at --batch (with --sweep: "
                           "each --sweep-loops at each --sweep-batches), --new-tokens steps, fp32, CPU; takes "
                           "--preset, --window, --threads (default 1) and --json (JSON lines); needs the vllm extra "
                           "(docs/vllm.md)")
    what.add_argument("--loops", type=_positive_int, nargs="+", default=[1, 2, 3, 4], help="loop counts R")
    what.add_argument("--modes", choices=LOOP_MODES, nargs="+", default=list(LOOP_MODES), help="loop modes")
    what.add_argument("--batch", type=_positive_int, default=1, help="sequences decoded together")
    what.add_argument("--context", type=_positive_int, default=512, help="prompt tokens prefilled before decoding")
    what.add_argument("--new-tokens", type=_positive_int, default=32, help="timed decode steps per row")
    what.add_argument("--warmup", type=int, default=10, help="untimed decode steps before the timed ones")
    what.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                      help="decode with a static cache and the layer stack compiled by torch.compile, replayed from "
                           "CUDA graphs on a GPU (the first calls per model compile, off the clock); the reference "
                           "then decodes with transformers' static cache and compiled forward (default: on with "
                           "--device cuda, off on CPU)%(default).0s")
    what.add_argument("--repeat-reversed", action=argparse.BooleanOptionalAction, default=None,
                      help="measure every row a second time, in reverse order, and report per row how far apart "
                           "the two medians are (spread %%): a large spread is noise, not a difference between rows; "
                           "with --preset 7b the formats (and within each the loop counts) run again in reverse order "
                           "and the ratios come from the mean of the two passes, which cancels a steady drift of the "
                           "machine (default: on with --preset 7b, off otherwise)")
    what.add_argument("--sweep", action="store_true",
                      help="instead of --loops: every --sweep-loops x --sweep-batches at --context, and every "
                           "--sweep-loops x --sweep-contexts at --batch; writes plots (long on a CPU with the "
                           "100m model: tens of minutes)")
    what.add_argument("--sweep-loops", type=_positive_int, nargs="+", default=list(SWEEP_LOOPS), help="sweep's R")
    what.add_argument("--sweep-batches", type=_positive_int, nargs="+", default=list(SWEEP_BATCHES),
                      help="sweep's batch sizes")
    what.add_argument("--sweep-contexts", type=_positive_int, nargs="+", default=list(SWEEP_CONTEXTS),
                      help="sweep's context lengths")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("machine and output")
    where.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    # "%(default).0s" prints nothing; it stops the CLI's formatter from adding "(default: None)"
    where.add_argument("--threads", type=_positive_int, default=None,
                       help="torch.set_num_threads (default: the cores other programs leave idle, measured over "
                            "a second)%(default).0s")
    where.add_argument("--bandwidth-mb", type=_positive_int, default=512,
                       help="size of the tensor copied to measure memory bandwidth")
    where.add_argument("--json", type=Path, default=None, metavar="FILE",
                       help="write the rows, reference, machine and model as JSON%(default).0s")
    where.add_argument("--plot-dir", type=Path, default=None, metavar="DIR",
                       help="write PNG plots here (default: none, or bench-plots with --sweep)%(default).0s")
    where.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Decode latency is the median of --new-tokens single-token forward calls after --warmup "
                     "ones, with the cache prefilled by a random prompt of --context tokens; every model uses "
                     "the same random weights. Timings depend on what else runs on the machine. On a GPU, e.g. "
                     "--device cuda --dtype bfloat16 --preset 1b --modes parallel sequential_shared --sweep "
                     "--sweep-loops 1 2 3 4 --sweep-batches 1 16 --sweep-contexts 512 (then --preset 100m).")
    _add_model_arguments(parser)
    _add_measure_arguments(parser)
    _add_output_arguments(parser)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    shape = {name: getattr(args, option) for option, name in SHAPE_OPTIONS if getattr(args, option) is not None}
    return BenchOptions(
        preset=args.preset, shape=shape, loops=args.loops, modes=args.modes, batch=args.batch, context=args.context,
        new_tokens=args.new_tokens, warmup=args.warmup, dtype=args.dtype, threads=args.threads, device=args.device,
        window=args.window, seed=args.seed, sweep=args.sweep, sweep_loops=args.sweep_loops,
        sweep_batches=args.sweep_batches, sweep_contexts=args.sweep_contexts, bandwidth_mb=args.bandwidth_mb,
        compile=args.compile, repeat_reversed=args.repeat_reversed)


# options of the parloop engine that the vLLM benchmark has no use for: giving one with --engine vllm is an error
NOT_FOR_VLLM = ("modes", "context", "warmup", "compile", "repeat_reversed", "dtype", "device", "seed", "plot_dir",
                "weights", "cache_dir",
                "sweep_contexts", "bandwidth_mb") + tuple(option for option, _ in SHAPE_OPTIONS)


def vllm_bench_argv(args: argparse.Namespace) -> list[str]:
    """`python -m parloop.vllm.bench`'s arguments for these options; BenchError naming an option it cannot take."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    given = [name for name in NOT_FOR_VLLM if getattr(args, name) != defaults.get_default(name)]
    if given:
        raise BenchError(f"--{given[0].replace('_', '-')} does not apply to --engine vllm (vLLM runs parallel PLT, "
                         "fp32 on CPU, one-pass against loop-by-loop decoding); leave it out")
    if args.preset == "tiny":
        raise BenchError("--preset tiny has heads of 16, and vLLM's CPU attention needs at least 32: use 100m or 1b")
    loops, batches = (args.sweep_loops, args.sweep_batches) if args.sweep else (args.loops, [args.batch])
    argv = ["--preset", args.preset, "--window", str(args.window), "--loops", *map(str, loops),
            "--batch", *map(str, batches), "--tokens", str(args.new_tokens), "--threads", str(args.threads or 1)]
    return argv + (["--out", str(args.json)] if args.json is not None else [])


def run_vllm(args: argparse.Namespace) -> int:
    """`--engine vllm`: the plugin's benchmark (parloop.vllm.bench) with these options."""
    try:
        argv = vllm_bench_argv(args)
        bench = importlib.import_module("parloop.vllm.bench")  # vLLM is an optional extra: imported only here
    except BenchError as err:
        print(f"parloop bench: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"parloop bench: error: --engine vllm needs vLLM ({err}): pip install -e '.[vllm]' "
              "(scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    bench.main(argv)
    return 0


def _run_parloop(args: argparse.Namespace) -> tuple[dict, str]:
    """The result and its table, of the 7b formats or of the random-weight presets."""
    if args.preset == "7b" and args.plot_dir is not None:
        raise BenchError("--preset 7b writes no plots: leave --plot-dir out")
    if args.weights is not None and args.preset != "7b":
        raise BenchError("--weights applies to --preset 7b (a checkpoint on disk, quantized by parloop quantize); "
                         "the other presets build float models: choose their --dtype")
    options = options_from_args(args)
    set_threads(args.threads, "bench")
    options.threads = torch.get_num_threads()
    if args.preset == "7b":
        result = run_7b(options, args.weights or list(WEIGHTS), args.cache_dir, progress=not args.no_progress)
        return result, format_7b_table(result)
    result = run_bench(options, progress=not args.no_progress)
    return result, format_table(result)


def run(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        return run_vllm(args)
    try:
        result, table = _run_parloop(args)
    except BenchError as err:
        print(f"parloop bench: error: {err}", file=sys.stderr)
        return 2
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    plot_dir = args.plot_dir if args.plot_dir is not None else (Path("bench-plots") if args.sweep else None)
    if plot_dir is not None:
        for path in write_plots(result, plot_dir):
            print(f"wrote {path}")
    return 0
