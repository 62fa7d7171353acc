"""How the next token is picked: greedy or sampled (temperature, top-k, nucleus), after penalties and logit bias,
with each sequence's own generator; and the log-probabilities that clients may ask for.

Every step here is numerically safe for any parameters `SamplingParams` accepts: logits are sanitised (NaN and
infinities made finite), temperatures below `GREEDY_BELOW` decode greedily instead of dividing by almost zero, and
a distribution that still cannot be sampled falls back to its most likely token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

# Below this temperature sampling is greedy: dividing float32 logits by less overflows them to infinities and NaN.
GREEDY_BELOW = 1e-5
# A seed is taken modulo 2**64, the range of torch's generators; so is the seed + i of choice i.
SEED_MODULUS = 2**64
# Finite stand-ins for NaN and infinite logits: far outside any real logit, yet safe to divide by GREEDY_BELOW.
_LOGIT_FLOOR, _LOGIT_CEIL = -1e30, 1e30


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature` 0 (or below `GREEDY_BELOW`) is greedy; `max_tokens` None means as many as
    the limits allow (0 only scores the prompt); `top_k` 0 keeps every token. Penalties and `logit_bias` (token id
    -> added logit) apply to greedy decoding too, as in OpenAI's API. `logprobs` asks for each generated token's
    log-probability with that many alternatives, `prompt_logprobs` the same for the prompt's tokens (echo)."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens is None or self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0: off), got {self.top_k}"),
            (all(math.isfinite(p) for p in (self.presence_penalty, self.frequency_penalty)),
             "penalties must be finite"),
            (all(math.isfinite(b) for b in self.logit_bias.values()), "logit_bias values must be finite"),
            (all(n is None or n >= 0 for n in (self.logprobs, self.prompt_logprobs)), "logprobs must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def reshapes_logits(self) -> bool:
        """Whether penalties or a logit bias change the logits before the pick."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model and the `top` most likely tokens at its position, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Sampled(Protocol):
    """What picking a token needs of a sequence."""

    params: SamplingParams
    generator: torch.Generator | None
    output_ids: list[int]


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of choice `index` of a request: a seeded request samples choice i with seed + i (modulo
    `SEED_MODULUS`), so that its choices differ yet the whole request is reproducible."""
    seed = None if params.seed is None else (params.seed + index) % SEED_MODULUS
    return dataclasses.replace(params, seed=seed)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A sequence's own generator (seeded when `params.seed` is set); None when decoding greedily."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed % SEED_MODULUS)
    return generator


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    """`logits` `[..., V]` as finite float32."""
    return torch.nan_to_num(logits.float(), nan=_LOGIT_FLOOR, posinf=_LOGIT_CEIL, neginf=_LOGIT_FLOOR)


def reshape_logits(logits: torch.Tensor, params: SamplingParams, output_ids: list[int]) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the tokens generated so far, then the logit bias."""
    logits = logits.clone()
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[-1])
        counts = counts[:logits.shape[-1]].float()
        logits -= counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), device=logits.device)
    return logits


def _draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Sample from finite float32 `logits` `[V]` with temperature, top-k and top-p."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0))
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def pick(logits: torch.Tensor, seq: Sampled, argmax: int | None = None) -> int:
    """The next token of `seq` from its logits row `[V]`; `argmax`, when given, is the row's argmax already
    computed for the whole batch (the greedy pick when nothing reshapes the logits)."""
    params = seq.params
    if params.greedy and not params.reshapes_logits:
        return greedy_tokens(logits[None])[0] if argmax is None else argmax
    clean = sanitize(logits)
    if params.reshapes_logits:
        clean = reshape_logits(clean, params, seq.output_ids)
    return int(clean.argmax()) if params.greedy else _draw(clean, params, seq.generator)


def sample(logits: torch.Tensor, seqs: Sequence[Sampled]) -> list[int]:
    """Next token per row of `logits` `[B, V]` (see `pick`); a seeded sequence draws the same tokens whatever else
    is in the batch."""
    argmax = greedy_tokens(logits)
    return [pick(logits[i], seq, argmax[i]) for i, seq in enumerate(seqs)]


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The most likely token of each row of `logits` `[B, V]`, NaN never among them."""
    return sanitize(logits).argmax(-1).tolist()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """For rows of `logits` `[N, V]`: the log-probability of `tokens[i]` under row i (the model's own
    distribution, before any sampling parameter) and the row's `top` most likely tokens."""
    logprobs = torch.log_softmax(sanitize(logits), dim=-1)
    chosen = logprobs.gather(-1, tokens.view(-1, 1).to(logprobs.device)).view(-1).tolist()
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        alternatives = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        alternatives = [()] * len(chosen)
    return [TokenLogprob(int(t), lp, alt) for t, lp, alt in zip(tokens.tolist(), chosen, alternatives, strict=True)]
