"""The keys, values and carried states a forward pass reads and writes, behind one contract (`KVStore`).

`PLTCache` is the decoding cache of design §3, per layer:
- the full caches `keys`, `values` `[L, F, B, Hkv, T_max, hd]`: loop 0's (F = 1), or every loop's in `sequential`
  mode (F = R);
- `R-1` ring buffers `win_keys`, `win_values` `[L, R-1, B, Hkv, W+1, hd]` for the sliding window of loops r >= 1;
- `R-1` carried states `carries` `[R-1, B, d]` (`parallel` mode): loop r's handoff state at the last token, which is
  loop r+1's input at the next one.

`ForwardKV` is the same contract for a forward pass without a cache (training, scoring): it only remembers the keys
of the current pass, with no copies, so gradients flow through them; its carries are zero (a sequence's start).

Both hand out a `Step` from `begin()`: everything one forward call needs to know about slots (positions, masks, where
new keys go), built once per call and shared by every layer and loop. The stores keep buffers only; per-call state
lives in the `Step`, which the model passes back on every read and write. Which buffers exist comes from
`PLTConfig.loop_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers.cache_utils import Cache

from parloop.attention import slot_mask
from parloop.config import PLTConfig

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Step:
    """Slot bookkeeping of one forward call over `T` new tokens that start at slot `start`."""

    start: int
    position_ids: torch.Tensor  # [B, T] RoPE positions (count of real tokens before, per row)
    prev_valid: torch.Tensor  # [B, T, 1] is the slot before each new token a real token (carry gate)
    global_mask: torch.Tensor  # [B, 1, T, span] over loop 0's (or this loop's full) keys
    local_mask: torch.Tensor | None  # [B, 1, T, Tl] over this loop's window keys (G-SWA loops only)
    slots: torch.Tensor  # [T] the slots the new tokens are written to (index tensor: no Python ints in a compiled step)
    ring_entries: torch.Tensor | None  # ring entries the last W+1 new tokens are written to (G-SWA loops only)
    span: int  # full-cache slots attended to (all capacity for a static cache)
    static: bool  # shapes are fixed across calls (a static cache): the step may run compiled
    # full-cache keys/values written in this call that carry gradients, by (layer, loop): later loops of the same
    # call read these, so that gradients reach them (a cache's buffers hold constants)
    fresh: dict[tuple[int, int], KV] = field(default_factory=dict)


@dataclass
class _Undo:
    """What one forward call changed in the window rings and carries, so that `PLTCache.crop` can take it back."""

    start: int
    length: int
    ring_entries: torch.Tensor | None
    old_ring: dict[int, KV]  # layer -> the ring entries this call overwrote [R-1, B, Hkv, n, hd]
    new_window: dict[int, KV]  # layer -> this call's window keys of every new token [R-1, B, Hkv, T, hd]
    old_carries: torch.Tensor  # [R-1, B, d] before the call
    handoffs: torch.Tensor | None = None  # [R-1, B, T, d] handoff states of every new token


class KVStore(Protocol):
    """What the model needs from the store of keys, values and carried states (design §3)."""

    def begin(self, attention_mask: torch.Tensor | None, batch: int, length: int, dtype: torch.dtype,
              device: torch.device) -> Step:
        """Reserve room for `length` new tokens; return their positions and masks."""

    def append(self, step: Step, layer: int, loop: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Write the new keys/values `[B, Hkv, T, hd]` of a full-cache loop; return all of them so far."""

    def read(self, step: Step, layer: int, loop: int) -> KV:
        """The keys/values of full-cache loop `loop` (loop 0 for the global branch of G-SWA)."""

    def window(self, step: Step, layer: int, first: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        """New window keys `[B, S, Hkv, T, hd]` of loops `first..first+S-1` (>= 1): return what their local branch
        attends to (earlier window keys, then the new ones) and keep the new ones for later calls."""

    def read_carries(self, loops: slice) -> torch.Tensor:
        """Carried states `[n, B, d]` of the loops in `loops` (index r: loop r's state at the slot before)."""

    def write_carries(self, loops: slice, states: torch.Tensor) -> None:
        """Handoff states `[n, B, T, d]` of every new token: the last one is the next call's carry."""


# the batch (sequence) dimension of each per-sequence buffer
ROW_DIMS = {"keys": 2, "values": 2, "win_keys": 2, "win_values": 2, "carries": 1, "valid": 0, "real": 0}


def _positions(valid_new: torch.Tensor, real_before: torch.Tensor) -> torch.Tensor:
    return (real_before[:, None] + valid_new.long().cumsum(-1) - 1).clamp(min=0)


class ForwardKV:
    """The `KVStore` of a single cache-less forward pass (training, scoring): keys live in the call's `Step`."""

    def __init__(self, config: PLTConfig) -> None:
        self.config = config
        self._zeros: torch.Tensor | None = None

    def begin(self, attention_mask: torch.Tensor | None, batch: int, length: int, dtype: torch.dtype,
              device: torch.device) -> Step:
        valid = (torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None
                 else attention_mask.to(device=device, dtype=torch.bool))
        slots = torch.arange(length, device=device)
        prev_valid = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], dim=1)
        layout = self.config.loop_layout
        self._zeros = torch.zeros(layout.carry_loops, batch, self.config.hidden_size, dtype=dtype, device=device)
        return Step(start=0, position_ids=_positions(valid, torch.zeros(batch, dtype=torch.long, device=device)),
                    prev_valid=prev_valid[..., None], global_mask=slot_mask(slots, slots, valid),
                    local_mask=slot_mask(slots, slots, valid, self.config.window) if layout.gated else None,
                    slots=slots, ring_entries=None, span=length, static=False)

    def append(self, step: Step, layer: int, loop: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        step.fresh[layer, loop] = (k, v)
        return k, v

    def read(self, step: Step, layer: int, loop: int) -> KV:
        return step.fresh[layer, loop]

    def window(self, step: Step, layer: int, first: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        return k, v

    def read_carries(self, loops: slice) -> torch.Tensor:
        return self._zeros[loops]

    def write_carries(self, loops: slice, states: torch.Tensor) -> None:
        pass  # nothing follows a cache-less pass


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
        self.keys: torch.Tensor | None = None
        self.record_past = False  # keep what each call overwrites, so that `crop` can undo it
        self._journal: list[_Undo] = []

    # -- allocation ---------------------------------------------------------------------------------------------
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
        return 0 if self.keys is None else self.keys.shape[2]

    # -- the KVStore contract -------------------------------------------------------------------------------------
    def begin(self, attention_mask: torch.Tensor | None, batch: int, length: int, dtype: torch.dtype,
              device: torch.device) -> Step:
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
        if self.record_past:
            self._journal.append(_Undo(start, length, ring_entries, {}, {}, self.carries.clone()))
        return Step(start, position_ids, prev[..., None], global_mask, local_mask, slots, ring_entries, span,
                    self.static)

    def _ring_slots(self, start: int, device: torch.device) -> torch.Tensor:
        """The sequence slot that each ring-buffer entry holds before this call (-1: never written)."""
        size = self.config.window + 1
        entry = torch.arange(size, device=device)
        last = start - 1
        return last - torch.remainder(last - entry, size)

    def append(self, step: Step, layer: int, loop: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        self.keys[layer, loop].index_copy_(2, step.slots, k.detach())
        self.values[layer, loop].index_copy_(2, step.slots, v.detach())
        keys, values = self.read(step, layer, loop)
        if k.requires_grad and torch.is_grad_enabled():
            # the buffers hold constants; the new keys keep their graph, so gradients reach them as without a cache
            end = step.start + k.shape[2]
            keys = torch.cat([keys[:, :, :step.start], k, keys[:, :, end:]], dim=2)
            values = torch.cat([values[:, :, :step.start], v, values[:, :, end:]], dim=2)
            step.fresh[layer, loop] = (keys, values)
        return keys, values

    def read(self, step: Step, layer: int, loop: int) -> KV:
        if (layer, loop) in step.fresh:
            return step.fresh[layer, loop]
        return self.keys[layer, loop, :, :, :step.span], self.values[layer, loop, :, :, :step.span]

    def window(self, step: Step, layer: int, first: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        streams, new = k.shape[1], k.shape[3]
        loops = slice(first - 1, first - 1 + streams)
        ring_k = self.win_keys[layer, loops].transpose(0, 1)
        ring_v = self.win_values[layer, loops].transpose(0, 1)
        keys, values = torch.cat([ring_k, k], dim=3), torch.cat([ring_v, v], dim=3)
        keep = step.ring_entries.shape[0]
        if self.record_past:
            self._record_window(layer, loops, k, v)
        self.win_keys[layer, loops].index_copy_(3, step.ring_entries, k[:, :, :, new - keep:].transpose(0, 1).detach())
        self.win_values[layer, loops].index_copy_(3, step.ring_entries,
                                                  v[:, :, :, new - keep:].transpose(0, 1).detach())
        return keys, values

    def read_carries(self, loops: slice) -> torch.Tensor:
        return self.carries[loops]

    def write_carries(self, loops: slice, states: torch.Tensor) -> None:
        self.carries[loops] = states[:, :, -1].detach()
        if self.record_past:
            undo = self._journal[-1]
            if undo.handoffs is None:
                undo.handoffs = torch.zeros(*self.carries.shape[:2], states.shape[2], self.carries.shape[-1],
                                            dtype=states.dtype, device=states.device)
            undo.handoffs[loops] = states.detach()

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
        self.record_past = True

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
            self._undo_to(keep)
            removed = self.valid[:, keep:self.length]
            self.real -= removed.sum(-1)
            removed.zero_()
            self.length = keep
        self._journal.clear()

    def _undo_to(self, keep: int) -> None:
        layout = self.config.loop_layout
        if not (layout.gated or layout.offset):
            return  # full caches only: dropping slots is enough
        if not self._journal or self._journal[0].start > keep:
            raise RuntimeError(f"PLTCache cannot go back to {keep} tokens: the window rings and carried states of "
                               "later tokens were not recorded; call cache.activate_past_recording() before the "
                               "forward calls that may be undone")
        while self._journal and self._journal[-1].start >= keep:
            self._restore(self._journal.pop())
        if self._journal and keep < self._journal[-1].start + self._journal[-1].length:
            undo = self._journal.pop()
            self._restore(undo)
            self._replay(undo, keep)

    def _restore(self, undo: _Undo) -> None:
        for layer, (k, v) in undo.old_ring.items():
            self.win_keys[layer].index_copy_(3, undo.ring_entries, k)
            self.win_values[layer].index_copy_(3, undo.ring_entries, v)
        self.carries.copy_(undo.old_carries)

    def _replay(self, undo: _Undo, keep: int) -> None:
        """Redo the part of `undo`'s call that stays: its tokens before slot `keep`."""
        size = self.config.window + 1
        first = max(undo.start, keep - size)
        entries = torch.arange(first, keep, device=self.valid.device) % size
        for layer, (k, v) in undo.new_window.items():
            self.win_keys[layer].index_copy_(3, entries, k[:, :, :, first - undo.start:keep - undo.start])
            self.win_values[layer].index_copy_(3, entries, v[:, :, :, first - undo.start:keep - undo.start])
        if undo.handoffs is not None:
            self.carries.copy_(undo.handoffs[:, :, keep - 1 - undo.start])

    def _record_window(self, layer: int, loops: slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """Journal the ring entries this call overwrites and its own window keys (all loops of a call come in one
        `window` call in a stacked step, or loop by loop otherwise)."""
        undo = self._journal[-1]
        if layer not in undo.old_ring:
            undo.old_ring[layer] = (self.win_keys[layer].index_select(3, undo.ring_entries),
                                    self.win_values[layer].index_select(3, undo.ring_entries))
            shape = list(self.win_keys[layer].shape)
            shape[3] = undo.length
            undo.new_window[layer] = (self.win_keys.new_zeros(shape), self.win_values.new_zeros(shape))
        new_k, new_v = undo.new_window[layer]
        new_k[loops] = k.transpose(0, 1).detach()
        new_v[loops] = v.transpose(0, 1).detach()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every sequence `repeats` times in place (as transformers' caches do for num_return_sequences)."""
        if self.allocated:
            self.reorder_cache(torch.arange(self.batch_size, device=self.valid.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences `indices`, in that order."""
        if self.allocated:
            self.reorder_cache(torch.as_tensor(indices, device=self.valid.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is None:
            return
        self._journal.clear()  # rows changed: the recorded past no longer matches them
        for name, dim in ROW_DIMS.items():
            tensor = getattr(self, name)
            setattr(self, name, tensor.index_select(dim, beam_idx.to(tensor.device)))

    # -- rows and slots, for continuous batching (parloop/inference/runner.py) -----------------------------------
    def resize_rows(self, rows: int) -> None:
        """Hold exactly `rows` sequences: keep the first ones, add empty (all-pad) rows at the end."""
        for name, dim in ROW_DIMS.items():
            tensor = getattr(self, name)
            have = tensor.shape[dim]
            if rows <= have:
                tensor = tensor.narrow(dim, 0, rows).clone()
            else:
                shape = list(tensor.shape)
                shape[dim] = rows - have
                tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
            setattr(self, name, tensor)

    def shift_slots(self, delta: int) -> None:
        """Move every row's tokens `delta` slots right (left when negative); what moves in from the left is padding.

        Only slot differences enter the masks and positions count real tokens, so a shift changes no result. The
        window rings hold slot p at entry p % (W+1): shifting the slot axis by delta rotates every ring by delta.
        """
        old, new = self.length, self.length + delta
        if new < 0:
            raise ValueError(f"cannot shift {old} slots by {delta}")
        self.reserve(new)
        keep = min(old, new)
        src, dst = slice(old - keep, old), slice(new - keep, new)
        for name in ("keys", "values"):
            tensor = getattr(self, name)
            moved = tensor[..., src, :].clone()
            tensor[..., :new, :] = 0
            tensor[..., dst, :] = moved
        moved = self.valid[:, src].clone()
        self.valid[:, :max(old, new)] = False
        self.valid[:, dst] = moved
        size = self.win_keys.shape[-2]
        self.win_keys = torch.roll(self.win_keys, delta % size, dims=-2)
        self.win_values = torch.roll(self.win_values, delta % size, dims=-2)
        self.length = new

    def clear_row(self, row: int) -> None:
        """Make `row` empty: every slot padding, zero keys, values, windows and carries."""
        for name, dim in ROW_DIMS.items():
            getattr(self, name).select(dim, row).zero_()

    def insert_row(self, row: int, src: PLTCache, src_row: int) -> None:
        """Copy sequence `src_row` of `src` (a left-padded prefill cache) into `row`, its last token in this cache's
        last slot; this cache is shifted right first when the sequence is longer than its slot span."""
        n = int(src.real[src_row])
        if n > self.length:
            self.shift_slots(n - self.length)
        self.clear_row(row)
        end, src_end = self.length, src.length
        self.keys[:, :, row, :, end - n:end] = src.keys[:, :, src_row, :, src_end - n:src_end]
        self.values[:, :, row, :, end - n:end] = src.values[:, :, src_row, :, src_end - n:src_end]
        self.valid[row, end - n:end] = True
        self.real[row] = n
        self.carries[:, row] = src.carries[:, src_row]
        # ring entry e of src holds src slot p = e mod (W+1), which is slot p + (end - src_end) here
        offset = (end - src_end) % self.win_keys.shape[-2]
        self.win_keys[:, :, row] = torch.roll(src.win_keys[:, :, src_row], offset, dims=-2)
        self.win_values[:, :, row] = torch.roll(src.win_values[:, :, src_row], offset, dims=-2)

    def compact(self) -> None:
        """Drop the leading slots that are padding in every row (rows that finished or were freed)."""
        used = self.valid[:, :self.length].any(0)
        first = int(used.int().argmax()) if bool(used.any()) else self.length
        if first > 0:
            self.shift_slots(-first)

    def kv_bytes_in_use(self) -> int:
        """Bytes of keys and values the rows' real tokens occupy (what a full cache would hold per sequence)."""
        if not self.allocated:
            return 0
        return sum(self.sequence_kv_bytes(n) for n in self.real.tolist())

    @property
    def allocated(self) -> bool:
        return self.keys is not None

    def reset(self) -> None:
        self.length = 0
        self.keys = None
        self._journal.clear()

    # -- size -----------------------------------------------------------------------------------------------------
    def kv_cache_bytes(self) -> int:
        """Bytes of keys and values held for the tokens seen so far (all layers, all sequences): loop 0's (or
        every loop's) full cache up to the current length, plus the filled part of each window ring."""
        return self.batch_size * self.sequence_kv_bytes(self.length)

    def sequence_kv_bytes(self, tokens: int) -> int:
        """Bytes of keys and values that one sequence of `tokens` tokens holds, read off the buffers' shapes."""
        if self.keys is None:
            return 0
        layers, full_loops, _, kv_heads, _, head_dim = self.keys.shape
        win_loops, ring = self.win_keys.shape[1], self.win_keys.shape[-2]
        per_token = 2 * layers * kv_heads * head_dim * self.keys.element_size()
        return per_token * (full_loops * tokens + win_loops * min(tokens, ring))
