"""The few-row CPU products compute x @ W.T whichever layout they pick."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parloop.kernels import CANDIDATES, TRIALS, chosen_layouts, few_rows_linear


@pytest.mark.parametrize("rows", [1, 2, 3, 7])
def test_every_candidate_computes_the_product(rows: int) -> None:
    x, w = torch.randn(rows, 48), torch.randn(80, 48)
    for name, product in CANDIDATES.items():
        if name == "paired" and rows != 1:
            continue
        out = product(x, w)
        assert out.shape == (rows, 80) and out.is_contiguous()
        assert torch.allclose(out, F.linear(x, w), atol=1e-5), name


def test_choice_is_made_after_timing_every_candidate_and_then_used() -> None:
    x, w = torch.randn(3, 40), torch.randn(24, 40)
    key = ((24, 40), 3, torch.float32, torch.get_num_threads())
    tried = ["linear", "weight_first", "row_by_row"]
    for i in range(TRIALS * len(tried)):
        assert key not in chosen_layouts()
        assert torch.allclose(few_rows_linear(x * i, w), i * (x @ w.T), atol=1e-4)
    assert chosen_layouts()[key] in tried
    assert torch.allclose(few_rows_linear(x, w), x @ w.T, atol=1e-5)
