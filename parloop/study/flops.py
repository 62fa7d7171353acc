"""The study's training compute by a FLOP count: what each run of a plan trains (its recipe's steps x batch x
sequence length) times 6 x the parameters a token passes through, plus attention.

Per token, training costs about 6 x N FLOPs (forward 2N, backward 4N) for N weights used in matrix products, plus
6 x layers x sequence length x attention width for the attention scores (Kaplan et al. 2020, eq. 2.2, causal
attention counted whole). A looped model runs its layers R times, so N counts the layers R times; the tied
embedding counts once, as the output head's product (the input lookup is no product). Windowed loops attend to
fewer keys than counted here, so the attention term is an upper bound for R >= 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from parloop.config import PLTConfig
from parloop.model import PLTForCausalLM
from parloop.study.grid import Preset
from parloop.study.plan import Plan
from parloop.study.run import recipe_for
from parloop.train.corpus import Corpus
from parloop.train.recipe import Recipe


@dataclass(frozen=True)
class Compute:
    """A plan's training compute: runs, tokens and FLOPs in all."""

    runs: int
    tokens: int
    flops: float

    def seconds_at(self, flops_per_second: float) -> float:
        return self.flops / flops_per_second

    def describe(self) -> str:
        return (f"{self.runs} training runs, {self.tokens:,} tokens, {self.flops:.3g} FLOPs "
                "(6 x parameters x tokens + attention, R x the layers for a looped model)")


def flops_per_token(config: PLTConfig, seq_len: int) -> float:
    """Training FLOPs per token of a model of `config` (see the module docstring)."""
    with torch.device("meta"):  # parameter shapes only: no memory, no initialization
        model = PLTForCausalLM(config)
    layer_weights = sum(p.numel() for p in model.model.layers.parameters())
    head = config.vocab_size * config.hidden_size
    loops = config.plt_num_loops
    attention = config.num_hidden_layers * loops * seq_len * config.num_attention_heads * config.head_dim
    return 6.0 * (layer_weights * loops + head) + 6.0 * attention


def recipe_tokens(recipe: Recipe) -> int:
    """The tokens a recipe trains on: every step's full batch of `seq_len` targets."""
    return recipe.train.max_steps * recipe.train.batch_size * recipe.train.seq_len


def plan_compute(plan: Plan, preset: Preset, corpus: Path, overrides: Sequence[str]) -> Compute:
    """The training compute of every run of `plan` (learning-rate sweep and compared models), from the recipes
    the study trains with `corpus`, so the count follows the preset, the scales and any `--set` override."""
    runs, data = plan.sweep + plan.runs, Corpus(corpus)
    tokens, flops = 0, 0.0
    for run in runs:
        recipe = recipe_for(run, preset, corpus, overrides)
        config = recipe.model_config(data)  # the vocabulary is the corpus's, as the trainer builds it
        run_tokens = recipe_tokens(recipe)
        tokens += run_tokens
        flops += run_tokens * flops_per_token(config, recipe.train.seq_len)
    return Compute(len(runs), tokens, flops)
