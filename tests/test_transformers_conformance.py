"""parloop as a first-class `transformers` model, in the style of transformers' own model tests: a model tester makes
tiny configs and inputs, and every check runs in every loop mode (and R = 1..3 where it matters).

Each check is something a transformers user does; it must work as for `LlamaForCausalLM` or fail with an error that
names the limitation — never give a silently different answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model
from plt_reference import reference_logits
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedTokenizerFast

from parloop import CheckpointError, PLTCache, PLTConfig, PLTForCausalLM
from parloop.bench.models import build_reference

MODES = ("parallel", "sequential_shared", "sequential")
CONFIGS = [(mode, loops) for mode in MODES for loops in (1, 2, 3)]


class ModelTester:
    """Tiny configs and inputs for one (mode, R); the window (2) is shorter than the texts."""

    def __init__(self, mode: str, loops: int, batch: int = 2, length: int = 9) -> None:
        self.mode, self.loops, self.batch, self.length = mode, loops, batch, length

    def model(self, seed: int = 0) -> PLTForCausalLM:
        return tiny_model(seed, plt_loop_mode=self.mode, plt_num_loops=self.loops)

    def inputs(self) -> torch.Tensor:
        return torch.randint(1, 61, (self.batch, self.length))


def _greedy(model: PLTForCausalLM, ids: torch.Tensor, new: int = 12, **kwargs) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          pad_token_id=0, **kwargs)


@pytest.mark.parametrize(("mode", "loops"), CONFIGS)
def test_assisted_decoding_equals_greedy(mode: str, loops: int) -> None:
    tester = ModelTester(mode, loops, batch=1)
    model, draft = tester.model(0), tester.model(1)  # a different draft: most of its tokens are rejected
    ids = tester.inputs()
    greedy = _greedy(model, ids)
    assert torch.equal(_greedy(model, ids, assistant_model=draft), greedy)
    assert torch.equal(_greedy(model, ids, assistant_model=model), greedy)  # all drafts accepted


@pytest.mark.parametrize(("mode", "loops"), CONFIGS)
def test_prompt_lookup_decoding_equals_greedy(mode: str, loops: int) -> None:
    tester = ModelTester(mode, loops, batch=1)
    model = tester.model()
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])  # repeats, so the lookup proposes candidates
    assert torch.equal(_greedy(model, ids, prompt_lookup_num_tokens=3), _greedy(model, ids))


@pytest.mark.parametrize("mode", MODES)
def test_crop_rolls_back_windows_and_carries(mode: str) -> None:
    """Decode 6 tokens, crop 4 away, decode other tokens: the logits equal a cache that never saw the removed ones."""
    model = ModelTester(mode, 3).model()
    ids = torch.randint(1, 61, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        cache = PLTCache(model.config)
        model(ids[:, :6], past_key_values=cache)
        cache.activate_past_recording()
        model(torch.randint(1, 61, (2, 3)), past_key_values=cache)  # a multi-token call: a draft, to be cropped
        model(torch.randint(1, 61, (2, 1)), past_key_values=cache)
        cache.crop(-4)
        assert cache.get_seq_length() == 6
        steps = [model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1] for t in range(6, 14)]
    assert (torch.stack(steps, 1) - full[:, 6:]).abs().max() < 1e-4


def test_crop_without_recording_is_refused() -> None:
    model = ModelTester("parallel", 2).model()
    cache = PLTCache(model.config)
    with torch.no_grad():
        model(torch.randint(1, 61, (1, 5)), past_key_values=cache)
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-2)
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)


@pytest.mark.parametrize("mode", MODES)
def test_batch_select_and_repeat_interleave(mode: str) -> None:
    model = ModelTester(mode, 2).model()
    ids = torch.randint(1, 61, (3, 7))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = PLTCache(model.config)
        model(ids[:, :6], past_key_values=cache)
        cache.batch_select_indices(torch.tensor([2, 0]))
        cache.batch_repeat_interleave(2)
        last = model(ids[[2, 2, 0, 0], 6:], past_key_values=cache).logits[:, -1]
    assert (last - full[[2, 2, 0, 0]]).abs().max() < 1e-4


@pytest.mark.parametrize(("mode", "loops"), CONFIGS)
def test_hidden_states_per_layer_and_loop(mode: str, loops: int) -> None:
    tester = ModelTester(mode, loops)
    model, ids = tester.model(), tester.inputs()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_loop_states=True)
        cache = PLTCache(model.config)
        model(ids[:, :-1], past_key_values=cache)
        step = model(ids[:, -1:], past_key_values=cache, output_hidden_states=True)
    layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == 1 + loops * layers
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(ids))
    for r in range(loops - 1):  # the last layer of loop r is loop r's state
        assert torch.allclose(out.hidden_states[(r + 1) * layers], out.loop_states[r])
    assert torch.allclose(out.hidden_states[-1], model.model.norm(out.loop_states[-1]))
    # the stacked decode step reports the same per-layer states for the new token as the full forward
    assert len(step.hidden_states) == len(out.hidden_states)
    for cached, full in zip(step.hidden_states, out.hidden_states, strict=True):
        assert cached.shape == (2, 1, 32) and (cached[:, 0] - full[:, -1]).abs().max() < 1e-4


def test_config_output_hidden_states_and_return_dict() -> None:
    model = ModelTester("parallel", 2).model()
    ids = torch.randint(1, 61, (1, 5))
    model.config.output_hidden_states = True
    assert model(ids).hidden_states is not None
    model.config.output_hidden_states = False
    assert model(ids).hidden_states is None
    as_tuple = model(ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].ndim == 0 and as_tuple[1].shape == (1, 5, 61)
    model.config.return_dict = False
    assert isinstance(model.model(ids), tuple)


def test_generate_returns_hidden_states() -> None:
    model = ModelTester("parallel", 2).model()
    ids = torch.randint(1, 61, (1, 5))
    out = _greedy(model, ids, new=4, output_hidden_states=True, return_dict_in_generate=True)
    assert len(out.hidden_states) == 4
    assert all(h is not None and h.shape[-1] == 32 for step in out.hidden_states for h in step)


def test_refusals_name_the_limitation() -> None:
    model = ModelTester("parallel", 2).model()
    ids = torch.randint(1, 61, (1, 5))
    with pytest.raises(ValueError, match="output_attentions is not supported.*set_attention_probe"):
        model(ids, output_attentions=True)
    with pytest.raises(TypeError, match="unexpected keyword arguments.*not_an_option"):
        model(ids, not_an_option=1)
    with pytest.raises(TypeError, match="DynamicCache.*PLTCache"):
        model.generate(ids, past_key_values=DynamicCache(), max_new_tokens=2)
    with pytest.raises(ValueError, match="cache_implementation='offloaded' is not supported"):
        model.generate(ids, cache_implementation="offloaded", max_new_tokens=2)


def test_attn_implementation_other_than_sdpa_is_refused(tmp_path: Path) -> None:
    ModelTester("parallel", 2).model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attn_implementation='eager' is not supported"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").config._attn_implementation \
        == "sdpa"


@pytest.mark.parametrize("mode", MODES)
def test_forward_returns_a_cache_like_llama(mode: str) -> None:
    model = ModelTester(mode, 2).model()
    ids = torch.randint(1, 61, (2, 6))
    with torch.no_grad():
        out = model(ids)  # config.use_cache is True
        cache = out.past_key_values
        assert isinstance(cache, PLTCache) and len(cache) == 2 and cache[0][0].shape == (2, 2, 6, 8)
        nxt = torch.randint(1, 61, (2, 1))
        step = model(nxt, past_key_values=cache).logits[:, -1]
        assert (step - model(torch.cat([ids, nxt], 1)).logits[:, -1]).abs().max() < 1e-4
    assert model(ids, use_cache=False).past_key_values is None


@pytest.mark.parametrize("mode", MODES)
def test_gradient_checkpointing_matches_plain_backward(mode: str) -> None:
    model = ModelTester(mode, 3).model().train()
    ids = torch.randint(1, 61, (2, 8))

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain_loss, plain = loss_and_grads()
    model.gradient_checkpointing_enable()
    assert model.model.layers[0].gradient_checkpointing
    ckpt_loss, ckpt = loss_and_grads()
    assert torch.allclose(plain_loss, ckpt_loss) and len(plain) == len(ckpt)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, ckpt, strict=True))


@pytest.mark.parametrize("mode", MODES)
def test_gradients_through_a_cache_equal_the_cacheless_pass(mode: str) -> None:
    """A forward that returns a cache (use_cache) must not cut the gradients to the keys it just wrote, which later
    loops of the same call read (loop 0's keys in the G-SWA modes)."""
    model = ModelTester(mode, 3).model()
    ids = torch.randint(1, 61, (2, 8))
    grads = []
    for use_cache in (False, True):
        model.zero_grad()
        out = model(ids, labels=ids, use_cache=use_cache)
        assert (out.past_key_values is not None) == use_cache
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_device_map_auto_loads(tmp_path: Path) -> None:
    model = ModelTester("parallel", 2).model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto")
    ids = torch.randint(1, 61, (1, 6))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


# -- checkpoint fidelity: the released config class's defaults, and gate weights at R = 1 ---------------------------

def _write_checkpoint(directory: Path, model: PLTForCausalLM, config: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))


def _released_style_config(model: PLTForCausalLM, **fields) -> dict:
    """A config.json as the released code writes it, leaving out every field whose default it relies on."""
    c = model.config
    out = dict(model_type="iquestpltcoder", architectures=["IQuestPLTCoderForCausalLM"], vocab_size=c.vocab_size,
               hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
               num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
               num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, plt_num_loops=c.plt_num_loops,
               plt_window_size=c.plt_window_size, tie_word_embeddings=False)
    out.update(fields)
    return out


def test_config_without_per_loop_norm_field_means_the_released_default(tmp_path: Path) -> None:
    """The released config class defaults plt_normalize_per_loop to True, rms_norm_eps to 1e-5 and rope_theta to
    500000: a config.json without those fields must be computed with them."""
    model = tiny_model(0, plt_normalize_per_loop=True, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=False)
    _write_checkpoint(tmp_path, model, _released_style_config(model))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    c = loaded.config
    assert c.plt_normalize_per_loop is True and c.rms_norm_eps == 1e-5 and c.bos_token_id == 1
    assert c.rope_parameters["rope_theta"] == 500000 and c.eos_token_id == [2, 75864, 75869]
    assert c.max_position_embeddings == 131072 and c.plt_window_size == [2, 0]
    ids = torch.randint(1, 61, (10,)).tolist()
    with torch.no_grad():
        got = loaded(torch.tensor([ids])).logits[0].double()
    assert (got - reference_logits(model, ids)).abs().max() < 1e-4


def test_default_config_matches_the_released_class() -> None:
    c = PLTConfig()
    assert (c.plt_num_loops, c.plt_window_size, c.plt_normalize_per_loop) == (2, [64, 0], True)
    assert (c.plt_emb_scale, c.plt_hidden_scale, c.plt_gate_use_hidden_states) == (None, None, False)
    assert (c.rms_norm_eps, c.rope_parameters["rope_theta"], c.bos_token_id) == (1e-5, 500000, 1)
    assert c.eos_token_id == [2, 75864, 75869] and c.tie_word_embeddings is False


def test_one_loop_checkpoint_with_gate_weights_round_trips(tmp_path: Path) -> None:
    model = tiny_model(0, plt_num_loops=1, tie_word_embeddings=False)
    assert any(".plt_gate." in k for k in model.state_dict())  # built at R = 1, as the released code does
    _write_checkpoint(tmp_path / "in", model, _released_style_config(model))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "in")
    loaded.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_one_loop_checkpoint_without_gate_loads_and_other_gaps_still_fail(tmp_path: Path) -> None:
    model = tiny_model(0, plt_num_loops=1, tie_word_embeddings=False)
    weights = {k: v for k, v in model.state_dict().items() if ".plt_gate." not in k}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps(_released_style_config(model, rope_theta=10000.0)))
    save_file(weights, str(tmp_path / "a" / "model.safetensors"))
    ids = torch.randint(1, 61, (1, 6))
    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(tmp_path / "a")(ids).logits, model(ids).logits,
                              atol=1e-5)
    del weights["model.layers.0.mlp.up_proj.weight"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(_released_style_config(model)))
    save_file(weights, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing weight model.layers.0.mlp.up_proj.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    two_loops = tiny_model(0, plt_num_loops=2, tie_word_embeddings=False)
    weights = {k: v for k, v in two_loops.state_dict().items() if k != "model.layers.1.self_attn.plt_gate.bias"}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps(_released_style_config(two_loops)))
    save_file(weights, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing weight model.layers.1.self_attn.plt_gate.bias"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def test_tiny_config_helper_is_what_the_checks_assume() -> None:
    assert tiny_config().plt_window_size == [2, 0]


@pytest.mark.parametrize("mode", MODES)
def test_beam_search_scores_equal_the_full_forward(mode: str) -> None:
    """Beam search reorders cache rows (carries and rings included): each returned beam's score must be the sum of
    its tokens' log-probabilities under a plain forward pass of the whole sequence."""
    model = ModelTester(mode, 2).model()
    ids = torch.randint(1, 61, (1, 6))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, num_beams=3,
                         num_return_sequences=3, do_sample=False, length_penalty=0.0, early_stopping=True,
                         pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        logprobs = model(out.sequences, use_cache=False).logits.log_softmax(-1)
    new = out.sequences[:, 6:]
    direct = logprobs[:, 5:-1].gather(-1, new[..., None])[..., 0].sum(-1)
    assert torch.allclose(direct, out.sequences_scores, atol=1e-4)


def _char_tokenizer(vocab: int = 61) -> PreTrainedTokenizerFast:
    """One character per token, so a text's characters are its tokens one to one."""
    chars = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[:vocab]
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, merges=[]))
    backend.decoder = decoders.Fuse()  # tokens join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize(("mode", "loops"), CONFIGS)
def test_generate_stops_at_a_stop_string(mode: str, loops: int) -> None:
    model, tok = ModelTester(mode, loops).model(), _char_tokenizer()
    ids = torch.tensor([[5, 17, 30, 9, 44]])
    free = _greedy(model, ids, new=16)[0].tolist()
    text = "".join(tok.convert_ids_to_tokens(free))
    # two generated characters; generation stops at the first token that completes them (a token is a character),
    # also where they straddle the prompt's end
    n = ids.shape[1]
    stop = text[n + 3:n + 5]
    end = next(j + 2 for j in range(n - 1, len(text) - 1) if text[j:j + 2] == stop)
    stopped = _greedy(model, ids, new=16, stop_strings=[stop], tokenizer=tok)
    assert stopped[0].tolist() == free[:end]
    if loops == 1:  # R = 1 is Llama: the same weights stop at the same token through transformers' own model
        llama = build_reference(model.config, model.state_dict())
        assert torch.equal(_greedy(llama, ids, new=16, stop_strings=[stop], tokenizer=tok), stopped)


@pytest.mark.parametrize("mode", MODES)
def test_shift_labels_give_the_loss_of_their_labels(mode: str) -> None:
    tester = ModelTester(mode, 2)
    model, ids = tester.model(), tester.inputs()
    labels = ids.clone()
    labels[0, :3] = -100
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    shift[1, 4] = -100  # pre-shifted labels may ignore what the plain ones would not
    with torch.no_grad():
        out = model(ids, labels=labels, shift_labels=shift)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), shift.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    plain = model(ids, labels=labels).loss
    assert not torch.allclose(out.loss, plain)  # the pre-shifted labels were used, not the plain ones
