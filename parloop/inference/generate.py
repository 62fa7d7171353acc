"""`parloop generate`: one prompt through the batching engine, tokens streamed to the terminal as they come."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from parloop.inference.engine import Engine, LimitError, SamplingParams
from parloop.inference.loading import add_model_arguments, load_model
from parloop.inference.text import TextChoices, chat_prompt_ids
from parloop.quant import QuantizationError
from parloop.threads import set_threads


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per choice")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest token set of this mass")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (choice i uses seed + i)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before this text (repeatable)")
    parser.add_argument("--n", type=int, default=1, help="number of choices, generated together in one batch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the prompt; without it, --file or standard input")
    parser.add_argument("--file", type=Path, help="read the prompt from this file")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message through the tokenizer's chat template")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch; unset: the cores other programs leave idle (measured over a "
                             "second)%(default).0s")


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.file is not None:
        raise SystemExit("parloop generate: give the prompt as an argument or with --file, not both")
    if args.prompt is not None:
        return args.prompt
    if args.file is not None:
        return args.file.read_text()
    if sys.stdin.isatty():
        raise SystemExit("parloop generate: no prompt; pass it as an argument, with --file, or on standard input")
    return sys.stdin.read()


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    if args.max_tokens < 1:  # the engine takes 0 (score the prompt only), which has no use here
        raise SystemExit(f"parloop generate: max_tokens must be >= 1, got {args.max_tokens}")
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed)
    except ValueError as err:
        raise SystemExit(f"parloop generate: {err}") from err
    if args.n < 1:
        raise SystemExit(f"parloop generate: --n must be >= 1, got {args.n}")
    return params


def _show(job: TextChoices, texts: list[str], i: int, token: int | None, reason: str | None) -> None:
    """Choice 0 streams live to the terminal; the others are kept in `texts` and printed when all are done."""
    update = job.feed(i, token, reason)
    if update is None:
        return
    if i == 0:
        sys.stdout.write(update[0])
        sys.stdout.flush()
    else:
        texts[i] += update[0]


def _report(job: TextChoices) -> None:
    first = job.first_token_at or job.started
    reasons = ", ".join(sorted({seq.finish_reason for seq in job.seqs}))
    print(f"[{job.prompt_tokens} prompt tokens, {job.completion_tokens} generated | time to first token "
          f"{1000 * (first - job.started):.1f} ms | {job.tokens_per_second():.1f} tokens/s | finish: {reasons}]",
          file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    params = _sampling_params(args)
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"parloop generate: --threads must be >= 1, got {args.threads}")
    set_threads(args.threads, "generate")
    try:
        model, tokenizer = load_model(args.model, args.device, args.dtype, args.weights)
    except QuantizationError as err:
        raise SystemExit(f"parloop generate: {err}") from err
    try:
        ids = (chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}]) if args.chat
               else tokenizer(prompt)["input_ids"])
    except ValueError as err:
        raise SystemExit(f"parloop generate: {err}") from err

    job = TextChoices(Engine(model, max_batch_size=args.n), tokenizer, args.stop)
    texts = [""] * args.n
    try:
        job.submit([ids], args.n, params, lambda i: partial(_show, job, texts, i))
    except LimitError as err:
        raise SystemExit(f"parloop generate: {err}") from err
    try:
        job.engine.run_until_done()
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    for i in range(1, args.n):
        sys.stdout.write(f"\n--- choice {i} ---\n{texts[i]}")
    sys.stdout.write("\n")
    sys.stdout.flush()
    _report(job)
    return 0
