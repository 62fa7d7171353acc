"""Batched text generation with `model.generate`, for the tasks that score decoded continuations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from parloop.eval.tokens import batches, encode, max_context, pad_id
from parloop.padding import left_pad


@torch.no_grad()
def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int | Sequence[int],
                   batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0, samples: int = 1,
                   seed: int = 0, desc: str | None = None) -> list[list[str]]:
    """`samples` continuations of each prompt (greedy when `temperature` is 0), decoded, in prompt order.

    Prompts are left-truncated to leave room for the new tokens within the model's `max_position_embeddings`,
    and batched by length so that little compute goes to padding.
    """
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    room = max_context(model)
    encoded = [encode(tokenizer, p)[-max(1, room - b):] for p, b in zip(prompts, budgets, strict=True)]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[list[str]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    sampling = temperature > 0
    torch.manual_seed(seed)
    for batch in tqdm(batches(order, batch_size), desc=desc, disable=desc is None, leave=False):
        ids, mask = left_pad([encoded[i] for i in batch], pad_id(tokenizer), device)
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=max(budgets[i] for i in batch),
                                   do_sample=sampling, temperature=temperature if sampling else None,
                                   top_p=top_p if sampling else None, top_k=None,
                                   num_return_sequences=samples, pad_token_id=pad_id(tokenizer))
        texts = tokenizer.batch_decode(generated[:, ids.shape[1]:], skip_special_tokens=True)
        for j, i in enumerate(batch):
            out[i] = texts[j * samples:(j + 1) * samples]
    return out
