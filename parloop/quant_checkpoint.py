"""`parloop quantize`: a float checkpoint directory to a quantized one (parloop/quant.py's format), file by file.

The source is never instantiated as a model: each safetensors file is read (memory-mapped) and written quantized
before the next, so a 15 GB bf16 checkpoint needs about one file's worth of memory. The tensors are quantized by the
same `quantize_weight` as `quantize_model`, so a saved quantized checkpoint loads to the very model that quantizing
on load (`--weights int8`) gives.

Files are written with every tensor at a 64-byte aligned file offset: the weights are memory-mapped straight into
the kernels, and `aten._weight_int8pack_mm` crashes (torch 2.13, 4 or more rows) on an int8 weight that is not
16-byte aligned (`QuantLinear` copies such a weight, from any other writer, once).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from parloop.quant import (
    DEFAULT_GROUP_SIZE,
    FIELD,
    FORMATS,
    GROUP_SIZES,
    HEAD,
    LAYER_LINEARS,
    QuantizationError,
    quantization_config,
    quantize_weight,
)

ALIGN = 64
_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.int8: "I8",
                torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}
MODEL_FILES = ("config.json", "model.safetensors.index.json")


def is_quantized_name(name: str) -> bool:
    """Whether the checkpoint tensor `name` is the weight of a linear product that quantization replaces."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and (parts[-2] in LAYER_LINEARS or name == f"{HEAD}.weight")


def write_aligned(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file whose data starts at an `ALIGN`-byte file offset (the header ends in spaces, as the format
    allows) and lists first the tensors whose sizes are multiples of `ALIGN`, largest first: every such tensor (every
    quantized weight of a real model) then starts aligned. safetensors allows no holes, so the rest may not be."""
    order = sorted(tensors, key=lambda n: (_nbytes(tensors[n]) % ALIGN != 0, -_nbytes(tensors[n]), n))
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + _nbytes(t)]}
        offset += _nbytes(t)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            f.write(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().data)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_files(directory: Path) -> list[str]:
    """The safetensors files of a checkpoint directory, from its index if it has one."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    names = [p.name for p in sorted(directory.glob("*.safetensors"))]
    if not names:
        raise QuantizationError(f"{directory} holds no *.safetensors weight files")
    return names


def _source_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise QuantizationError(f"{directory} is not a model directory (no config.json)")
    config = json.loads(path.read_text())
    if config.get("model_type") != "iquestpltcoder":
        raise QuantizationError(f"{directory} holds a {config.get('model_type')!r} model: parloop quantizes "
                                "LoopCoder-V2 (model_type iquestpltcoder) checkpoints only")
    if config.get(FIELD) is not None:
        raise QuantizationError(f"{directory} is already quantized ({config[FIELD]['weights']}): quantize its float "
                                "checkpoint instead")
    return config


def _quantized_file(source: Path, target: Path, qconfig: dict[str, Any], tie_head: bool) -> dict[str, int]:
    """Quantize one safetensors file into `target`; returns each written tensor's byte size."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(source, framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (a safetensors handle is no dict)
            tensor = f.get_tensor(name)
            sources = [name] + ([f"{HEAD}.weight"] if tie_head and name == "model.embed_tokens.weight" else [])
            for out_name in sources:
                if is_quantized_name(out_name):
                    prefix = out_name.removesuffix("weight")
                    out.update({prefix + k: v for k, v in quantize_weight(tensor, qconfig).items()})
                else:
                    out[out_name] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    write_aligned(out, target, {FIELD: qconfig["weights"]})
    return {name: _nbytes(t) for name, t in out.items()}


def quantize_checkpoint(source: Path, target: Path, weights: str, group_size: int = DEFAULT_GROUP_SIZE,
                        progress: bool = True) -> Path:
    """Write `source` (a float LoopCoder-V2 checkpoint) quantized to `weights` into `target`, with its tokenizer
    and other files copied; the head of a tied model becomes a quantized copy of the embedding."""
    source, target = Path(source), Path(target)
    config = _source_config(source)
    qconfig = quantization_config(weights, group_size)
    if target.resolve() == source.resolve():
        raise QuantizationError("--out must be a new directory, not the source checkpoint")
    target.mkdir(parents=True, exist_ok=True)
    files = weight_files(source)
    tie_head = bool(config.get("tie_word_embeddings", False))
    weight_map: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for name in tqdm(files, desc=f"quantizing to {weights}", unit="file", disable=not progress):
        written = _quantized_file(source / name, target / name, qconfig, tie_head)
        weight_map.update(dict.fromkeys(written, name))
        sizes.update(written)
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.update({FIELD: qconfig, "tie_word_embeddings": False, "dtype": "bfloat16"})
    config.pop("torch_dtype", None)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in source.iterdir():  # tokenizer, generation config, README...
        if path.is_file() and path.suffix != ".safetensors" and path.name not in MODEL_FILES:
            shutil.copy2(path, target / path.name)
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("int8: one scale per output channel (about half the bf16 bytes). int4: a bf16 scale and zero "
                     "per group of --group-size inputs (about 0.27x the bf16 bytes at 128). Every decoder layer's "
                     "linear products and the output head are quantized; the result computes in bfloat16 (int8 "
                     "also in float32) on a CPU and loads with AutoModelForCausalLM.from_pretrained after "
                     "`import parloop`, or with parloop generate/serve/eval --model OUT.")
    parser.add_argument("--model", required=True, type=Path,
                        help="float checkpoint directory (LoopCoder-V2)%(default).0s")
    parser.add_argument("--weights", required=True, choices=FORMATS, help="quantized format%(default).0s")
    parser.add_argument("--out", required=True, type=Path,
                        help="directory to write the quantized checkpoint to%(default).0s")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE,
                        help="int4: inputs that share one scale and zero")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        out = quantize_checkpoint(args.model, args.out, args.weights, args.group_size, not args.no_progress)
    except QuantizationError as err:
        print(f"parloop quantize: error: {err}", file=sys.stderr)
        return 2
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    print(f"wrote {out} ({args.weights}, {total / 1e6:,.1f} MB of weights)")
    return 0
