"""The keys, values and carried states a forward pass reads and writes, behind one contract (`KVStore`).

`PLTCache` is the decoding cache of design §3, per layer:
- the full caches `keys`, `values` `[L, F, B, Hkv, T_max, hd]`: loop 0's (F = 1), or every loop's in `sequential`
  mode (F = R);
- `R-1` ring buffers `win_keys`, `win_values` `[L, R-1, B, Hkv, W+1, hd]` for the sliding window of loops r >= 1;
- `R-1` carried states `carries` `[R-1, B, d]` (`parallel` mode): loop r's handoff state at the last token, which is
  loop r+1's input at the next one.

`ForwardKV` is the same contract for a forward pass without a cache (training, scoring): it only remembers the keys
of the current pass, with no copies, so gradients flow through them; its carries are zero (a sequence's start).

A store keeps buffers only. Each forward call starts with `begin()`, which returns the call's own object (a
`StoreCall`): the call's slot bookkeeping (`Step`: positions, masks, where new keys go) and every piece of per-call
state (keys that carry gradients, the undo record, zero carries), with the reads and writes of that call. The model
passes that one object to every layer. Which buffers exist comes from `PLTConfig.loop_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers.cache_utils import Cache

from parloop.attention import slot_mask
from parloop.config import PLTConfig
from parloop.journal import CallRecord, UndoJournal

KV = tuple[torch.Tensor, torch.Tensor]

# every buffer of a PLTCache and its batch (sequence) dimension
ROW_DIMS = {"keys": 2, "values": 2, "win_keys": 2, "win_values": 2, "carries": 1, "valid": 0, "real": 0}


@dataclass(frozen=True)
class Step:
    """Slot bookkeeping of one forward call over `T` new tokens that start at slot `start` (read-only)."""

    start: int
    position_ids: torch.Tensor  # [B, T] RoPE positions (count of real tokens before, per row)
    prev_valid: torch.Tensor  # [B, T, 1] is the slot before each new token a real token (carry gate)
    global_mask: torch.Tensor  # [B, 1, T, span] over loop 0's (or this loop's full) keys
    local_mask: torch.Tensor | None  # [B, 1, T, Tl] over this loop's window keys (G-SWA loops only)
    slots: torch.Tensor  # [T] the slots the new tokens are written to (index tensor: no Python ints in a compiled step)
    ring_entries: torch.Tensor | None  # ring entries the last W+1 new tokens are written to (G-SWA loops only)
    span: int  # full-cache slots attended to (all capacity for a static cache)
    static: bool  # shapes are fixed across calls (a static cache): the step may run compiled


class StoreCall:
    """One forward call's view of a store: its `Step` and the reads and writes the model makes during the call.

    Full-cache keys/values written in this call that carry gradients are kept here, by (layer, loop): later loops of
    the same call read these, so that gradients reach them (a cache's buffers hold constants).
    """

    def __init__(self, step: Step) -> None:
        self.step = step
        self.fresh: dict[tuple[int, int], KV] = {}

    def append(self, layer: int, loop: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Write the new keys/values `[B, Hkv, T, hd]` of a full-cache loop; return all of them so far."""
        raise NotImplementedError

    def read(self, layer: int, loop: int) -> KV:
        """The keys/values of full-cache loop `loop` (loop 0 for the global branch of G-SWA)."""
        raise NotImplementedError

    def window(self, layer: int, first: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        """New window keys `[B, S, Hkv, T, hd]` of loops `first..first+S-1` (>= 1): return what their local branch
        attends to (earlier window keys, then the new ones) and keep the new ones for later calls."""
        raise NotImplementedError

    def read_carries(self, loops: slice) -> torch.Tensor:
        """Carried states `[n, B, d]` of the loops in `loops` (index r: loop r's state at the slot before)."""
        raise NotImplementedError

    def write_carries(self, loops: slice, states: torch.Tensor) -> None:
        """Handoff states `[n, B, T, d]` of every new token: the last one is the next call's carry."""
        raise NotImplementedError

    def buffers(self) -> list[torch.Tensor]:
        """The store's tensors this call writes in place (what a CUDA graph must find at a fixed address)."""
        return []


class KVStore(Protocol):
    """What the model needs from the store of keys, values and carried states (design §3)."""

    def begin(self, attention_mask: torch.Tensor | None, batch: int, length: int, dtype: torch.dtype,
              device: torch.device) -> StoreCall:
        """Reserve room for `length` new tokens; return the call's positions, masks, reads and writes."""


def _positions(valid_new: torch.Tensor, real_before: torch.Tensor) -> torch.Tensor:
    return (real_before[:, None] + valid_new.long().cumsum(-1) - 1).clamp(min=0)


class ForwardCall(StoreCall):
    """A cache-less pass: keys live in the call, carries are zero (every row starts its sequence here)."""

    def __init__(self, step: Step, zeros: torch.Tensor) -> None:
        super().__init__(step)
        self.zeros = zeros

    def append(self, layer: int, loop: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        self.fresh[layer, loop] = (k, v)
        return k, v

    def read(self, layer: int, loop: int) -> KV:
        return self.fresh[layer, loop]

    def window(self, layer: int, first: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        return k, v

    def read_carries(self, loops: slice) -> torch.Tensor:
        return self.zeros[loops]

    def write_carries(self, loops: slice, states: torch.Tensor) -> None:
        pass  # nothing follows a cache-less pass


class ForwardKV:
    """The `KVStore` of a single cache-less forward pass (training, scoring): it holds no buffer at all."""

    def __init__(self, config: PLTConfig) -> None:
        self.config = config

    def begin(self, attention_mask: torch.Tensor | None, batch: int, length: int, dtype: torch.dtype,
              device: torch.device) -> ForwardCall:
        valid = (torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None
                 else attention_mask.to(device=device, dtype=torch.bool))
        slots = torch.arange(length, device=device)
        prev_valid = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], dim=1)
        layout = self.config.loop_layout
        zeros = torch.zeros(layout.carry_loops, batch, self.config.hidden_size, dtype=dtype, device=device)
        step = Step(start=0, position_ids=_positions(valid, torch.zeros(batch, dtype=torch.long, device=device)),
                    prev_valid=prev_valid[..., None], global_mask=slot_mask(slots, slots, valid),
                    local_mask=slot_mask(slots, slots, valid, self.config.window) if layout.gated else None,
                    slots=slots, ring_entries=None, span=length, static=False)
        return ForwardCall(step, zeros)


class CacheCall(StoreCall):
    """One forward call on a `PLTCache`: writes go into its buffers, and into `record` when the call may be undone."""

    def __init__(self, step: Step, cache: PLTCache, record: CallRecord | None) -> None:
        super().__init__(step)
        self.cache = cache
        self.record = record

    def append(self, layer: int, loop: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        step, cache = self.step, self.cache
        cache.keys[layer, loop].index_copy_(2, step.slots, k.detach())
        cache.values[layer, loop].index_copy_(2, step.slots, v.detach())
        keys, values = self.read(layer, loop)
        if k.requires_grad and torch.is_grad_enabled():
            # the buffers hold constants; the new keys keep their graph, so gradients reach them as without a cache
            end = step.start + k.shape[2]
            keys = torch.cat([keys[:, :, :step.start], k, keys[:, :, end:]], dim=2)
            values = torch.cat([values[:, :, :step.start], v, values[:, :, end:]], dim=2)
            self.fresh[layer, loop] = (keys, values)
        return keys, values

    def read(self, layer: int, loop: int) -> KV:
        if (layer, loop) in self.fresh:
            return self.fresh[layer, loop]
        span = self.step.span
        return self.cache.keys[layer, loop, :, :, :span], self.cache.values[layer, loop, :, :, :span]

    def window(self, layer: int, first: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        cache, entries = self.cache, self.step.ring_entries
        streams, new = k.shape[1], k.shape[3]
        loops = slice(first - 1, first - 1 + streams)
        ring_k = cache.win_keys[layer, loops].transpose(0, 1)
        ring_v = cache.win_values[layer, loops].transpose(0, 1)
        keys, values = torch.cat([ring_k, k], dim=3), torch.cat([ring_v, v], dim=3)
        if self.record is not None:
            self.record.record_window(layer, loops, (cache.win_keys[layer], cache.win_values[layer]), k, v)
        keep = entries.shape[0]
        cache.win_keys[layer, loops].index_copy_(3, entries, k[:, :, :, new - keep:].transpose(0, 1).detach())
        cache.win_values[layer, loops].index_copy_(3, entries, v[:, :, :, new - keep:].transpose(0, 1).detach())
        return keys, values

    def read_carries(self, loops: slice) -> torch.Tensor:
        return self.cache.carries[loops]

    def write_carries(self, loops: slice, states: torch.Tensor) -> None:
        self.cache.carries[loops] = states[:, :, -1].detach()
        if self.record is not None:
            self.record.record_handoffs(loops, states)

    def buffers(self) -> list[torch.Tensor]:
        return list(self.cache.buffers().values())


class PLTCache(Cache):
    """Decoding cache of a Parallel Loop Transformer (design §3), usable with `model.generate`.

    Buffers are allocated at the first forward call (when batch size, dtype and device are known) with room for
    `max_length` slots, and grow by doubling if a call needs more, so decoding allocates nothing per step.

    With `static=True` attention always spans the whole preallocated capacity (unwritten slots are masked), so
    every decode step has the same shapes and `torch.compile` compiles it once.
    """

    is_compileable = False

    def __init__(self, config: PLTConfig, max_length: int = 256, static: bool = False) -> None:
        super().__init__(layers=[])
        self.config = config
        self.capacity = max(1, int(max_length))
        self.static = static
        self.length = 0
        self.journal = UndoJournal()  # what calls overwrote, so that `crop` can undo them
        # the buffers (see the module docstring); None until the first forward call or `allocate`
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.win_keys: torch.Tensor | None = None
        self.win_values: torch.Tensor | None = None
        self.carries: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None  # [B, T_max] which slots hold real tokens
        self.real: torch.Tensor | None = None  # [B] real tokens per row

    # -- buffers --------------------------------------------------------------------------------------------------
    def allocate(self, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate empty buffers for `batch` sequences (done by the first forward call when not called)."""
        c, layout = self.config, self.config.loop_layout
        hkv, hd, layers = c.num_key_value_heads, c.head_dim, c.num_hidden_layers
        kw = dict(dtype=dtype, device=device)
        self.keys = torch.zeros(layers, layout.full_cache_loops, batch, hkv, self.capacity, hd, **kw)
        self.values = torch.zeros_like(self.keys)
        self.win_keys = torch.zeros(layers, layout.window_loops, batch, hkv, c.window + 1, hd, **kw)
        self.win_values = torch.zeros_like(self.win_keys)
        self.carries = torch.zeros(layout.carry_loops, batch, c.hidden_size, **kw)
        self.valid = torch.zeros(batch, self.capacity, dtype=torch.bool, device=device)
        self.real = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def allocated(self) -> bool:
        return self.keys is not None

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every buffer the cache holds, by name (empty when none is allocated)."""
        return {name: getattr(self, name) for name in ROW_DIMS if getattr(self, name) is not None}

    def reset(self) -> None:
        """Forget every token and release every buffer (the next forward call allocates anew)."""
        for name in ROW_DIMS:
            setattr(self, name, None)
        self.length = 0
        self.journal.clear()

    def reserve(self, needed: int) -> None:
        """Make room for at least `needed` slots (doubling, so growth is amortised)."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        pad = new_cap - self.capacity
        self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, pad))
        self.values = torch.nn.functional.pad(self.values, (0, 0, 0, pad))
        self.valid = torch.nn.functional.pad(self.valid, (0, pad))
        self.capacity = new_cap

    @property
    def batch_size(self) -> int:
        return self.keys.shape[2] if self.allocated else 0

    # -- the KVStore contract -------------------------------------------------------------------------------------
    def begin(self, attention_mask: torch.Tensor | None, batch: int, length: int, dtype: torch.dtype,
              device: torch.device) -> CacheCall:
        """Reserve slots for `length` new tokens and build this call's positions and masks."""
        if not self.allocated:
            self.allocate(batch, dtype, device)
        elif batch != self.batch_size:
            raise ValueError(f"PLTCache holds {self.batch_size} sequences but the input has {batch}; use a new "
                             "cache (or reorder_cache) for a different batch")
        start, end = self.length, self.length + length
        self.reserve(end)
        if attention_mask is None:
            valid_new = torch.ones(batch, length, dtype=torch.bool, device=device)
        else:
            # transformers passes the mask of the whole sequence (past + new); a mask of the new tokens also works
            valid_new = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        self.valid[:, start:end] = valid_new
        slots = torch.arange(start, end, device=device)
        span = self.capacity if self.static else end
        position_ids = _positions(valid_new, self.real)
        self.real += valid_new.sum(-1)
        prev = self.valid[:, start - 1:end - 1] if start > 0 else torch.cat(
            [torch.zeros_like(valid_new[:, :1]), valid_new[:, :-1]], dim=1)
        global_mask = slot_mask(slots, torch.arange(span, device=device), self.valid[:, :span])
        local_mask = ring_entries = None
        if self.config.loop_layout.gated:
            ring_slots = self._ring_slots(start, device)
            ring_valid = self.valid[:, ring_slots.clamp(min=0)] & (ring_slots >= 0)
            local_mask = slot_mask(slots, torch.cat([ring_slots, slots]), torch.cat([ring_valid, valid_new], dim=1),
                                   self.config.window)
            ring_entries = slots[-(self.config.window + 1):] % (self.config.window + 1)
        self.length = end
        step = Step(start, position_ids, prev[..., None], global_mask, local_mask, slots, ring_entries, span,
                    self.static)
        return CacheCall(step, self, self.journal.open(start, length, ring_entries, self.carries))

    def _ring_slots(self, start: int, device: torch.device) -> torch.Tensor:
        """The sequence slot that each ring-buffer entry holds before this call (-1: never written)."""
        size = self.config.window + 1
        entry = torch.arange(size, device=device)
        last = start - 1
        return last - torch.remainder(last - entry, size)

    # -- transformers Cache API -----------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def __len__(self) -> int:
        return self.config.num_hidden_layers if self.allocated else 0

    def __getitem__(self, layer: int) -> KV:
        """Loop 0's keys and values of `layer` so far, `[B, Hkv, T, hd]` each (as `DynamicCache[layer]`)."""
        if not self.allocated or not 0 <= layer < len(self):
            raise IndexError(f"PLTCache has {len(self)} layers (allocated at the first forward call); asked {layer}")
        return self.keys[layer, 0, :, :, :self.length], self.values[layer, 0, :, :, :self.length]

    @property
    def is_croppable(self) -> bool:
        return True

    def activate_past_recording(self) -> None:
        """Keep what each later forward call overwrites until the next `crop`, which can then undo those calls
        (what transformers' assisted decoding and deferred stop checks do)."""
        self.journal.active = True

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (a negative int, as for transformers' caches): slots, window
        rings and carried states go back to what they were after the last kept token. `crop(0)` removes nothing.
        The recorded past is released either way."""
        if tokens_to_remove > 0:
            raise ValueError(f"PLTCache.crop({tokens_to_remove}): pass a negative number of tokens to remove")
        keep = self.length + tokens_to_remove
        if keep < 0:
            raise ValueError(f"PLTCache.crop({tokens_to_remove}): the cache holds only {self.length} tokens")
        if keep < self.length:
            layout = self.config.loop_layout
            if layout.gated or layout.offset:  # with full caches only, dropping slots is enough
                self.journal.undo_to(keep, self.win_keys, self.win_values, self.carries)
            removed = self.valid[:, keep:self.length]
            self.real -= removed.sum(-1)
            removed.zero_()
            self.length = keep
        self.journal.clear()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every sequence `repeats` times in place (as transformers' caches do for num_return_sequences)."""
        if self.allocated:
            self.reorder_cache(torch.arange(self.batch_size, device=self.valid.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences `indices`, in that order."""
        if self.allocated:
            self.reorder_cache(torch.as_tensor(indices, device=self.valid.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.allocated:
            return
        self.journal.clear()  # rows changed: the recorded past no longer matches them
        for name, dim in ROW_DIMS.items():
            tensor = getattr(self, name)
            setattr(self, name, tensor.index_select(dim, beam_idx.to(tensor.device)))

    # -- size -----------------------------------------------------------------------------------------------------
    def kv_cache_bytes(self) -> int:
        """Bytes of keys and values held for the tokens seen so far (all layers, all sequences): loop 0's (or
        every loop's) full cache up to the current length, plus the filled part of each window ring."""
        return self.batch_size * self.sequence_kv_bytes(self.length)

    def sequence_kv_bytes(self, tokens: int) -> int:
        """Bytes of keys and values that one sequence of `tokens` tokens holds, read off the buffers' shapes."""
        if not self.allocated:
            return 0
        layers, full_loops, _, kv_heads, _, head_dim = self.keys.shape
        win_loops, ring = self.win_keys.shape[1], self.win_keys.shape[-2]
        per_token = 2 * layers * kv_heads * head_dim * self.keys.element_size()
        return per_token * (full_loops * tokens + win_loops * min(tokens, ring))
