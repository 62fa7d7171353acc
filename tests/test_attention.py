"""`parloop.attention.attend`: the CPU path that stacks grouped query heads into rows computes what PyTorch's own
grouped-query attention computes, for every shape the model calls it with (masks that broadcast included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parloop.attention import FOLD_MAX_ROWS, attend


def _case(batch: int, heads: int, kv_heads: int, rows: int, keys: int, mask_rows: int, mask_batch: int,
          dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, rows, 16, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, keys, 16, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, keys, 16, generator=g).to(dtype)
    mask = torch.rand(mask_batch, 1, mask_rows, keys, generator=g) > 0.3
    mask[..., 0] = True  # no all-masked row (the model never makes one either)
    return q, k, v, mask


@pytest.mark.parametrize("batch,heads,kv_heads,rows,keys,mask_rows,mask_batch", [
    (1, 8, 2, 1, 5, 1, 1),     # a decode step, R = 1
    (1, 8, 2, 2, 9, 1, 1),     # R = 2 streams folded into rows, one mask row broadcast over them
    (3, 6, 3, 4, 7, 4, 3),     # a batch with its own masks
    (2, 4, 1, 3, 6, 3, 1),     # one KV head, a mask shared by the batch
    (1, 8, 2, FOLD_MAX_ROWS + 1, 40, FOLD_MAX_ROWS + 1, 1),  # a prompt: PyTorch's path
])
def test_folded_attention_equals_grouped_query_attention(batch: int, heads: int, kv_heads: int, rows: int,
                                                         keys: int, mask_rows: int, mask_batch: int) -> None:
    q, k, v, mask = _case(batch, heads, kv_heads, rows, keys, mask_rows, mask_batch, torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(attend(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)


def test_folded_attention_in_bfloat16_is_as_close_to_float32_as_pytorchs() -> None:
    q, k, v, mask = _case(1, 40, 8, 2, 300, 1, 1, torch.bfloat16, seed=1)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    stock = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    folded = attend(q, k, v, mask)
    assert folded.dtype == torch.bfloat16 and folded.shape == stock.shape
    stock_error = (stock.float() - exact).abs().max().item()
    assert (folded.float() - exact).abs().max().item() <= 1.5 * stock_error
