"""LoopCoder-V1 (`iquestloopcoder`) checkpoints, built here by hand in the released format, load without remote code,
compute design §4b's one-token semantics in every path, save back in the same format, and fail loudly when wrong."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from checkpoint_files import llama_weights, random_tensors, save_weights, saved_weights
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast

import parloop  # noqa: F401  (registers the model types with the Auto classes)
from parloop import CheckpointError, ConfigError, LoopCoderV1Config, LoopCoderV1ForCausalLM, LoopCoderV1Model, PLTCache
from parloop.inference import loading
from parloop.inference.engine import Engine
from parloop.inference.server import create_app
from parloop.padding import left_pad

D, HEADS, KV, HD, FF, VOCAB, LAYERS, THETA = 32, 4, 2, 8, 48, 61, 2, 10000.0
TEXT = [5, 9, 13, 2, 40, 7, 22, 31, 3, 17, 11]


def write_v1_checkpoint(directory: Path, loop_num: int = 2, window: int = 3,
                        shards: int = 1) -> dict[str, torch.Tensor]:
    """A checkpoint laid out as the released IQuest-Coder-V1 Loop repositories are, by hand: the released
    config.json's keys (with its `auto_map` to remote code that is not there) and the released weight names."""
    config = {
        "architectures": ["IQuestLoopCoderForCausalLM"], "model_type": "iquestloopcoder",
        "auto_map": {"AutoConfig": "configuration_iquestloopcoder.IQuestLoopCoderConfig",
                     "AutoModelForCausalLM": "modeling_iquestloopcoder.IQuestLoopCoderForCausalLM"},
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": None, "head_dim": HD,
        "hidden_act": "silu", "hidden_size": D, "initializer_range": 0.02, "intermediate_size": FF,
        "loop_num": loop_num, "loop_window_size": window, "max_position_embeddings": 131072, "mlp_bias": False,
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV, "rms_norm_eps": 1e-05,
        "rope_theta": THETA, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
        "vocab_size": VOCAB,
    }
    (directory / "config.json").write_text(json.dumps(config))
    rand = random_tensors(11)
    weights = llama_weights(rand, VOCAB, D, HEADS, KV, HD, FF, LAYERS)
    for i in range(LAYERS):  # the released code builds a gate for every layer whatever loop_num is
        weights.update({f"model.gate_projections.{i}.weight": 2 * rand(HEADS, HD),
                        f"model.gate_projections.{i}.bias": rand(HEADS)})
    save_weights(directory, weights, shards)
    return weights


class NaiveV1:
    """LoopCoder-V1 as design §4b states it, one token per call, float64, one head at a time, from the raw weight
    dict in V1's names. Per token: loop 0 attends causally over its own keys (kept whole); loop r >= 1 takes loop
    r-1's raw output, attends globally over loop 0's keys of the same layer and locally over its own last
    `window` keys (the current one included), mixed by `g = sigmoid(q . w[h] + b[h])` on the post-RoPE query; the
    final norm once after the last loop."""

    def __init__(self, weights: dict[str, torch.Tensor], loop_num: int, window: int) -> None:
        self.w = {k: v.double() for k, v in weights.items()}
        self.loops, self.window, self.pos = loop_num, window, 0
        self.loop0 = {i: ([], []) for i in range(LAYERS)}
        self.own = {(r, i): ([], []) for r in range(1, loop_num) for i in range(LAYERS)}

    def step(self, token: int) -> torch.Tensor:
        h = self.w["model.embed_tokens.weight"][token]
        for r in range(self.loops):
            for i in range(LAYERS):
                h = self.layer(h, r, i)
        self.pos += 1
        return self.w["lm_head.weight"] @ rms(h, self.w["model.norm.weight"])

    def layer(self, h: torch.Tensor, r: int, i: int) -> torch.Tensor:
        w, p = self.w, f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        q = rope((w[p + "self_attn.q_proj.weight"] @ x).view(HEADS, HD), self.pos)
        k = rope((w[p + "self_attn.k_proj.weight"] @ x).view(KV, HD), self.pos)
        v = (w[p + "self_attn.v_proj.weight"] @ x).view(KV, HD)
        keys, values = self.loop0[i] if r == 0 else self.own[r, i]
        keys.append(k)
        values.append(v)
        if r > 0:
            del keys[:-self.window], values[:-self.window]
        heads = []
        for head in range(HEADS):
            kvh = head // (HEADS // KV)
            out = attend(q[head], [k[kvh] for k in keys], [v[kvh] for v in values])
            if r > 0:
                glob = attend(q[head], [k[kvh] for k in self.loop0[i][0]], [v[kvh] for v in self.loop0[i][1]])
                gw, gb = w[f"model.gate_projections.{i}.weight"][head], w[f"model.gate_projections.{i}.bias"][head]
                g = torch.sigmoid(q[head] @ gw + gb)
                out = g * glob + (1 - g) * out
            heads.append(out)
        h = h + w[p + "self_attn.o_proj.weight"] @ torch.cat(heads)
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        gate, up = w[p + "mlp.gate_proj.weight"] @ x, w[p + "mlp.up_proj.weight"] @ x
        return h + w[p + "mlp.down_proj.weight"] @ (torch.nn.functional.silu(gate) * up)


def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * x / torch.sqrt((x * x).mean() + 1e-5)


def rope(x: torch.Tensor, pos: int) -> torch.Tensor:
    half = HD // 2
    angle = pos * THETA ** (-torch.arange(half, dtype=torch.float64) * 2 / HD)
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.cat([x[..., :half] * c - x[..., half:] * s, x[..., half:] * c + x[..., :half] * s], dim=-1)


def attend(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    weights = torch.softmax(torch.stack([q @ k for k in keys]) / math.sqrt(HD), dim=0)
    return sum(a * v for a, v in zip(weights, values, strict=True))


def naive_logits(weights: dict[str, torch.Tensor], loop_num: int, window: int, ids: list[int]) -> torch.Tensor:
    ref = NaiveV1(weights, loop_num, window)
    return torch.stack([ref.step(t) for t in ids]).float()


@pytest.mark.parametrize(("loop_num", "window", "shards"), [(2, 3, 1), (3, 2, 2), (2, 64, 1), (1, 4, 1)])
def test_loads_without_remote_code_and_matches_the_naive_reference(tmp_path: Path, loop_num: int, window: int,
                                                                   shards: int) -> None:
    weights = write_v1_checkpoint(tmp_path, loop_num, window, shards)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model) is LoopCoderV1ForCausalLM
    assert (model.config.plt_num_loops, model.config.plt_window_size) == (loop_num, [window - 1, 0])
    with torch.no_grad():
        logits = model(torch.tensor([TEXT])).logits[0]
    assert (logits - naive_logits(weights, loop_num, window, TEXT)).abs().max() < 1e-4
    if loop_num > 1 and window < len(TEXT):  # the window convention is visible: one key more is another model
        assert (logits - naive_logits(weights, loop_num, window + 1, TEXT)).abs().max() > 1e-2


def test_cached_decoding_and_generate_equal_the_full_forward(tmp_path: Path) -> None:
    weights = write_v1_checkpoint(tmp_path, loop_num=2, window=3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([TEXT])
    with torch.no_grad():
        full = model(ids).logits
        cache = PLTCache(model.config, max_length=4)  # grows while decoding
        chunks = [(0, 4), (4, 7)] + [(t, t + 1) for t in range(7, ids.shape[1])]  # prefill in two chunks, then decode
        steps = [model(ids[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in chunks]
        generated = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)[0, 5:].tolist()
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4
    ref, greedy = NaiveV1(weights, 2, 3), []
    for token in TEXT[:5]:
        logits = ref.step(token)
    for _ in range(6):
        greedy.append(int(logits.argmax()))
        logits = ref.step(greedy[-1])
    assert generated == greedy


def test_a_padded_batch_decodes_each_row_as_alone(tmp_path: Path) -> None:
    write_v1_checkpoint(tmp_path, loop_num=3, window=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = [TEXT[:7], TEXT[2:5]]
    ids, mask = left_pad(prompts, pad_id=0)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        alone = [model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0, len(p):]
                 for p in prompts]
    assert [row.tolist() for row in batched[:, ids.shape[1]:]] == [a.tolist() for a in alone]


@pytest.mark.parametrize("loop_num", [1, 2])
def test_save_pretrained_writes_the_v1_format_back(tmp_path: Path, loop_num: int) -> None:
    weights = write_v1_checkpoint(tmp_path, loop_num=loop_num, window=3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    out = tmp_path / "saved"
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "iquestloopcoder" and config["architectures"] == ["IQuestLoopCoderForCausalLM"]
    assert (config["loop_num"], config["loop_window_size"], config["rope_theta"]) == (loop_num, 3, THETA)
    assert not [k for k in config if k.startswith("plt_")]
    saved = saved_weights(out)
    assert set(saved) == set(weights)
    assert all(torch.equal(saved[name], w) for name, w in weights.items())
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(again(torch.tensor([TEXT])).logits, model(torch.tensor([TEXT])).logits, atol=1e-5)


def test_a_v1_model_built_here_saves_in_v1_names(tmp_path: Path) -> None:
    config = LoopCoderV1Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                               num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HD, loop_num=1)
    LoopCoderV1ForCausalLM(config).save_pretrained(tmp_path)
    names = set(saved_weights(tmp_path))
    assert {f"model.gate_projections.{i}.{p}" for i in range(LAYERS) for p in ("weight", "bias")} <= names
    assert not [n for n in names if "plt_gate" in n]
    base, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(base) is LoopCoderV1Model and not info["missing_keys"]


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda w: w.pop("model.gate_projections.1.bias"), "missing weight model.gate_projections.1.bias"),
    (lambda w: w.update({"model.gate_projections.0.weight": torch.zeros(HEADS, D)}),
     f"weight model.gate_projections.0.weight has shape ({HEADS}, {D})"),
    (lambda w: w.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}),
     "unexpected weight model.layers.0.self_attn.extra.weight"),
    (lambda w: w.update({f"model.layers.0.self_attn.plt_gate.{p}": w.pop(f"model.gate_projections.0.{p}")
                         for p in ("weight", "bias")}),
     "unexpected weight model.layers.0.self_attn.plt_gate.bias"),
])
def test_a_checkpoint_that_does_not_match_is_an_error_naming_the_weight(tmp_path: Path, edit, expected: str) -> None:
    weights = write_v1_checkpoint(tmp_path)
    edit(weights)
    save_weights(tmp_path, weights)
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert expected in str(err.value)
    assert "plt_num_loops" not in str(err.value)  # the advice names V1's own config fields (loop_num), not V2's


def test_config_defaults_are_the_released_classes() -> None:
    config = LoopCoderV1Config()
    released = dict(vocab_size=76800, hidden_size=5120, intermediate_size=27648, num_hidden_layers=80,
                    num_attention_heads=40, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, loop_num=2,
                    loop_window_size=64, attention_bias=False, mlp_bias=False)
    assert {k: getattr(config, k) for k in released} == released
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert (config.plt_window_size, config.plt_loop_mode, config.plt_emb_scale) == ([63, 0], "sequential_shared", 0.0)


def test_a_config_json_without_loop_fields_means_the_released_defaults(tmp_path: Path) -> None:
    write_v1_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for field in ("loop_num", "loop_window_size", "rope_theta"):
        del config[field]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is LoopCoderV1Config
    assert (loaded.plt_num_loops, loaded.plt_window_size, loaded.rope_parameters["rope_theta"]) == (2, [63, 0], 5e5)


@pytest.mark.parametrize(("overrides", "field"), [
    (dict(loop_window_size=0), "loop_window_size"), (dict(loop_num=0), "loop_num"),
    (dict(plt_num_loops=3), "plt_num_loops"), (dict(plt_loop_mode="sequential"), "plt_loop_mode"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
])
def test_config_errors_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"LoopCoderV1Config.{field} = "):
        LoopCoderV1Config(hidden_size=D, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HD, **overrides)


def word_tokenizer(size: int) -> PreTrainedTokenizerFast:
    words = {"<eos>": 0, **{f"w{i}": i for i in range(1, size)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def test_load_model_and_the_server_decode_it(tmp_path: Path) -> None:
    write_v1_checkpoint(tmp_path, loop_num=2, window=3)
    word_tokenizer(VOCAB).save_pretrained(tmp_path)
    model, tokenizer = loading.load_model(tmp_path, "cpu")
    assert type(model) is LoopCoderV1ForCausalLM
    prompt = " ".join(f"w{t}" for t in TEXT[:6])
    with torch.no_grad():
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    with TestClient(create_app(Engine(model), tokenizer, "v1"), base_url="http://localhost") as client:
        reply = client.post("/v1/completions", json={"model": "v1", "prompt": prompt, "max_tokens": 5,
                                                     "temperature": 0})
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["text"].split() == [f"w{t}" for t in expected if t != 0]
