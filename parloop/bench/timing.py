"""Timing decode: prefill then single-token greedy steps through a model's forward, or through its own `generate`.

Every step is `model(input_ids=next_token, past_key_values=cache, use_cache=True)` under `torch.inference_mode()`
with the greedy next token fed back; a measurement reports the median step time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList


def significant(x: float) -> float:
    """x to 4 significant digits, for readable JSON that keeps small figures (tiny models) non-zero."""
    return float(f"{x:.4g}")


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work, so a clock read after it times the work itself."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@dataclass
class Timing:
    prefill_ms: float
    step_ms: list[float]
    cache: Any

    @property
    def decode_ms(self) -> float:
        return statistics.median(self.step_ms)

    def spread(self) -> dict[str, float]:
        """10th and 90th percentile step times: how noisy the median is."""
        deciles = statistics.quantiles(self.step_ms, n=10) if len(self.step_ms) > 1 else self.step_ms * 9
        return dict(decode_ms_p10=significant(deciles[0]), decode_ms_p90=significant(deciles[-1]))


def _greedy_step(model: nn.Module, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
    logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def time_decode(model: nn.Module, new_cache: Callable[[], Any], prompt: torch.Tensor, warmup: int,
                steps: int) -> Timing:
    """Prefill `prompt` into `new_cache()`, then decode `warmup` + `steps` greedy tokens one forward call each."""
    sync = synchronizer(prompt.device)
    with torch.inference_mode():
        # first-call costs (allocator, thread pool, lazy imports in transformers) off the clock
        throwaway = new_cache()
        _greedy_step(model, _greedy_step(model, prompt[:, :8], throwaway), throwaway)
        del throwaway
        cache = new_cache()
        sync()
        start = time.perf_counter()
        token = _greedy_step(model, prompt, cache)
        sync()
        prefill_ms = (time.perf_counter() - start) * 1e3
        step_ms = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            token = _greedy_step(model, token, cache)
            sync()
            if i >= warmup:
                step_ms.append((time.perf_counter() - start) * 1e3)
    return Timing(prefill_ms, step_ms, cache)


class _StepClock(StoppingCriteria):
    """Never stops generation; notes the time after each new token, so generate's own steps can be timed."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync, self.times = sync, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.sync()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def time_generate(model: nn.Module, prompt: torch.Tensor, warmup: int, steps: int, static: bool = False) -> float:
    """Median ms per token of greedy `model.generate` with its own cache (`static`: its static cache, which
    `transformers` compiles on a GPU): time between consecutive new tokens (everything generate does per token),
    skipping the prefill's token and `warmup` steps."""
    clock = _StepClock(synchronizer(prompt.device))
    n = warmup + steps + 1
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]),
                   cache_implementation="static" if static else None)
    gaps = [(b - a) * 1e3 for a, b in zip(clock.times[:-1], clock.times[1:], strict=True)]
    return statistics.median(gaps[warmup:])
