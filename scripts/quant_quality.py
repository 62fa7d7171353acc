"""What int8 and int4 weights cost a trained model: test bits per byte and greedy continuations, against the float
model (docs/cpu.md reports a run). Usage, after `parloop data build --out DATA --vocab-size 4096` and
`parloop train recipes/quickstart.yaml --set data.dir=DATA --run-dir RUN`:

    python scripts/quant_quality.py --model RUN/model --data DATA [--max-bytes 300000] [--json out.json]

Bits per byte are paired per test file: the difference to the float model is sum(bits_q - bits_f) / sum(bytes),
with a 95 % interval from the spread of the per-file differences (normal approximation). Greedy agreement: 8 test
files' first 64 tokens as prompts, 32 greedy tokens each from the float and the quantized model; the share of the
256 positions where both chose the same token, and of the tokens before the first disagreement. Each is against
the float32 model and against the float weights with bf16 activations (what the quantized models compute in), so
that the weights' share of a difference can be told from the activations'.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from parloop.eval.bpb import bits_per_byte
from parloop.eval.held_out import held_out_texts
from parloop.inference.loading import load_model

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 8, 64, 32


def paired_difference(base: object, other: object) -> tuple[float, float]:
    """(difference in bits per byte, half-width of its 95 % interval), paired per text."""
    diffs = [o - b for b, o in zip(base.text_bits, other.text_bits, strict=True)]
    n, total_bytes = len(diffs), sum(base.text_bytes)
    mean = sum(diffs) / n
    spread = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1))
    return sum(diffs) / total_bytes, 1.96 * spread * math.sqrt(n) / total_bytes


@torch.no_grad()
def greedy(model: object, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        out.append(gen[0, len(ids):].tolist())
    return out


def agreement(base: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    same = sum(a == b for x, y in zip(base, other, strict=True) for a, b in zip(x, y, strict=True))
    prefix = 0
    for x, y in zip(base, other, strict=True):
        prefix += next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
    total = sum(len(x) for x in base)
    return dict(same_tokens=same / total, before_first_difference=prefix / total, tokens=total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--max-bytes", type=int, default=300_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    texts = held_out_texts(args.data, "test", args.max_bytes)
    variants = {"float32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("auto", "int8"),
                "int4": ("auto", "int4")}
    results, scores, continuations = {}, {}, {}
    for name, (dtype, weights) in variants.items():
        model, tokenizer = load_model(args.model, "cpu", dtype, weights)
        prompts = [tokenizer(t)["input_ids"][:PROMPT_TOKENS] for t in texts[:PROMPTS]]
        scores[name] = bits_per_byte(model, tokenizer, texts, desc=name)
        continuations[name] = greedy(model, prompts)
        results[name] = dict(test_bpb=scores[name].bits_per_byte, bytes=scores[name].bytes)
        for base in ("float32", "bf16")[:list(variants).index(name)]:
            diff, half = paired_difference(scores[base], scores[name])
            results[name][f"against_{base}"] = dict(bpb_difference=diff, ci95=half,
                                                     **agreement(continuations[base], continuations[name]))
        print(name, json.dumps(results[name]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
