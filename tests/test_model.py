"""The model computes docs/design.md §2, and cached decoding computes the same as the full forward."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_model
from plt_reference import reference_logits
from transformers import LlamaConfig, LlamaForCausalLM

from parloop import PLTCache
from parloop.padding import left_pad

MODES = ("parallel", "sequential_shared", "sequential")


def left_padded_batch(lengths: list[int], vocab: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([torch.randint(1, vocab, (n,)).tolist() for n in lengths], pad)


def prefill_then_decode(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: PLTCache,
                        prompt: int) -> torch.Tensor:
    """Logits of every position: the first `prompt` tokens in one call, then one token per call."""
    steps = [model(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache, use_cache=True).logits]
    steps += [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True).logits
              for t in range(prompt, ids.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize(("mode", "loops", "hidden_gate"), [
    *itertools.product(MODES, (1, 2, 3), (False, True)),
    ("parallel", 4, False),
])
def test_full_forward_matches_naive_reference(mode: str, loops: int, hidden_gate: bool) -> None:
    # per-loop norm and the scales are exercised together with the hidden-state gate
    extra = dict(plt_normalize_per_loop=True, plt_emb_scale=0.8, plt_hidden_scale=0.6) if hidden_gate else {}
    model = tiny_model(plt_loop_mode=mode, plt_num_loops=loops, plt_gate_use_hidden_states=hidden_gate, **extra)
    lengths = [7, 4]
    ids, mask = left_padded_batch(lengths, model.config.vocab_size)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    for row, n in enumerate(lengths):
        expected = reference_logits(model, ids[row, -n:].tolist()).float()
        assert (logits[row, -n:] - expected).abs().max() < 1e-4


@pytest.mark.parametrize(("mode", "loops", "hidden_gate"),
                         list(itertools.product(MODES, (1, 2, 3, 4, 5), (False, True))))
def test_cached_decoding_equals_full_forward(mode: str, loops: int, hidden_gate: bool) -> None:
    model = tiny_model(plt_loop_mode=mode, plt_num_loops=loops, plt_gate_use_hidden_states=hidden_gate)
    ids, mask = left_padded_batch([11, 6, 9], model.config.vocab_size)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        # a small initial capacity also exercises the cache growing mid-sequence
        cache = PLTCache(model.config, max_length=4)
        cached = prefill_then_decode(model, ids, mask, cache, prompt=5)
    real = mask.bool()
    assert (cached - full)[real].abs().max() <= 1e-4
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("mode", MODES)
def test_chunked_prefill_equals_full_forward(mode: str) -> None:
    model = tiny_model(plt_loop_mode=mode, plt_num_loops=3)
    ids = torch.randint(1, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = PLTCache(model.config)
        chunks = [model(ids[:, s:e], past_key_values=cache, use_cache=True).logits
                  for s, e in ((0, 4), (4, 5), (5, 11), (11, 12))]
    assert (torch.cat(chunks, dim=1) - full).abs().max() <= 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_left_padded_row_equals_row_alone(mode: str) -> None:
    model = tiny_model(plt_loop_mode=mode, plt_num_loops=3)
    ids, mask = left_padded_batch([9, 3], model.config.vocab_size)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, -3:]).logits
    assert (batched[1, -3:] - alone[0]).abs().max() <= 1e-5


def test_parallel_differs_from_sequential_shared_only_when_looped() -> None:
    ids = torch.randint(1, 61, (1, 10))
    with torch.no_grad():
        for loops in (1, 2, 3):
            par = tiny_model(plt_num_loops=loops, plt_loop_mode="parallel")(ids).logits
            shared = tiny_model(plt_num_loops=loops, plt_loop_mode="sequential_shared")(ids).logits
            if loops == 1:
                assert torch.allclose(par, shared, atol=1e-4, rtol=0)
            else:
                # same weights (same seed): only the one-token offset differs
                assert (par - shared).abs().max() > 1e-2


def test_one_loop_matches_transformers_llama() -> None:
    model = tiny_model(plt_num_loops=1)
    c = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, rope_theta=10000.0, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=None, eos_token_id=None)).eval()
    weights = {k: v for k, v in model.state_dict().items() if ".plt_gate." not in k}  # R = 1: gate unused
    llama.load_state_dict(weights, strict=True)
    ids = torch.randint(1, c.vocab_size, (2, 9))
    with torch.no_grad():
        assert (model(ids).logits - llama(ids).logits).abs().max() <= 1e-5
        ours = model.generate(ids, max_new_tokens=6, do_sample=False)
        theirs = llama.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


def test_labels_give_shifted_cross_entropy() -> None:
    model = tiny_model(plt_num_loops=2)
    ids = torch.randint(1, 61, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 61)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    gate = model.model.layers[0].self_attn.plt_gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loops", [1, 2, 4])
def test_cache_bytes_equal_design_formula(mode: str, loops: int) -> None:
    model = tiny_model(plt_loop_mode=mode, plt_num_loops=loops)
    c = model.config
    batch = 2
    for total in (2, 9):  # shorter and longer than the window (W + 1 = 3)
        cache = PLTCache(c, max_length=64)
        ids = torch.randint(1, c.vocab_size, (batch, total))
        with torch.no_grad():
            model(ids[:, :-1], past_key_values=cache, use_cache=True)
            model(ids[:, -1:], past_key_values=cache, use_cache=True)
        per_token = 2 * c.num_key_value_heads * c.head_dim * 4  # K and V, fp32
        W = c.plt_window_size[0]
        tokens = loops * total if mode == "sequential" else total + (loops - 1) * min(total, W + 1)
        assert cache.kv_cache_bytes() == c.num_hidden_layers * batch * per_token * tokens


def test_generate_uses_plt_cache_and_matches_recomputation() -> None:
    model = tiny_model(plt_num_loops=3)
    ids, mask = left_padded_batch([6, 3], model.config.vocab_size)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False,
                             return_dict_in_generate=True)
        seq, am = ids, mask
        for _ in range(7):
            nxt = model(seq, attention_mask=am).logits[:, -1].argmax(-1, keepdim=True)
            seq, am = torch.cat([seq, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
    assert isinstance(out.past_key_values, PLTCache)
    assert out.past_key_values.get_seq_length() == seq.shape[1] - 1
    assert torch.equal(out.sequences, seq)


def test_generate_sampling_and_eos() -> None:
    model = tiny_model(plt_num_loops=2)
    ids = torch.randint(1, 61, (3, 4))
    with torch.no_grad():
        torch.manual_seed(0)
        a = model.generate(ids, do_sample=True, temperature=0.7, top_k=8, top_p=0.9, max_new_tokens=12)
        torch.manual_seed(0)
        b = model.generate(ids, do_sample=True, temperature=0.7, top_k=8, top_p=0.9, max_new_tokens=12)
        greedy = model.generate(ids, do_sample=False, max_new_tokens=12)
        eos = int(greedy[0, 6])  # the 3rd generated token of row 0 becomes EOS: row 0 must stop there
        stopped = model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(a, b) and a.shape == (3, 16)
    assert not torch.equal(a, greedy)
    first_eos = (stopped[0, 4:] == eos).nonzero()[0, 0].item()
    assert first_eos <= 2
    assert (stopped[0, 4 + first_eos + 1:] == 0).all()



@pytest.mark.parametrize("mode", MODES)
def test_static_cache_decoding_equals_full_forward(mode: str) -> None:
    model = tiny_model(plt_loop_mode=mode, plt_num_loops=3)
    ids, mask = left_padded_batch([10, 7], model.config.vocab_size)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cached = prefill_then_decode(model, ids, mask, PLTCache(model.config, max_length=16, static=True), prompt=4)
    assert (cached - full)[mask.bool()].abs().max() <= 1e-4


def test_compiled_decoding_gives_the_same_tokens_as_eager() -> None:
    model = tiny_model(plt_num_loops=3)
    ids = torch.randint(1, model.config.vocab_size, (2, 6))
    calls = []
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=8, do_sample=False)
        model.compile_decode()
        compiled_layers = model.model.compiled_layers

        def counted(*args):
            calls.append(1)
            return compiled_layers(*args)

        model.model.compiled_layers = counted
        compiled = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert len(calls) == 7  # every one-token step after the prefill went through the compiled stack
    assert torch.equal(eager, compiled)
