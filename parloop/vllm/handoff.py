"""The cross-loop carries of PLT in vLLM: a paged, per-token store of the loop handoff states (docs/vllm.md).

Loop r >= 1 at token t reads H[r-1][t-1], the handoff state of loop r-1 at the PREVIOUS token (docs/design.md §2).
Instead of keeping one carry per request (which would have to follow vLLM's request slots, preemption and prefix
cache by hand), every token's H[r][t] (r < R-1) is written into the KV-cache pages of a few extra attention layers
that are never attended over ("holders"): the row of token t lives at token t's cache slot. The carry of token t is
then simply the row at the slot of position t-1, found through the request's block table. Whatever vLLM does with
the KV cache, the states follow: a prefix-cache hit finds the states of the cached tokens in the cached pages, a
preempted request recomputes them with its KV, and a reused page is overwritten before it is read.

A holder has the same KV-cache spec as the model's full-attention layers (so vLLM puts it in their cache group,
with their block table); one slot of it holds `2 * kv_heads * head_dim` numbers, so a state of `hidden_size`
numbers takes `ceil(hidden_size / (2 * kv_heads * head_dim))` holders.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from vllm.config import CacheConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention

from parloop.config import PLTConfig


class HandoffStore(nn.Module):
    """Rows of `hidden_size` numbers per (stored loop, token slot), for loops 0..R-2."""

    def __init__(self, config: PLTConfig, cache_config: CacheConfig | None, first_layer_index: int,
                 prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads, kv_heads = config.num_attention_heads // tp, max(1, config.num_key_value_heads // tp)
        hd = config.head_dim
        self.hidden_size = config.hidden_size
        self.row = 2 * kv_heads * hd
        self.per_state = math.ceil(self.hidden_size / self.row)
        stored = config.plt_num_loops - 1
        # every holder gets its own layer index: vLLM orders KV caches by the one integer in a layer's name
        self.holders = nn.ModuleList(
            Attention(heads, hd, hd ** -0.5, num_kv_heads=kv_heads, cache_config=cache_config,
                      prefix=f"{prefix}.layers.{first_layer_index + n}.plt_handoff")
            for n in range(stored * self.per_state))

    @property
    def block_size(self) -> int:
        """Token slots per cache block, as the block table counts them."""
        return self.holders[0].kv_cache.shape[2]

    def _caches(self, loop: int) -> list[torch.Tensor]:
        return [h.kv_cache for h in self.holders[loop * self.per_state:(loop + 1) * self.per_state]]

    def metadata(self) -> object | None:
        """This step's attention metadata of the holders' cache group; None in vLLM's dummy (profiling) runs."""
        attn_metadata = get_forward_context().attn_metadata
        if not attn_metadata or not self.holders:
            return None
        if isinstance(attn_metadata, list):
            raise NotImplementedError("parloop's vLLM plugin does not support micro-batching (ubatching)")
        return attn_metadata.get(self.holders[0].layer_name)

    def write(self, loop: int, states: torch.Tensor, slots: torch.Tensor) -> None:
        """Store `states` `[T, d]` of loop `loop` at cache `slots` `[T]`. A padding token's slot is -1 (vLLM pads
        batches for CUDA graphs, and its own cache writes skip them): its row goes to slot 0, in vLLM's null block,
        which no request owns, instead of wrapping round to the last slot of the cache, which one may own."""
        slots = slots.clamp(min=0)
        padded = nn.functional.pad(states, (0, self.per_state * self.row - self.hidden_size))
        for kv, part in zip(self._caches(loop), padded.split(self.row, dim=-1), strict=True):
            block = kv.shape[2]
            kv[slots // block, :, slots % block] = part.reshape(len(slots), kv.shape[1], kv.shape[3]).to(kv.dtype)

    def read(self, loop: int, slots: torch.Tensor) -> torch.Tensor:
        """The states `[T, d]` of loop `loop` stored at cache `slots` `[T]`."""
        parts = []
        for kv in self._caches(loop):
            block = kv.shape[2]
            parts.append(kv[slots // block, :, slots % block].reshape(len(slots), self.row))
        return torch.cat(parts, dim=-1)[:, :self.hidden_size]


def previous_slots(metadata: object, positions: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the step's real tokens: the cache slot of its request's previous position, and whether it has one
    (position 0 has none: its carry is zero, docs/design.md §2)."""
    n = metadata.num_actual_tokens
    pos = positions[:n].long()
    token = torch.arange(n, device=pos.device)
    request = torch.searchsorted(metadata.query_start_loc[1:].long(), token, right=True)
    prev = (pos - 1).clamp(min=0)
    slots = metadata.block_table[request, prev // block_size].long() * block_size + prev % block_size
    return slots, pos > 0
