"""Loading a model directory (config, weights, tokenizer) for decoding, and the command-line options that name it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import parloop  # noqa: F401  (registers the model type with the Auto classes)
from parloop.checkpoint import read_into_page_cache
from parloop.kernels import use_few_row_kernels
from parloop.quant import FORMATS, QuantizationError, quantize_model, stored_quantization

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="model directory: config.json, weights and tokenizer files")
    parser.add_argument("--device", default="auto", help="torch device; auto = cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weight dtype; auto = the checkpoint's")
    parser.add_argument("--weights", default=None, choices=FORMATS,
                        help="quantize a float checkpoint's weights on load (CPU, bfloat16; `parloop quantize` "
                             "writes a quantized checkpoint that loads faster); default: as the checkpoint stores "
                             "them%(default).0s")


def stored_weights(model_dir: Path) -> str | None:
    """The quantized format a model directory stores (int8, int4), None for float weights."""
    return (stored_quantization(model_dir) or {}).get("weights")


def _check_quantized_load(model_dir: Path, device: str, dtype: str, weights: str | None) -> None:
    """Refuse, saying why, a quantized load that the CPU kernels cannot run."""
    stored = stored_weights(model_dir)
    if weights is None and stored is None:
        return
    if weights is not None and stored is not None:
        raise QuantizationError(f"{model_dir} is already quantized ({stored}); leave out --weights {weights}")
    if device not in ("auto", "cpu"):
        raise QuantizationError(f"quantized weights run on the CPU kernels only: use --device cpu, not {device}")
    allowed = ("auto", "bfloat16", "float32") if (weights or stored) == "int8" else ("auto", "bfloat16")
    if dtype not in allowed:
        raise QuantizationError(f"{weights or stored} weights compute in {' or '.join(allowed[1:])}: use --dtype "
                                f"{' or '.join(allowed)}, not {dtype}")


def load_model(model_dir: Path, device: str = "auto", dtype: str = "auto",
               weights: str | None = None) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` from a model directory, the model in eval mode on `device`; with `weights`
    (int8, int4) a float checkpoint is quantized on load (with dtype "auto", from the checkpoint's own dtype, as
    `parloop quantize` quantizes it)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json); pass the directory that "
                                "holds config.json, the weights and the tokenizer files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load a tokenizer from {model_dir} ({err}); save one there with "
                                "tokenizer.save_pretrained(dir)") from err
    _check_quantized_load(model_dir, device, dtype, weights)
    quantized = weights is not None or stored_weights(model_dir) is not None
    if device == "auto":
        device = "cpu" if quantized else "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    if weights is not None:  # from the checkpoint's own dtype, as `parloop quantize` reads it
        model = quantize_model(model, weights, dtype=torch.float32 if dtype == "float32" else torch.bfloat16)
    if device == "cpu":
        read_into_page_cache(model_dir)  # else each new token's embedding row waits on the disk
    return use_few_row_kernels(model.to(device).eval()), tokenizer
