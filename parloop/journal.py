"""What forward calls overwrote in a cache's window rings and carried states, so that `PLTCache.crop` can undo them.

Full caches need no journal: dropping slots undoes them. Window rings and carries are overwritten in place, so a
call that may be undone (transformers' assisted decoding, deferred stop checks) first records what it overwrites and
what it wrote; `UndoJournal.undo_to` puts the old entries back and replays the part of a call that stays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CallRecord:
    """What one forward call over `length` tokens from slot `start` changed in the window rings and carries."""

    start: int
    length: int
    ring_entries: torch.Tensor | None
    old_carries: torch.Tensor  # [R-1, B, d] before the call
    old_ring: dict[int, KV] = field(default_factory=dict)  # layer -> ring entries overwritten [R-1, B, Hkv, n, hd]
    new_window: dict[int, KV] = field(default_factory=dict)  # layer -> the call's window keys [R-1, B, Hkv, T, hd]
    handoffs: torch.Tensor | None = None  # [R-1, B, T, d] handoff states of every new token

    def record_window(self, layer: int, loops: slice, ring: KV, k: torch.Tensor, v: torch.Tensor) -> None:
        """Before `k`, `v` `[B, S, Hkv, T, hd]` (window keys of `loops`) go into `ring` (the layer's rings, all
        loops): keep the entries they overwrite and the keys themselves. All loops of a call come in one call in a
        stacked step, or loop by loop otherwise."""
        if layer not in self.old_ring:
            self.old_ring[layer] = (ring[0].index_select(3, self.ring_entries),
                                    ring[1].index_select(3, self.ring_entries))
            shape = list(ring[0].shape)
            shape[3] = self.length
            self.new_window[layer] = (ring[0].new_zeros(shape), ring[1].new_zeros(shape))
        new_k, new_v = self.new_window[layer]
        new_k[loops] = k.transpose(0, 1).detach()
        new_v[loops] = v.transpose(0, 1).detach()

    def record_handoffs(self, loops: slice, states: torch.Tensor) -> None:
        """Handoff states `[n, B, T, d]` of the loops in `loops`: the carry after each token of the call."""
        if self.handoffs is None:
            loops_total, batch, dim = self.old_carries.shape
            self.handoffs = states.new_zeros(loops_total, batch, states.shape[2], dim)
        self.handoffs[loops] = states.detach()


class UndoJournal:
    """The records of the forward calls since the last `clear`, kept while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.records: list[CallRecord] = []

    def open(self, start: int, length: int, ring_entries: torch.Tensor | None,
             carries: torch.Tensor) -> CallRecord | None:
        """A new record for a call (None when the journal is not active)."""
        if not self.active:
            return None
        record = CallRecord(start, length, ring_entries, carries.clone())
        self.records.append(record)
        return record

    def clear(self) -> None:
        self.records.clear()

    def undo_to(self, keep: int, win_keys: torch.Tensor, win_values: torch.Tensor, carries: torch.Tensor) -> None:
        """Put rings and carries (in place) back to what they were after the first `keep` tokens."""
        if not self.records or self.records[0].start > keep:
            raise RuntimeError(f"PLTCache cannot go back to {keep} tokens: the window rings and carried states of "
                               "later tokens were not recorded; call cache.activate_past_recording() before the "
                               "forward calls that may be undone")
        while self.records and self.records[-1].start >= keep:
            self._restore(self.records.pop(), win_keys, win_values, carries)
        last = self.records[-1] if self.records else None
        if last is not None and keep < last.start + last.length:
            self._restore(self.records.pop(), win_keys, win_values, carries)
            self._replay(last, keep, win_keys, win_values, carries)

    @staticmethod
    def _restore(record: CallRecord, win_keys: torch.Tensor, win_values: torch.Tensor,
                 carries: torch.Tensor) -> None:
        for layer, (k, v) in record.old_ring.items():
            win_keys[layer].index_copy_(3, record.ring_entries, k)
            win_values[layer].index_copy_(3, record.ring_entries, v)
        carries.copy_(record.old_carries)

    @staticmethod
    def _replay(record: CallRecord, keep: int, win_keys: torch.Tensor, win_values: torch.Tensor,
                carries: torch.Tensor) -> None:
        """Redo the part of `record`'s call that stays: its tokens before slot `keep`."""
        size = win_keys.shape[-2]
        first = max(record.start, keep - size)
        entries = torch.arange(first, keep, device=win_keys.device) % size
        part = slice(first - record.start, keep - record.start)
        for layer, (k, v) in record.new_window.items():
            win_keys[layer].index_copy_(3, entries, k[:, :, :, part])
            win_values[layer].index_copy_(3, entries, v[:, :, :, part])
        if record.handoffs is not None:
            carries.copy_(record.handoffs[:, :, keep - 1 - record.start])
