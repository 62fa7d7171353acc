"""Line completion: exact match of greedy completions of held-out source lines given the preceding context.

A line counts as completed when, at each of its tokens (its indentation and text, as the file's own tokenization
splits them), the model's most likely next token is that token: this is exactly "greedy decoding from the end of
the previous line reproduces the line", computed in one teacher-forced pass.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from parloop.eval.tokens import batches, encode, max_context, pad_id
from parloop.padding import left_pad


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


def _line_windows(tokenizer: Any, texts: Sequence[str], max_lines: int, context: int, min_chars: int,
                  seed: int) -> list[tuple[list[int], int]]:
    """Up to `max_lines` completable lines drawn with `seed`, each as (the tokens up to and including the line's
    last one, at most `context` of them; the line's token count), shortest first."""
    candidates: list[tuple[list[int], int, int]] = []
    for text in texts:
        ids, spans = encode(tokenizer, text, offsets=True)
        candidates += [(ids, i, j) for i, j in _line_targets(text, spans, min_chars) if j - i < context]
    if not candidates:
        raise ValueError("no completable line in the held-out texts")
    chosen = random.Random(seed).sample(candidates, min(max_lines, len(candidates)))
    # a window ends at the line's last token; the line's own tokens are predicted from the columns before them
    windows = [(ids[max(0, j - context):j], j - i) for ids, i, j in chosen]
    windows.sort(key=lambda w: len(w[0]))
    return windows


@torch.no_grad()
def line_completion(model: Any, tokenizer: Any, texts: Sequence[str], max_lines: int = 500,
                    context: int | None = None, min_chars: int = 6, seed: int = 0, batch_size: int = 16,
                    desc: str | None = None) -> dict[str, Any]:
    """Exact-match rate of greedy line completions over up to `max_lines` lines drawn (with `seed`) from the
    completable lines of `texts`, each given up to `context` tokens before it."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("line completion needs a fast tokenizer (character offsets of tokens); load the "
                         "checkpoint's tokenizer.json with AutoTokenizer")
    context = min(context or max_context(model), max_context(model))
    windows = _line_windows(tokenizer, texts, max_lines, context, min_chars, seed)
    device = next(model.parameters()).device
    exact = 0
    for batch in tqdm(batches(windows, batch_size), desc=desc, disable=desc is None, leave=False):
        ids, mask = left_pad([w[0] for w in batch], pad_id(tokenizer), device)
        keep = max(n for _, n in batch) + 1
        predicted = model(ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits.argmax(-1)[:, :-1]
        for row, (_, n) in enumerate(batch):
            exact += bool((predicted[row, -n:] == ids[row, -n:]).all())
    return {"exact_match": exact / len(windows), "lines": len(windows), "correct": exact}
