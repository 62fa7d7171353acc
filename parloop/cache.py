"""The keys and values a forward pass attends to.

`PLTCache` is the decoding cache of DESIGN.md section 3, per layer:
- loop 0's full cache `keys[:, 0]`, `values[:, 0]` (`[L, B, Hkv, T_max, hd]`; `sequential` mode keeps one such
  full cache per loop, `keys[:, r]`);
- `R-1` ring buffers `win_keys`, `win_values` `[L, R-1, B, Hkv, W+1, hd]` for the sliding window of loops r >= 1;
- `R-1` carried states `carries` `[R-1, B, d]` (`parallel` mode): loop r's output at the last token, which is
  loop r+1's input at the next one.

`ForwardKV` is the same interface for a forward pass without a cache (training): it only remembers loop 0's
keys of the current pass, with no copies, so gradients flow through them.

Both hand out a `Step`: what one forward call needs to know about slots (positions and masks), built once per
call and shared by every layer and loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from parloop.attention import slot_mask
from parloop.config import PLTConfig


@dataclass
class Step:
    """Slot bookkeeping of one forward call over `T` new tokens that start at slot `start`."""

    start: int
    position_ids: torch.Tensor  # [B, T] RoPE positions (count of real tokens before, per row)
    prev_valid: torch.Tensor  # [B, T, 1] is the slot before each new token a real token (carry gate)
    global_mask: torch.Tensor  # [B, 1, T, start+T] over loop 0's (or this loop's full) keys
    local_mask: torch.Tensor | None  # [B, 1, T, Tl] over this loop's window keys (G-SWA modes, R > 1)


# the batch (sequence) dimension of each per-sequence buffer
ROW_DIMS = {"keys": 2, "values": 2, "win_keys": 2, "win_values": 2, "carries": 1, "valid": 0, "real": 0}


def _positions(valid_new: torch.Tensor, real_before: torch.Tensor) -> torch.Tensor:
    return (real_before[:, None] + valid_new.long().cumsum(-1) - 1).clamp(min=0)


class ForwardKV:
    """Keys and values of a single cache-less forward pass (training, scoring)."""

    def __init__(self, config: PLTConfig, attention_mask: torch.Tensor | None, batch: int, length: int,
                 device: torch.device) -> None:
        valid = (torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None
                 else attention_mask.to(device=device, dtype=torch.bool))
        slots = torch.arange(length, device=device)
        uses_window = config.plt_num_loops > 1 and config.plt_loop_mode != "sequential"
        prev_valid = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], dim=1)
        self.step = Step(
            start=0,
            position_ids=_positions(valid, torch.zeros(batch, dtype=torch.long, device=device)),
            prev_valid=prev_valid[..., None],
            global_mask=slot_mask(slots, slots, valid),
            local_mask=slot_mask(slots, slots, valid, config.window) if uses_window else None,
        )
        self._full: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, layer: int, loop: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._full[layer, loop] = (k, v)
        return k, v

    def view(self, layer: int, loop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._full[layer, loop]

    def window(self, layer: int, first: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v


class PLTCache(Cache):
    """Decoding cache of a Parallel Loop Transformer (DESIGN.md section 3), usable with `model.generate`.

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

    # -- allocation ---------------------------------------------------------------------------------------------
    def allocate(self, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate empty buffers for `batch` sequences (done by the first forward call when not called)."""
        c = self.config
        loops, hkv, hd = c.plt_num_loops, c.num_key_value_heads, c.head_dim
        full_loops = loops if c.plt_loop_mode == "sequential" else 1
        win_loops = 0 if c.plt_loop_mode == "sequential" else loops - 1
        kw = dict(dtype=dtype, device=device)
        self.keys = torch.zeros(c.num_hidden_layers, full_loops, batch, hkv, self.capacity, hd, **kw)
        self.values = torch.zeros_like(self.keys)
        self.win_keys = torch.zeros(c.num_hidden_layers, win_loops, batch, hkv, c.window + 1, hd, **kw)
        self.win_values = torch.zeros_like(self.win_keys)
        carry_loops = loops - 1 if c.plt_loop_mode == "parallel" else 0
        self.carries = torch.zeros(carry_loops, batch, c.hidden_size, **kw)
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

    # -- per-call bookkeeping -----------------------------------------------------------------------------------
    def begin(self, attention_mask: torch.Tensor | None, batch: int, length: int, dtype: torch.dtype,
              device: torch.device) -> Step:
        """Reserve slots for `length` new tokens and build this call's positions and masks."""
        if self.keys is None:
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
        # written through index tensors so that the writes of a compiled step do not depend on Python ints
        self._slots = torch.arange(start, end, device=device)
        self._ring_entries = self._slots[-(self.config.window + 1):] % (self.config.window + 1)
        self._span = self.capacity if self.static else end
        position_ids = _positions(valid_new, self.real)
        self.real += valid_new.sum(-1)
        prev = self.valid[:, start - 1:end - 1] if start > 0 else torch.cat(
            [torch.zeros_like(valid_new[:, :1]), valid_new[:, :-1]], dim=1)
        q_slots = self._slots
        global_mask = slot_mask(q_slots, torch.arange(self._span, device=device), self.valid[:, :self._span])
        local_mask = None
        if self.win_keys.shape[1] > 0:
            ring_slots = self._ring_slots(start, device)
            ring_valid = self.valid[:, ring_slots.clamp(min=0)] & (ring_slots >= 0)
            local_slots = torch.cat([ring_slots, q_slots])
            local_mask = slot_mask(q_slots, local_slots, torch.cat([ring_valid, valid_new], dim=1),
                                   self.config.window)
        self.length = end
        return Step(start, position_ids, prev[..., None], global_mask, local_mask)

    def _ring_slots(self, start: int, device: torch.device) -> torch.Tensor:
        """The sequence slot that each ring-buffer entry holds before this call (-1: never written)."""
        size = self.config.window + 1
        entry = torch.arange(size, device=device)
        last = start - 1
        return last - torch.remainder(last - entry, size)

    # -- what the attention layers call ---------------------------------------------------------------------------
    def append(self, layer: int, loop: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys `[B, Hkv, T, hd]` of a full-cache loop; return all keys so far."""
        self.keys[layer, loop].index_copy_(2, self._slots, k)
        self.values[layer, loop].index_copy_(2, self._slots, v)
        return self.view(layer, loop)

    def view(self, layer: int, loop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer, loop, :, :, :self._span], self.values[layer, loop, :, :, :self._span]

    def window(self, layer: int, first: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New window keys `[B, S, Hkv, T, hd]` of loops `first..first+S-1` (all >= 1): return the ring's keys
        followed by the new ones (what the local branch attends to), then store the new ones in the ring."""
        streams, new = k.shape[1], k.shape[3]
        loops = slice(first - 1, first - 1 + streams)
        ring_k = self.win_keys[layer, loops].transpose(0, 1)
        ring_v = self.win_values[layer, loops].transpose(0, 1)
        keys, values = torch.cat([ring_k, k], dim=3), torch.cat([ring_v, v], dim=3)
        keep = self._ring_entries.shape[0]
        self.win_keys[layer, loops].index_copy_(3, self._ring_entries, k[:, :, :, new - keep:].transpose(0, 1))
        self.win_values[layer, loops].index_copy_(3, self._ring_entries, v[:, :, :, new - keep:].transpose(0, 1))
        return keys, values

    # -- transformers Cache API -----------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is None:
            return
        for name, dim in ROW_DIMS.items():
            tensor = getattr(self, name)
            setattr(self, name, tensor.index_select(dim, beam_idx.to(tensor.device)))

    # -- rows and slots, for continuous batching (parloop.engine) ---------------------------------------------------
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
