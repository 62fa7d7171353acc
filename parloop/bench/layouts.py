"""Which CPU few-row product layout a decode step used, per weight shape and row count (see `parloop.kernels`).

The layout autotuner keys its choices by (weight shape, rows, dtype, threads) for the whole process, so a row's
layouts are found by recording the products one decode step makes and looking each up among the choices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from parloop.kernels import chosen_layouts, layout_switches

ProductKey = tuple[tuple[int, ...], int, torch.dtype, int]  # the autotuner's key: weight shape, rows, dtype, threads


def describe(key: ProductKey) -> str:
    (out_features, in_features), rows, _, threads = key
    return f"{out_features}x{in_features} rows={rows} threads={threads}"


def all_chosen() -> dict[str, str]:
    """Every layout the autotuner has chosen in this process."""
    return {describe(key): name for key, name in chosen_layouts().items()}


def switch_count() -> int:
    """How often the autotuner has changed a layout so far in this process (after re-checking a choice)."""
    return sum(layout_switches().values())


def _products_of_one_step(model: nn.Module, new_cache: Callable[[], Any], prompt: torch.Tensor) -> set[ProductKey]:
    """The linear products of one decode step after a 2-token prefill, recorded by forward hooks."""
    seen: set[ProductKey] = set()

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
        x = inputs[0]
        seen.add((tuple(module.weight.shape), x.numel() // module.in_features, x.dtype, torch.get_num_threads()))

    cache = new_cache()
    with torch.inference_mode():
        token = model(input_ids=prompt[:, :2], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Linear)]
        try:
            model(input_ids=token[:, -1].argmax(-1, keepdim=True), past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
    return seen


def step_layouts(model: nn.Module, new_cache: Callable[[], Any], prompt: torch.Tensor) -> dict[str, str]:
    """The layouts one decode step of `model` uses, for its products that go through the few-row kernels.
    Call it after timing, so that the choices it reports are those the timed steps made."""
    chosen = chosen_layouts()
    products = _products_of_one_step(model, new_cache, prompt)
    return {describe(key): chosen[key] for key in sorted(products, key=describe) if key in chosen}


def summary(layouts: dict[str, str] | None) -> str | None:
    """The distinct layouts of a row, for a table cell ("-" when the step used none)."""
    if layouts is None:
        return None
    return "+".join(sorted(set(layouts.values()))) or "-"
