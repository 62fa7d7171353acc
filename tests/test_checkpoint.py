"""Checkpoints in the LoopCoder-V2 layout load as is; bad configs and bad weights fail loudly, naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoint_files import llama_weights, random_tensors, save_weights
from conftest import tiny_config, tiny_model
from plt_reference import reference_logits
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import parloop  # noqa: F401  (registers the model type with the Auto classes)
from parloop import CheckpointError, ConfigError, PLTConfig, PLTForCausalLM
from parloop.checkpoint import read_into_page_cache


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = tiny_model(plt_num_loops=3, plt_gate_use_hidden_states=True)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "iquestpltcoder"
    assert config["architectures"] == ["IQuestPLTCoderForCausalLM"]
    assert config["rope_theta"] == 10000.0 and config["plt_num_loops"] == 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, PLTForCausalLM)
    ids = torch.randint(1, 61, (2, 7))
    with torch.no_grad():
        # not bitwise: the CPU few-row products may pick another layout on another call (parloop.kernels)
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = PLTForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(1, 61, (1, 5))
    with torch.no_grad():
        # not bitwise: the CPU few-row products may pick another layout on another call (parloop.kernels)
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def loopcoder_layout(tmp_path: Path, hidden_gate: bool, shards: int) -> dict[str, torch.Tensor]:
    """Write a checkpoint the way the released LoopCoder-V2 repository lays it out, by hand: names and shapes
    from docs/design.md §4, a legacy config.json (rope_theta / rope_scaling, no plt_loop_mode)."""
    d, heads, kv, hd, ff, vocab, layers = 32, 4, 2, 8, 48, 61, 2
    config = {
        "architectures": ["IQuestPLTCoderForCausalLM"], "model_type": "iquestpltcoder", "vocab_size": vocab,
        "hidden_size": d, "intermediate_size": ff, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": hd, "hidden_act": "silu", "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
        "torch_dtype": "float32", "plt_num_loops": 2, "plt_window_size": [3, 0], "plt_normalize_per_loop": False,
        "plt_emb_scale": None, "plt_hidden_scale": None, "plt_gate_use_hidden_states": hidden_gate,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    rand = random_tensors(7)
    weights = llama_weights(rand, vocab, d, heads, kv, hd, ff, layers)
    for i in range(layers):
        p = f"model.layers.{i}.self_attn.plt_gate."
        weights.update({p + "weight": rand(heads, d if hidden_gate else hd), p + "bias": rand(heads)})
        if hidden_gate:
            weights[p + "gate_norm.weight"] = 1 + 0.1 * rand(d)
    save_weights(tmp_path, weights, shards)
    return weights


@pytest.mark.parametrize(("hidden_gate", "shards"), [(False, 1), (True, 3)])
def test_loopcoder_layout_loads_as_is(tmp_path: Path, hidden_gate: bool, shards: int) -> None:
    weights = loopcoder_layout(tmp_path, hidden_gate, shards)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(model, PLTForCausalLM)
    assert model.config.plt_loop_mode == "parallel"
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    state = model.state_dict()
    assert set(state) == set(weights)
    assert all(torch.equal(state[n], w) for n, w in weights.items())
    ids = [5, 9, 13, 2, 40, 7, 22]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    assert (logits - reference_logits(model, ids).float()).abs().max() < 1e-4


@pytest.mark.parametrize("shards", [1, 3])
def test_embedding_bytes_are_read_once_from_their_own_shard(tmp_path: Path, shards: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    weights = loopcoder_layout(tmp_path, False, shards)
    embedding = weights["model.embed_tokens.weight"]
    monkeypatch.setattr("parloop.checkpoint.PAGE_CACHE_CHUNK", 1000)  # several reads, the last one partial
    reads: list[bytes] = []
    real_open = open

    def recording_open(path, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202
        handle = real_open(path, mode, *args, **kwargs)
        real_readinto = handle.readinto

        class Recorder:
            def __getattr__(self, name: str):  # noqa: ANN204
                return getattr(handle, name)

            def __enter__(self):  # noqa: ANN204
                return self

            def __exit__(self, *exc: object) -> None:
                handle.close()

            def readinto(self, view: memoryview) -> int:
                got = real_readinto(view)
                reads.append(bytes(view[:got]))
                return got
        return Recorder()

    monkeypatch.setattr("builtins.open", recording_open)
    assert read_into_page_cache(tmp_path) == embedding.numel() * embedding.element_size()
    assert b"".join(reads) == embedding.contiguous().view(torch.uint8).numpy().tobytes()
    assert len(reads) > 1 and max(len(r) for r in reads) <= 1000
    assert read_into_page_cache(tmp_path, "model.no_such.weight") == 0
    assert read_into_page_cache(tmp_path / "missing") == 0


@pytest.mark.parametrize(("overrides", "field", "allowed"), [
    (dict(plt_num_loops=0), "plt_num_loops", ">= 1"),
    (dict(plt_window_size=[64, 8]), "plt_window_size", "right must be 0"),
    (dict(plt_window_size=[-1, 0]), "plt_window_size", "left must be >= 0"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads", "divisible"),
    (dict(plt_loop_mode="diagonal"), "plt_loop_mode", "parallel, sequential_shared, sequential"),
    (dict(hidden_size=0), "hidden_size", ">= 1"),
    (dict(hidden_act="gelu"), "hidden_act", "silu"),
])
def test_config_errors_name_field_value_and_allowed(overrides: dict, field: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        tiny_config(**overrides)
    message = str(err.value)
    assert f"PLTConfig.{field} = " in message and allowed in message
    assert repr(list(overrides.values())[-1]) in message


def test_bad_config_json_is_rejected_on_load(tmp_path: Path) -> None:
    loopcoder_layout(tmp_path, hidden_gate=False, shards=1)
    config = json.loads((tmp_path / "config.json").read_text())
    config["plt_window_size"] = [64, 4]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="plt_window_size"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda w: w.pop("model.layers.1.self_attn.plt_gate.bias"),
     "missing weight model.layers.1.self_attn.plt_gate.bias"),
    (lambda w: w.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}),
     "unexpected weight model.layers.0.self_attn.extra.weight"),
    (lambda w: w.update({"model.norm.weight": torch.ones(33)}), "weight model.norm.weight has shape (33,)"),
])
def test_weight_mismatch_is_an_error_naming_it(tmp_path: Path, edit, expected: str) -> None:
    weights = loopcoder_layout(tmp_path, hidden_gate=False, shards=1)
    edit(weights)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert expected in str(err.value) and "Check plt_num_loops, plt_loop_mode" in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "header", "missing_shard"])
def test_damaged_weights_are_detected_naming_the_file(tmp_path: Path, damage: str) -> None:
    loopcoder_layout(tmp_path, hidden_gate=False, shards=1 if damage != "missing_shard" else 3)
    if damage == "missing_shard":
        victim = tmp_path / "model-00002-of-00003.safetensors"
        victim.unlink()
    else:
        victim = tmp_path / "model.safetensors"
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:5])
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert victim.name in str(err.value)


def test_config_dict_round_trip() -> None:
    config = PLTConfig(hidden_size=64, num_attention_heads=4, plt_num_loops=3, plt_loop_mode="sequential")
    again = PLTConfig.from_dict(config.to_dict())
    assert again.plt_num_loops == 3 and again.plt_loop_mode == "sequential" and again.plt_window_size == [64, 0]
