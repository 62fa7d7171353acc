"""What int8 and int4 weights cost a trained model: test bits per byte and greedy continuations, against the float
model (docs/cpu.md reports a run). Usage, after `parloop data build --out DATA --vocab-size 4096` and
`parloop train recipes/quickstart.yaml --set data.dir=DATA --run-dir RUN`:

    python scripts/quant_quality.py --model RUN/model --data DATA [--max-bytes 300000] [--json out.json]

Bits per byte are paired per test file: the difference to the float model is sum(bits_q - bits_f) / sum(bytes),
with a 95 % interval from the spread of the per-file differences (normal approximation). Greedy agreement: 8 test
files' first 64 tokens as prompts, 32 greedy tokens each from the float and the quantized model; the share of the
256 positions where both chose the same token, and of the tokens before the first disagreement. Each is against
the float32 model and against the float weights with bf16 activations (what the quantized models compute in), so
that the weights' share of a difference can be told from the activations'; "int8-float32" (int8 weights, float32
activations and float32 embedding and norms) against float32 measures the weights' share alone.

Near-ties: at each of the float32 model's 256 greedy steps, the gap between its two largest logits (nats); the
report counts the steps whose gap is under each of NEAR_TIES, and gives, for every other variant, the float32 gap
at each prompt's first disagreement (a disagreement at a near-tie is a coin toss that any rounding can flip).
Forced agreement: the share of the float32 model's 256 greedy steps at which a variant, fed the float32 model's own
prefix, picks the same token (one full forward per prompt); unlike the greedy measures, one early disagreement does
not make the later tokens differ (float32 against itself checks that a full forward picks what decoding picked).

Bits per byte score windows longer than `parloop.quant.KERNEL_ROWS` tokens, which the quantized layers compute from
dequantized weights and bf16 activations; decoding runs on parloop's kernels, which round the activations first
(int8: to 16 bits per lane class; int4: to 8 bits per group). "int8-kernels" and "int4-kernels" score every window
through the kernels (8 rows at a time), so that their bits per byte include that rounding too.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from parloop import quant
from parloop.eval.bpb import bits_per_byte
from parloop.eval.held_out import held_out_texts
from parloop.inference.loading import load_model
from parloop.quant import QuantizationError

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 8, 64, 32
NEAR_TIES = (0.01, 0.05, 0.1, 0.5, 1.0)  # nats between the float32 model's two largest logits


def paired_difference(base: object, other: object) -> tuple[float, float]:
    """(difference in bits per byte, half-width of its 95 % interval), paired per text."""
    diffs = [o - b for b, o in zip(base.text_bits, other.text_bits, strict=True)]
    n, total_bytes = len(diffs), sum(base.text_bytes)
    mean = sum(diffs) / n
    spread = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1))
    return sum(diffs) / total_bytes, 1.96 * spread * math.sqrt(n) / total_bytes


@torch.no_grad()
def greedy(model: object, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
    """Each prompt's greedy continuation, and at each step the gap between the two largest scores."""
    out, gaps = [], []
    for ids in prompts:
        x = torch.tensor([ids])
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
        out.append(gen.sequences[0, len(ids):].tolist())
        top2 = torch.cat(gen.scores).float().topk(2, dim=-1).values
        gaps.append((top2[:, 0] - top2[:, 1]).tolist())
    return out, gaps


def first_differences(base: list[list[int]], other: list[list[int]]) -> list[int | None]:
    """Per prompt, the step of the first disagreement (None where the continuations are equal)."""
    return [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
            for x, y in zip(base, other, strict=True)]


def near_ties(gaps: list[list[float]]) -> dict[str, int]:
    """How many greedy steps have a top-2 gap under each threshold of NEAR_TIES."""
    flat = [g for row in gaps for g in row]
    return {f"gap_below_{t}": sum(g < t for g in flat) for t in NEAR_TIES} | {"steps": len(flat)}


@torch.no_grad()
def forced_same(model: object, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """Share of the continuations' tokens that `model` picks greedily when fed the prompt and the tokens before."""
    same = total = 0
    for ids, cont in zip(prompts, continuations, strict=True):
        logits = model(torch.tensor([ids + cont])).logits[0, len(ids) - 1:-1]
        same += sum(a == b for a, b in zip(logits.argmax(-1).tolist(), cont, strict=True))
        total += len(cont)
    return same / total


def agreement(base: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    same = sum(a == b for x, y in zip(base, other, strict=True) for a, b in zip(x, y, strict=True))
    prefix = sum(len(x) if i is None else i for x, i in zip(base, first_differences(base, other), strict=True))
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
                "int4": ("auto", "int4"), "int8-float32": ("float32", "int8"), "int8-kernels": ("auto", "int8"),
                "int4-kernels": ("auto", "int4")}
    results, scores, continuations, gaps = {}, {}, {}, {}
    prefill_rows = quant.KERNEL_ROWS
    for name, (dtype, weights) in variants.items():
        quant.KERNEL_ROWS = 1 << 30 if name.endswith("-kernels") else prefill_rows
        try:
            model, tokenizer = load_model(args.model, "cpu", dtype, weights)
        except QuantizationError as err:  # int8 x float32 needs a parloop whose kernels take float32 activations
            results[name] = dict(skipped=str(err))
            print(name, "skipped:", err, flush=True)
            continue
        prompts = [tokenizer(t)["input_ids"][:PROMPT_TOKENS] for t in texts[:PROMPTS]]
        scores[name] = bits_per_byte(model, tokenizer, texts, desc=name)
        continuations[name], gaps[name] = greedy(model, prompts)
        results[name] = dict(test_bpb=scores[name].bits_per_byte, bytes=scores[name].bytes)
        results[name]["forced_same_as_float32"] = forced_same(model, prompts, continuations["float32"])
        if name == "float32":
            results[name]["near_ties"] = near_ties(gaps[name])
        for base in ("float32", "bf16")[:list(variants).index(name)]:
            diff, half = paired_difference(scores[base], scores[name])
            results[name][f"against_{base}"] = dict(bpb_difference=diff, ci95=half,
                                                     **agreement(continuations[base], continuations[name]))
        if name != "float32":
            steps = first_differences(continuations["float32"], continuations[name])
            results[name]["float32_gap_at_first_difference"] = [
                None if i is None else round(row[i], 4) for row, i in zip(gaps["float32"], steps, strict=True)]
        print(name, json.dumps(results[name]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
