from __future__ import annotations

from typing import Any

import pytest
import torch

from parloop import PLTConfig, PLTForCausalLM

# The test models are tiny: with more than one intra-op thread, OpenMP's hand-offs cost more than the work, and on a
# loaded 2-core machine a 32x48 matmul took ms instead of µs.
torch.set_num_threads(1)


def tiny_config(**overrides: Any) -> PLTConfig:
    """A model small enough to run every test on a CPU in milliseconds; the window is shorter than the test texts."""
    fields: dict[str, Any] = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  plt_num_loops=2, plt_window_size=[2, 0], rope_theta=10000.0,
                                  bos_token_id=None, eos_token_id=None, pad_token_id=0)
    fields.update(overrides)
    return PLTConfig(**fields)


def tiny_model(seed: int = 0, **overrides: Any) -> PLTForCausalLM:
    torch.manual_seed(seed)
    model = PLTForCausalLM(tiny_config(**overrides)).eval()
    # Weights large enough that attention is far from uniform and every gate far from 0.5, so that a wrong
    # formula anywhere moves the logits by much more than the tolerances.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                param.normal_(0.0, 1.0)
            elif param.ndim == 2:
                param.normal_(0.0, 1.0 / param.shape[1] ** 0.5)
            elif name.endswith("plt_gate.bias"):
                param.uniform_(-1.5, 1.5)
            else:  # norm weights
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(1234)
