"""How the next token is picked: greedy, or nucleus sampling with each sequence's own generator."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature` 0 is greedy; `max_tokens` None means as many as the limits allow."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampled(Protocol):
    """What `sample` needs of a sequence."""

    params: SamplingParams
    generator: torch.Generator | None


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of choice `index` of a request: a seeded request samples choice i with seed + i, so that its
    choices differ yet the whole request is reproducible."""
    return dataclasses.replace(params, seed=None if params.seed is None else params.seed + index)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A sequence's own generator (seeded when `params.seed` is set); None when decoding greedily."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(logits: torch.Tensor, seqs: Sequence[Sampled]) -> list[int]:
    """Next token per row of `logits` `[B, V]`: argmax at temperature 0, else nucleus sampling with the sequence's
    own generator (so a seeded sequence draws the same tokens whatever else is in the batch)."""
    tokens = logits.argmax(-1).tolist()
    for i, seq in enumerate(seqs):
        params = seq.params
        if params.temperature == 0:
            continue
        probs = torch.softmax(logits[i].float() / params.temperature, dim=-1)
        if params.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0))
        tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return tokens
