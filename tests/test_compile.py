"""The compiled decode step over a static cache: one graph, no graph breaks, no recompiles per step, and the same
results as eager (on CPU; tests/test_cuda.py checks the CUDA-graph path on a GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_model import left_padded_batch, prefill_then_decode
from torch._dynamo.testing import CompileCounter

from parloop import PLTCache

CASES = [("parallel", 3, False), ("parallel", 2, True), ("sequential_shared", 2, False), ("sequential", 2, False)]


def decode_step_calls(model: torch.nn.Module) -> list[tuple]:
    """The arguments of every call of the layer stack during a few static-cache decode steps (eager)."""
    calls = []

    def record(*args):
        calls.append(args)
        return model.model.run_layers(*args)

    model.model.compiled_layers = record
    ids = torch.randint(1, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    model.model.compiled_layers = None
    return calls


@pytest.mark.parametrize(("mode", "loops", "hidden_gate"), CASES)
def test_decode_step_is_one_graph_without_breaks(mode: str, loops: int, hidden_gate: bool) -> None:
    model = tiny_model(plt_loop_mode=mode, plt_num_loops=loops, plt_gate_use_hidden_states=hidden_gate)
    calls = decode_step_calls(model)
    per_step = 1 if mode == "parallel" else loops
    assert len(calls) == 2 * per_step  # 2 one-token steps after the prefill
    for args in calls[per_step:]:
        with torch.no_grad():
            explained = torch._dynamo.explain(model.model.run_layers)(*args)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


@pytest.mark.parametrize(("mode", "loops", "hidden_gate"), CASES)
def test_decode_step_compiles_once_per_loop_index_not_per_step(mode: str, loops: int, hidden_gate: bool) -> None:
    torch._dynamo.reset()
    model = tiny_model(plt_loop_mode=mode, plt_num_loops=loops, plt_gate_use_hidden_states=hidden_gate)
    counter = CompileCounter()
    model.compile_decode(backend=counter, fullgraph=True)  # fullgraph: a graph break would raise
    ids = torch.randint(1, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=9, do_sample=False, cache_implementation="static")
    assert counter.frame_count == (1 if mode == "parallel" else loops)
    assert counter.op_count > 0


def test_compiled_decode_logits_equal_eager_and_the_full_forward() -> None:
    # the model and cache shapes of test_model's compiled generate test, so Inductor's cache spares a second build
    model = tiny_model(plt_num_loops=3)
    ids, mask = left_padded_batch([10, 7], model.config.vocab_size)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        eager = prefill_then_decode(model, ids, mask, PLTCache(model.config, max_length=14, static=True), prompt=4)
        model.compile_decode()
        compiled = prefill_then_decode(model, ids, mask, PLTCache(model.config, max_length=14, static=True), prompt=4)
    real = mask.bool()
    assert (compiled - eager)[real].abs().max() <= 1e-5
    assert (compiled - full)[real].abs().max() <= 1e-4
