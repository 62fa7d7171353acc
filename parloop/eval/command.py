"""`parloop eval`: run evaluation tasks on a checkpoint and print (optionally save) the results."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from parloop.eval.held_out import held_out_texts
from parloop.eval.tasks import TASKS, evaluate
from parloop.inference.loading import add_model_arguments, load_model
from parloop.train.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--task", required=True, choices=TASKS, action="append",
                        help="evaluation to run; repeat the option for several")
    parser.add_argument("--data", default=None,
                        help="corpus directory from `parloop data build` (bpb, line-completion and loop-diagnostics "
                        "read its held-out files)")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="held-out split to use")
    parser.add_argument("--max-bytes", type=int, default=1_000_000,
                        help="read at most this many bytes of held-out text (files in a fixed order)")
    parser.add_argument("--context", type=int, default=None,
                        help="context window in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--limit", type=int, default=None,
                        help="number of items: programs (default 500), lines (default 500), HumanEval problems "
                        "(default all 164)")
    parser.add_argument("--shots", type=int, default=0, help="code-reasoning: solved examples before each program")
    parser.add_argument("--samples", type=int, default=1, help="HumanEval: completions per problem")
    parser.add_argument("--temperature", type=float, default=0.0, help="HumanEval: sampling temperature (0 = greedy)")
    parser.add_argument("--k", type=int, nargs="+", default=[1], help="HumanEval: the k of pass@k")
    parser.add_argument("--max-new-tokens", type=int, default=384, help="HumanEval: tokens per completion")
    parser.add_argument("--timeout", type=float, default=10.0, help="HumanEval: seconds per test run")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    data = args.data
    # read once, and only when a task needs it
    held_out = functools.cache(functools.partial(held_out_texts, data, args.split, args.max_bytes))
    results = {}
    limit, context = args.limit, args.context
    try:
        model, tokenizer = load_model(args.model, args.device, args.dtype, args.weights)
        for task in args.task:
            results[task] = evaluate(model, tokenizer, task, held_out if data else None, limit, context=context,
                                     batch_size=args.batch_size, shots=args.shots, samples=args.samples,
                                     temperature=args.temperature, k=args.k, max_new_tokens=args.max_new_tokens,
                                     timeout=args.timeout)
            print(f"{task}: " + json.dumps(results[task], default=float))
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"parloop eval: error: {e}", file=sys.stderr)
        return 2
    if args.json is not None:
        args.json.write_text(json.dumps({"model": str(args.model), "results": results}, indent=2, default=float))
    return 0
