"""Bytes a decode step holds and reads: the KV-cache formula of docs/design.md §3 and the memory traffic of one
step, which turns a step time into achieved bandwidth.

The bytes a step must read: every layer weight once per pass through the layers (1 pass in `parallel` mode and at
R = 1, R passes in the sequential modes), the final norm and the full `lm_head` once, the embedding rows of the new
tokens, and the keys/values the step attends to (`parallel`: loop 0's full cache + R-1 windows;
`sequential_shared`: loop 0's full cache once per loop + R-1 windows; `sequential`: R full caches).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from parloop.config import PLTConfig


def kv_slots(mode: str, loops: int, length: int, window: int) -> int:
    """Key/value slots per layer and sequence that the cache holds after `length` tokens (docs/design.md §3):
    one full cache plus R-1 windows of `window + 1`, or R full caches in `sequential` mode."""
    if mode == "sequential":
        return loops * length
    return length + (loops - 1) * min(length, window + 1)


def kv_cache_bytes_formula(config: PLTConfig, batch: int, length: int, element_size: int) -> int:
    """docs/design.md §3's KV bytes, summed over layers and sequences."""
    per_slot = 2 * config.num_key_value_heads * config.head_dim * element_size  # K and V
    slots = kv_slots(config.plt_loop_mode, config.plt_num_loops, length, config.window)
    return config.num_hidden_layers * batch * per_slot * slots


def _nbytes(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _module_bytes(module: nn.Module) -> int:
    """Parameters and buffers (a quantized layer keeps its weights and scales as buffers)."""
    return _nbytes(module.parameters()) + _nbytes(module.buffers())


def decode_step_bytes(model: nn.Module, mode: str, loops: int, batch: int, length: int, window: int) -> int:
    """Bytes one decode step must read from memory with `length` tokens in the cache (see the module docstring).
    Works for `PLTForCausalLM` and `LlamaForCausalLM` (same module names; pass mode "parallel", loops 1)."""
    config = model.config
    element_size = model.model.embed_tokens.weight.element_size()  # activations and KV: the float dtype
    passes = 1 if mode == "parallel" else loops
    layers = _module_bytes(model.model.layers)
    head = _module_bytes(model.lm_head) + _module_bytes(model.model.norm)
    embedding_rows = batch * config.hidden_size * element_size
    read_slots = kv_slots(mode, loops, length, window)
    if mode == "sequential_shared":  # every loop's global branch reads loop 0's full cache again
        read_slots += (loops - 1) * length
    kv = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * config.head_dim * element_size
    return passes * layers + head + embedding_rows + kv * read_slots
