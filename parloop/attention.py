"""Attention masks and the softmax-attention kernel that both G-SWA branches use.

Masks work in *slots* (index in the padded sequence), not in RoPE positions: with left padding the two differ by
the row's pad count, and causality and the window are about which slots came earlier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def slot_mask(q_slots: torch.Tensor, k_slots: torch.Tensor, k_valid: torch.Tensor,
              window: int | None = None) -> torch.Tensor:
    """Boolean mask `[B, 1, Tq, Tk]`: may query slot t attend to key slot j?

    Causal (`j <= t`), within `window` when given (`t - window <= j`), and only to real (non-pad) keys.
    A query may always attend to itself, so that a pad query row is never empty (no NaN from an all-masked
    softmax); real queries never see pad keys, so this changes no real token's result.
    """
    diff = q_slots[:, None] - k_slots[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff <= window
    return ((allowed[None] & k_valid[:, None, :]) | (diff == 0)[None])[:, None]


# Up to this many query rows, a CPU call folds each KV head's query heads into its query rows (see `attend`).
FOLD_MAX_ROWS = 32


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention with grouped KV heads: q `[B, H, Tq, hd]`, k/v `[B, Hkv, Tk, hd]`, mask `[B, 1, Tq, Tk]`."""
    batch, heads, rows, head_dim = q.shape
    kv_heads = k.shape[1]
    if heads == kv_heads or q.device.type != "cpu" or rows > FOLD_MAX_ROWS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    # A decode step has one query row per head (or R): PyTorch's CPU kernel with enable_gqa then costs 4-9x what
    # the same kernel costs with the H / Hkv query heads of a KV head stacked as its rows (docs/cpu.md). Query head
    # h uses KV head h // (H / Hkv), so the stacking is a view; every stacked row keeps its own mask row.
    group = heads // kv_heads
    stacked = q.reshape(batch, kv_heads, group * rows, head_dim)
    stacked_mask = mask[:, :, None].expand(batch, 1, group, rows, mask.shape[-1]).reshape(batch, 1, group * rows, -1)
    return F.scaled_dot_product_attention(stacked, k, v, attn_mask=stacked_mask).view(batch, heads, rows, head_dim)
