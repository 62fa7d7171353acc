"""The rules of PLT that parloop's model and its vLLM plugin share (docs/design.md §2), written once.

- Loop r >= 1 reads `a * E[t] + b * H[r-1][t-1]`, with a = `plt_emb_scale` and b = `plt_hidden_scale`; a null
  scale means 1.0 (the released code adds the two unscaled).
- What loop r hands to loop r+1 is `norm(h)` with the model's final norm when `plt_normalize_per_loop`, else `h`.
- The G-SWA gate: loops r >= 1 mix their global and local branches through it when the loop layout is gated. The
  released code builds a gate in every layer whatever the loop count, so an R = 1 checkpoint may carry one that is
  never applied: parloop keeps it (such checkpoints load and save back), does not count it, and does not require it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from parloop.config import PLTConfig

GATE_WEIGHT = ".plt_gate."  # part of every gate weight's name: `model.layers.{i}.self_attn.plt_gate.{weight,bias}`


def loop_scales(config: PLTConfig) -> tuple[float, float]:
    """(a, b) of a loop's input `a * E + b * previous`: the config's scales, 1.0 where null."""
    a = 1.0 if config.plt_emb_scale is None else float(config.plt_emb_scale)
    b = 1.0 if config.plt_hidden_scale is None else float(config.plt_hidden_scale)
    return a, b


def loop_input(emb: torch.Tensor, prev: torch.Tensor, config: PLTConfig) -> torch.Tensor:
    """A loop's input: the token embeddings `emb` and the previous loop's (offset) handoff states `prev`."""
    a, b = loop_scales(config)
    return a * emb + b * prev


def handoff(h: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor], config: PLTConfig) -> torch.Tensor:
    """What a loop passes to the next one: H[r] = norm(h) if plt_normalize_per_loop else h."""
    return norm(h) if config.plt_normalize_per_loop else h


def uses_gate(config: PLTConfig) -> bool:
    """Loops r >= 1 use G-SWA, mixing their two branches through the gate."""
    return config.loop_layout.gated


def unused_gate(config: PLTConfig) -> bool:
    """An R = 1 model: its layers may carry a gate (as the released code writes it) that is never applied."""
    return getattr(config, "plt_num_loops", 0) == 1


def builds_gate(config: PLTConfig) -> bool:
    """Whether parloop's layers hold a gate: where it is used, and at R = 1 so that released checkpoints load."""
    return uses_gate(config) or unused_gate(config)


def is_gate_weight(name: str) -> bool:
    return GATE_WEIGHT in name
