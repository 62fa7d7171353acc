"""`parloop generate`: one prompt through the batching engine, tokens streamed to the terminal as they come.

Also the text layer that `parloop serve` shares: loading a model directory with its tokenizer, chat templates,
and `TextStream`, which turns tokens into text incrementally and applies stop strings.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


# -- shared with `parloop serve` ------------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="model directory: config.json, weights and tokenizer files")
    parser.add_argument("--device", default="auto", help="torch device; auto = cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weight dtype; auto = the checkpoint's")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per choice")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest token set of this mass")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (choice i uses seed + i)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before this text (repeatable)")
    parser.add_argument("--n", type=int, default=1, help="number of choices, generated together in one batch")


def load_model(model_dir: Path, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """Load `(model, tokenizer)` from a model directory, the model in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import parloop  # noqa: F401  (registers the model type with the Auto classes)

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json); pass the directory that "
                                "holds config.json, the weights and the tokenizer files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load a tokenizer from {model_dir} ({err}); save one there with "
                                "tokenizer.save_pretrained(dir)") from err
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    return model.to(device).eval(), tokenizer


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template, so chat is not available; use plain "
                         "completions, or add a chat_template to tokenizer_config.json")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokens_per_second(tokens: int, first_token_at: float, last_token_at: float, started_at: float,
                      choices: int = 1) -> float:
    """Decode speed: the tokens after each choice's first one over the time after the first token; when there are
    none, all tokens over the whole time."""
    if tokens > choices and last_token_at > first_token_at:
        return (tokens - choices) / (last_token_at - first_token_at)
    return tokens / max(last_token_at - started_at, 1e-9)


class TextStream:
    """Tokens in, text out, incrementally: text is released once its bytes are complete (byte-level tokenizers
    split characters over tokens), and stop strings cut the text, never shown even in part.

    `push(token)` returns the text that became final; `stopped` turns True when a stop string appeared (the text
    ends before it); `finish()` returns whatever is still held back.
    """

    def __init__(self, tokenizer: Any, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = 0  # tokens before this index are in `text`; decode from it for context (as TGI does)
        self._read = 0
        self._released = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text = self._decode(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            start = max(0, self._released - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = final = True
        hold = 0 if final else self._stop_prefix_length()
        end = max(self._released, len(self.text) - hold)
        out = self.text[self._released:end]
        self._released = end
        return out

    def _stop_prefix_length(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        return max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)


# -- the command ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the prompt; without it, --file or standard input")
    parser.add_argument("--file", type=Path, help="read the prompt from this file")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message through the tokenizer's chat template")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


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


def run(args: argparse.Namespace) -> int:
    from parloop.engine import Engine, LimitError, Listener, SamplingParams

    prompt = _read_prompt(args)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed)
    except ValueError as err:
        raise SystemExit(f"parloop generate: {err}") from err
    if args.n < 1:
        raise SystemExit(f"parloop generate: --n must be >= 1, got {args.n}")
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    try:
        ids = (chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}]) if args.chat
               else tokenizer(prompt)["input_ids"])
    except ValueError as err:
        raise SystemExit(f"parloop generate: {err}") from err

    engine = Engine(model, max_batch_size=args.n)
    streams = [TextStream(tokenizer, args.stop) for _ in range(args.n)]
    texts = [""] * args.n
    last_token_at = [0.0] * args.n
    seqs = []

    def listener(i: int) -> Listener:
        def on_token(token: int | None, reason: str | None) -> None:
            stream, delta = streams[i], ""
            if token is not None:
                last_token_at[i] = time.perf_counter()
                delta = stream.push(token)
                if stream.stopped:
                    engine.cancel(seqs[i], "stop")
            if reason is not None or stream.stopped:
                delta += stream.finish()
            if i == 0:  # the first choice streams live; the others are printed when all are done
                sys.stdout.write(delta)
                sys.stdout.flush()
            else:
                texts[i] += delta
        return on_token

    started = time.perf_counter()
    try:
        for i in range(args.n):
            seed = None if args.seed is None else args.seed + i
            seqs.append(engine.submit(ids, dataclasses.replace(params, seed=seed), listener(i)))
    except LimitError as err:
        raise SystemExit(f"parloop generate: {err}") from err
    try:
        engine.run_until_done()
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    for i in range(1, args.n):
        sys.stdout.write(f"\n--- choice {i} ---\n{texts[i]}")
    sys.stdout.write("\n")
    sys.stdout.flush()

    first = min(seq.first_token_at for seq in seqs)
    tokens = sum(len(stream.ids) for stream in streams)
    rate = tokens_per_second(tokens, first, max(last_token_at), started, args.n)
    reasons = ", ".join(sorted({seq.finish_reason for seq in seqs}))
    print(f"[{len(ids)} prompt tokens, {tokens} generated | time to first token {1000 * (first - started):.1f} ms"
          f" | {rate:.1f} tokens/s | finish: {reasons}]", file=sys.stderr)
    return 0
