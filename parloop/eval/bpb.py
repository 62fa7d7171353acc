"""Bits per byte of held-out texts: the summed next-token cross-entropy in bits over the UTF-8 bytes it covers,
scored with a sliding window so that every token (after the first) is predicted once, with at least half a window
of context when the text is longer than one window."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from parloop.eval.tokens import batches, encode, max_context, pad_id
from parloop.padding import left_pad


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


def _scored_bytes(tokenizer: Any, text: str, ids: Sequence[int]) -> int:
    """The bytes of `text` that predictions pay for: all of them, less the first token's when it is a real
    token rather than a BOS marker (the first token is never predicted)."""
    size = len(text.encode("utf-8"))
    if ids and ids[0] not in tokenizer.all_special_ids:
        size -= len(tokenizer.decode(ids[:1]).encode("utf-8"))
    return max(size, 0)


@torch.no_grad()
def bits_per_byte(model: Any, tokenizer: Any, texts: Sequence[str], context: int | None = None,
                  batch_size: int = 8, desc: str | None = None) -> BitsPerByte:
    """Bits per byte of `texts` under the model (see the module docstring).

    The first token of a text is not predicted; when it is a real token rather than a BOS marker, its bytes are
    left out of the byte count, so every counted byte is paid for by a prediction.
    """
    context = min(context or max_context(model), max_context(model))
    device = next(model.parameters()).device
    jobs: list[tuple[int, list[int], int]] = []  # (text index, window ids, index of first scored target in it)
    n_bytes, bits = [], [0.0] * len(texts)
    n_tokens = 0
    for t, text in enumerate(texts):
        ids = encode(tokenizer, text)
        n_bytes.append(_scored_bytes(tokenizer, text, ids))
        n_tokens += max(len(ids) - 1, 0)
        for begin, end, first in _windows(len(ids), context):
            jobs.append((t, ids[begin:end], first - begin))
    jobs.sort(key=lambda job: len(job[1]))
    for batch in tqdm(batches(jobs, batch_size), desc=desc, disable=desc is None, leave=False):
        ids, mask = left_pad([job[1] for job in batch], pad_id(tokenizer), device)
        logits = model(ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
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
