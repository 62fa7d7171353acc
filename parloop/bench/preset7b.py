"""`parloop bench --preset 7b`: the released LoopCoder-V2 shapes with random weights, built once on disk.

The checkpoint (15.2 GB in bf16, one safetensors file per layer plus one for the embedding, head and norm) is
written once under a cache directory, one layer in memory at a time, and reused after; its int8 and int4 copies
are written next to it by `parloop quantize`'s own code the first time a run asks for them. A run then loads a
format lazily (memory-mapped), so the process holds about the bytes of the weights it decodes with.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from parloop.config import PLTConfig
from parloop.model import PLTDecoderLayer
from parloop.quant import quantization_config, stored_quantization
from parloop.quant_checkpoint import quantize_checkpoint, write_aligned

# the released LoopCoder-V2 config (docs/design.md §4): 7.6B parameters
RELEASED_7B: dict[str, Any] = dict(
    vocab_size=76800, hidden_size=5120, intermediate_size=27648, num_hidden_layers=14, num_attention_heads=40,
    num_key_value_heads=8, head_dim=128, rope_theta=500000.0, plt_num_loops=2, plt_window_size=[64, 0],
    plt_normalize_per_loop=True, plt_emb_scale=0.707, plt_hidden_scale=0.053, plt_gate_use_hidden_states=True,
    tie_word_embeddings=False, max_position_embeddings=131072, dtype="bfloat16")
DONE_FILE = "complete"  # written last: a directory without it is an interrupted build, built again


def cache_root() -> Path:
    """Where the 7b checkpoints live: $PARLOOP_CACHE (default ~/.cache/parloop) / bench-7b."""
    return Path(os.environ.get("PARLOOP_CACHE", Path.home() / ".cache" / "parloop")) / "bench-7b"


def _random_like(params: dict[str, torch.Tensor], prefix: str, std: float,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Tensors named and shaped as `params` (a module's state dict, on the meta device): norm weights one, biases
    zero, the rest random, as a freshly initialised model has them."""
    out = {}
    for name, p in params.items():
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            t = torch.zeros(p.shape, dtype=torch.bfloat16)
        else:
            t = torch.randn(*p.shape, generator=generator, dtype=torch.bfloat16) * std
        out[prefix + name] = t.contiguous()
    return out


def _layer_tensors(config: PLTConfig, layer: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    # the model's own layer names and shapes (gate included where parloop.plt says the layer has one)
    with torch.device("meta"):
        params = PLTDecoderLayer(config, layer).state_dict()
    return _random_like(params, f"model.layers.{layer}.", config.initializer_range, generator)


def _outer_tensors(config: PLTConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    shape = (config.vocab_size, config.hidden_size)
    params = {"model.embed_tokens.weight": torch.empty(shape, device="meta"),
              "lm_head.weight": torch.empty(shape, device="meta"),
              "model.norm.weight": torch.empty(config.hidden_size, device="meta")}
    return _random_like(params, "", config.initializer_range, generator)


def build_checkpoint(directory: Path, shape: dict[str, Any], seed: int = 0, progress: bool = True) -> Path:
    """Write a random-weight bf16 checkpoint of `shape` (PLTConfig fields) into `directory`, a file per layer, and
    mark it complete; an already complete one is kept as it is."""
    directory = Path(directory)
    if (directory / DONE_FILE).exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = PLTConfig(**shape)
    generator = torch.Generator().manual_seed(seed)
    layers = config.num_hidden_layers
    files = [f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors" for i in range(layers + 1)]
    weight_map: dict[str, str] = {}
    total = 0
    for i in tqdm(range(layers + 1), desc=f"building {directory.name}", unit="file", disable=not progress):
        tensors = _layer_tensors(config, i, generator) if i < layers else _outer_tensors(config, generator)
        write_aligned(tensors, directory / files[i])
        weight_map.update(dict.fromkeys(tensors, files[i]))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(directory)
    (directory / DONE_FILE).write_text("built by parloop bench --preset 7b\n")
    return directory


def checkpoint_for(weights: str, root: Path, shape: dict[str, Any], progress: bool = True) -> Path:
    """The directory of the 7b checkpoint in `weights` (bf16, int8, int4), built first if it is not complete."""
    source = build_checkpoint(root / "bf16", shape, progress=progress)
    if weights == "bf16":
        return source
    target = root / weights
    if (target / DONE_FILE).exists() and stored_quantization(target) != quantization_config(weights):
        shutil.rmtree(target)  # written by an older parloop in another format: quantized again
    if not (target / DONE_FILE).exists():
        quantize_checkpoint(source, target, weights, progress=progress)
        (target / DONE_FILE).write_text(f"quantized by parloop bench --preset 7b from {source}\n")
    return target
