"""Loading a model directory (config, weights, tokenizer) for decoding, and the command-line options that name it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import parloop  # noqa: F401  (registers the model type with the Auto classes)
from parloop.kernels import use_few_row_kernels

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="model directory: config.json, weights and tokenizer files")
    parser.add_argument("--device", default="auto", help="torch device; auto = cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weight dtype; auto = the checkpoint's")


def load_model(model_dir: Path, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """Load `(model, tokenizer)` from a model directory, the model in eval mode on `device`."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json); pass the directory that "
                                "holds config.json, the weights and the tokenizer files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load a tokenizer from {model_dir} ({err}); save one there with "
                                "tokenizer.save_pretrained(dir)") from err
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    return use_few_row_kernels(model.to(device).eval()), tokenizer
