"""Per-loop diagnostics, each on a constructed case whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from parloop.eval.diagnostics import (
    effective_rank,
    js_divergence,
    loop_diagnostics,
    mean_pairwise_cosine,
    offset_cost,
    relative_update,
    update_cosine,
)

ALL = torch.ones(1, 4, dtype=torch.bool)


def flat(nested: list[list[float]]) -> list[float]:
    return [x for row in nested for x in row]


def test_relative_update_is_zero_for_identical_states_and_the_norm_ratio_otherwise() -> None:
    h = torch.randn(1, 4, 8)
    assert relative_update(h, h.clone(), ALL) == 0.0
    assert relative_update(h, 3 * h, ALL) == pytest.approx(2.0)
    # a masked token does not count, however large its update
    cur = h.clone()
    cur[0, 0] += 1e6
    assert relative_update(h, cur, torch.tensor([[False, True, True, True]])) == 0.0


def test_update_cosine_is_minus_one_for_oscillation_and_one_for_a_straight_path() -> None:
    a, b = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    assert update_cosine(a, b, a, ALL) == pytest.approx(-1.0)  # loop 2 undoes loop 1
    assert update_cosine(a, b, 2 * b - a, ALL) == pytest.approx(1.0)  # loop 2 repeats loop 1's step
    orth = torch.zeros(1, 4, 8)
    orth[..., 0] = 1.0
    assert update_cosine(torch.zeros(1, 4, 8), orth, orth + torch.eye(8)[1], ALL) == pytest.approx(0.0)


def test_js_divergence_known_values() -> None:
    p = torch.tensor([0.2, 0.3, 0.5])
    assert float(js_divergence(p, p)) == pytest.approx(0.0, abs=1e-12)
    assert float(js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(1.0)
    # P = (1, 0), Q = (1/2, 1/2): M = (3/4, 1/4); JS = (log2(4/3) + (log2(2/3) + 1) / 2) / 2
    expected = 0.5 * math.log2(4 / 3) + 0.25 * (math.log2(2 / 3) + 1)
    assert float(js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))) == pytest.approx(expected)


def test_effective_rank_and_pairwise_cosine_of_known_matrices() -> None:
    same = torch.ones(5, 3) * torch.tensor([1.0, 2.0, 3.0])  # five copies of one vector: rank one
    assert effective_rank(same.T @ same) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.nn.functional.normalize(same, dim=-1).sum(0), 5) == pytest.approx(1.0)
    basis = torch.eye(4) * 2.0  # four orthogonal rows of equal norm
    assert effective_rank(basis.T @ basis) == pytest.approx(4.0)
    assert mean_pairwise_cosine(torch.ones(4), 4) == pytest.approx(0.0)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert mean_pairwise_cosine(opposite.sum(0), 2) == pytest.approx(-1.0)


def test_offset_cost_is_how_much_worse_parallel_is() -> None:
    assert offset_cost(parallel=0.30, sequential_shared=0.35, higher_is_better=True) == pytest.approx(0.05)
    assert offset_cost(parallel=1.20, sequential_shared=1.10, higher_is_better=False) == pytest.approx(0.10)


@pytest.mark.parametrize("mode", ["parallel", "sequential_shared", "sequential"])
def test_loops_that_compute_the_same_state_show_no_change(mode: str) -> None:
    # With hidden scale 0 every loop's input is the embedding alone, and with a window as long as the text the
    # local branch sees the same keys as the global one: every loop computes what loop 0 computes.
    model = tiny_model(plt_num_loops=3, plt_loop_mode=mode, plt_hidden_scale=0.0, plt_window_size=[64, 0])
    ids = torch.randint(1, 61, (2, 12))
    d = loop_diagnostics(model, [(ids, None)])
    assert d.loops == 3 and d.tokens == 24
    assert d.relative_update == pytest.approx([0.0, 0.0], abs=1e-5)
    assert flat(d.attention_js) == pytest.approx([0.0] * 4, abs=1e-6)
    assert d.logit_lens_loss == pytest.approx([d.logit_lens_loss[0]] * 3, rel=1e-5)
    assert d.effective_rank == pytest.approx([d.effective_rank[0]] * 3, rel=1e-4)
    assert d.mean_pairwise_cosine == pytest.approx([d.mean_pairwise_cosine[0]] * 3, rel=1e-4)


def test_looped_model_diagnostics_are_read_from_the_model() -> None:
    model = tiny_model(plt_num_loops=3)
    ids = torch.randint(1, 61, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: pad positions must not count
    d = loop_diagnostics(model, [(ids, mask)])
    assert d.tokens == 20
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_loop_states=True, use_cache=False)  # the diagnostics pass
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 4] = -100  # the first real token has no real token before it to be predicted from
    # the last loop read through the final norm and head is the model itself
    with torch.no_grad():
        loss = float(model(ids, attention_mask=mask, labels=labels).loss)
    assert d.logit_lens_loss[-1] == pytest.approx(loss, rel=1e-5)
    h0, h1, h2 = out.loop_states
    valid = mask.bool()
    assert d.relative_update[1] == pytest.approx(float(((h2 - h1).norm(dim=-1) / h1.norm(dim=-1))[valid].mean()),
                                                 rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(h2 - h1, h1 - h0, dim=-1)[valid].mean()
    assert d.update_cosine[0] == pytest.approx(float(cos), rel=1e-5)
    # these loops do differ, and their attention does too
    assert min(d.relative_update) > 0.01 and min(flat(d.attention_js)) > 1e-4
    assert all(0.0 <= js <= 1.0 for js in flat(d.attention_js))


def test_attention_divergence_comes_from_attention_not_from_states() -> None:
    # Zero queries in layer 0: every loop's global attention there is uniform over the causal keys, so it cannot
    # change between loops, although the states do; layer 1 still changes.
    model = tiny_model(plt_num_loops=3)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.zero_()
    d = loop_diagnostics(model, [(torch.randint(1, 61, (2, 10)), None)])
    assert d.attention_js[0] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert min(d.attention_js[1]) > 1e-4
    assert min(d.relative_update) > 0.01


@pytest.mark.parametrize("hidden_gate", [False, True])
def test_gate_mean_is_read_per_layer_and_loop(hidden_gate: bool) -> None:
    model = tiny_model(plt_num_loops=3, plt_gate_use_hidden_states=hidden_gate)
    biases = [torch.tensor([-2.0, 0.0, 1.0, 3.0]), torch.tensor([0.5, 0.5, -1.0, 2.0])]
    with torch.no_grad():
        for layer, bias in zip(model.model.layers, biases, strict=True):
            layer.self_attn.plt_gate.weight.zero_()  # the gate is then sigmoid(bias) for every token
            layer.self_attn.plt_gate.bias.copy_(bias)
    d = loop_diagnostics(model, [(torch.randint(1, 61, (2, 9)), None)])
    expected = [[float(torch.sigmoid(b).mean())] * 2 for b in biases]
    assert flat(d.gate_mean) == pytest.approx(flat(expected), rel=1e-6)


def test_models_without_a_gate_report_none_and_one_loop_reports_no_updates() -> None:
    ids = torch.randint(1, 61, (1, 8))
    d = loop_diagnostics(tiny_model(plt_num_loops=2, plt_loop_mode="sequential"), [(ids, None)])
    assert d.gate_mean == [] and len(d.attention_js) == 2 and len(d.attention_js[0]) == 1
    d = loop_diagnostics(tiny_model(plt_num_loops=1), [(ids, None)])
    assert d.relative_update == [] and d.update_cosine == [] and len(d.logit_lens_loss) == 1
