"""Checkpoint files written by hand for the loading tests: random Llama weights under their released names, and
safetensors files (one, or shards with an index) laid out as released repositories lay them out."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Rand = Callable[..., torch.Tensor]


def random_tensors(seed: int) -> Rand:
    """`rand(*shape)`: reproducible normal tensors scaled by 1/sqrt(fan-in), so activations stay of order one."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / (shape[-1] ** 0.5 if len(shape) > 1 else 1.0)

    return rand


def llama_weights(rand: Rand, vocab: int, d: int, heads: int, kv: int, hd: int, ff: int,
                  layers: int) -> dict[str, torch.Tensor]:
    """The Llama part of a checkpoint (untied `lm_head`), with embeddings large enough that attention is peaked."""
    weights = {"model.embed_tokens.weight": rand(vocab, d) * 8, "model.norm.weight": 1 + 0.1 * rand(d),
               "lm_head.weight": rand(vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": 1 + 0.1 * rand(d), p + "post_attention_layernorm.weight": 1 + 0.1 * rand(d),
            p + "self_attn.q_proj.weight": rand(heads * hd, d), p + "self_attn.k_proj.weight": rand(kv * hd, d),
            p + "self_attn.v_proj.weight": rand(kv * hd, d), p + "self_attn.o_proj.weight": rand(d, heads * hd),
            p + "mlp.gate_proj.weight": rand(ff, d), p + "mlp.up_proj.weight": rand(ff, d),
            p + "mlp.down_proj.weight": rand(d, ff),
        })
    return weights


def save_weights(directory: Path, weights: dict[str, torch.Tensor], shards: int = 1) -> None:
    """`model.safetensors`, or `shards` files and `model.safetensors.index.json`."""
    if shards == 1:
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
        return
    names, weight_map = sorted(weights), {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s::shards]}
        save_file(part, directory / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in weights.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def saved_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `directory`, by name."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out
