"""Whether an API request can run, and with what: every check of a request, in one place, before it is queued.

`sampling_params` takes the parsed request, its prompts as token ids, the server's limits and the vocabulary, and
returns the `SamplingParams` the engine runs, or raises `APIError` naming the field at fault. Every limit is checked
exactly once: the request's own ones (prompts, stop strings, choices per batch, token ids, ranges) here; the ones
about each sequence and the queue (prompt length, context, cached tokens, queue size) by the engine when the
request's sequences are submitted, which every caller of the engine goes through (`Engine.submit_all`).
"""

from __future__ import annotations

from dataclasses import dataclass

from parloop.inference.protocol import APIError, ChatRequest, CompletionRequest, SamplingRequest, limit_error
from parloop.inference.sampling import SamplingParams
from parloop.inference.scheduler import LimitError, Limits


@dataclass(frozen=True)
class RequestLimits:
    """Per-request bounds besides the engine's: prompts per completions request, stop strings and their length."""

    max_prompts: int = 64
    max_stop_strings: int = 16
    max_stop_length: int = 1000


def sampling_params(req: SamplingRequest, prompts: list[list[int]], limits: RequestLimits, engine_limits: Limits,
                    vocab: int) -> SamplingParams:
    """The request's sampling parameters once every check passed (`APIError` naming the field otherwise)."""
    _check_shape(req, prompts, limits)
    for ids in prompts:
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_token_id")
    try:
        engine_limits.check_choices(req.n)
    except LimitError as err:
        raise limit_error(err) from err
    _check_stop(req.stop_strings(), limits)
    logprobs, prompt_logprobs = req.logprob_counts()
    try:
        return SamplingParams(max_tokens=req.new_tokens(), temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, top_k=max(req.top_k, 0), presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty, logit_bias=_logit_bias(req, vocab),
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    except ValueError as err:
        raise APIError(400, str(err), code="invalid_request") from err


def _check_shape(req: SamplingRequest, prompts: list[list[int]], limits: RequestLimits) -> None:
    """What the request's fields must be together, beyond each field's own type and range."""
    if isinstance(req, CompletionRequest):
        if not prompts:
            raise APIError(400, "prompt is an empty list; give a string, a list of strings or token ids",
                           param="prompt", code="invalid_request")
        if len(prompts) > limits.max_prompts:
            raise APIError(400, f"{len(prompts)} prompts in one request, over the limit of {limits.max_prompts} "
                           "(--max-prompts-per-request); split the request", param="prompt",
                           code="max_prompts_per_request")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens 0 generates nothing: it is only allowed with echo", param="max_tokens",
                           code="invalid_request")
    if isinstance(req, ChatRequest) and req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_request")


def _check_stop(stop: list[str], limits: RequestLimits) -> None:
    if len(stop) > limits.max_stop_strings:
        raise APIError(400, f"{len(stop)} stop strings, over the limit of {limits.max_stop_strings} "
                       "(--max-stop-strings)", param="stop", code="too_many_stop_strings")
    if any(len(s) > limits.max_stop_length for s in stop):
        raise APIError(400, f"a stop string is longer than {limits.max_stop_length} characters "
                       "(--max-stop-length)", param="stop", code="stop_string_too_long")


def _logit_bias(req: SamplingRequest, vocab: int) -> dict[int, float]:
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias maps token ids in [0, {vocab}) to values in [-100, 100]; got "
                           f"{key!r}: {value}", param="logit_bias", code="invalid_request")
        bias[int(key)] = value
    return bias
