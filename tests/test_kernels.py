"""The few-row CPU products compute x @ W.T whichever layout they pick."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parloop.kernels import CANDIDATES, chosen_layouts, few_rows_linear


@pytest.mark.parametrize("rows", [1, 2, 3, 7])
def test_every_candidate_computes_the_product(rows: int) -> None:
    x, w = torch.randn(rows, 48), torch.randn(80, 48)
    for name, product in CANDIDATES.items():
        if name == "paired" and rows != 1:
            continue
        out = product(x, w)
        assert out.shape == (rows, 80) and out.is_contiguous()
        assert torch.allclose(out, F.linear(x, w), atol=1e-5), name


def test_choice_is_made_once_per_shape_and_used() -> None:
    x, w = torch.randn(3, 40), torch.randn(24, 40)
    out = few_rows_linear(x, w)
    key = ((24, 40), 3, torch.float32, torch.get_num_threads())
    assert chosen_layouts()[key] in CANDIDATES
    assert torch.allclose(out, x @ w.T, atol=1e-5)
    assert torch.allclose(few_rows_linear(x * 2, w), 2 * (x @ w.T), atol=1e-5)
