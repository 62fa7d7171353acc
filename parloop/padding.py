"""Left padding: the one batch layout every batched caller (engine, evaluation, tests) feeds the model.

Rows are right-aligned so that every row's last real token sits in the last column; the model's masks and RoPE
positions count real tokens only, so padding never changes a real token's result (design §3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids `[B, width]` and attention mask (1 = real token) for token-id sequences."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)
