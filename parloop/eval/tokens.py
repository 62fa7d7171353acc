"""Tokenisation and batching helpers shared by the evaluation tasks and the loop diagnostics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


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


def pad_id(tokenizer: Any) -> int:
    """The id to left-pad batches with: the tokenizer's pad token, else its EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def max_context(model: Any) -> int:
    """The longest sequence the model accepts (its `max_position_embeddings`; 2048 when it does not say)."""
    return int(getattr(model.config, "max_position_embeddings", 2048))


def batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """`items` in consecutive chunks of `size` (the last may be shorter)."""
    return [items[i:i + size] for i in range(0, len(items), size)]
