"""The batched cache of continuous batching: a `PLTCache` whose rows are independent sequences on one slot axis.

Every row's tokens end at the cache's last slot; shorter rows are left-padded. Rows join (`insert_row`, copied from
a prefill cache), leave (`clear_row`), and the slot axis shifts (`shift_slots`, `compact`) so that it spans only
what the longest row needs. Only slot differences enter the masks, and positions count real tokens, so none of this
changes a result (docs/design.md §3).
"""

from __future__ import annotations

import torch

from parloop.cache import ROW_DIMS, PLTCache


class RowCache(PLTCache):
    """A `PLTCache` with the row and slot surgery that the engine's model runner needs."""

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

        The window rings hold slot p at entry p % (W+1): shifting the slot axis by delta rotates every ring by delta.
        """
        old, new = self.length, self.length + delta
        if new < 0:
            raise ValueError(f"cannot shift {old} slots by {delta}")
        self.reserve(new)
        keep = min(old, new)
        src, dst = slice(old - keep, old), slice(new - keep, new)
        for tensor in (self.keys, self.values):
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

    def row_tokens(self) -> list[int]:
        """Real tokens per row."""
        return self.real.tolist() if self.allocated else []

    def kv_bytes_in_use(self) -> int:
        """Bytes of keys and values the rows' real tokens occupy (what a full cache would hold per sequence)."""
        return sum(self.sequence_kv_bytes(n) for n in self.row_tokens())
