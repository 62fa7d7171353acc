"""Decode speed of PLT in vLLM: one-pass decoding against loop-by-loop decoding, in the same run (docs/vllm.md).

    python -m parloop.vllm.bench [--loops 1 2 3 4] [--batch 1 16] [--tokens 24] [--repeats 3]

For each loop count R one engine serves a randomly initialised ~100M-parameter model (hidden 768, 12 layers, 12
heads of 64, the released window [64, 0]); each (batch, mode) then decodes `--tokens` tokens after a 16-token
prompt per request, `--repeats` times, modes interleaved. The time per decode step is read off vLLM's own
timestamps (first to last token of a request), so prefill is not counted; the best repeat is reported.
Loop-by-loop is the algorithm of the vLLM fork (every loop one more pass per token); parloop's plugin switches to
it for this comparison only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
from pathlib import Path

import torch
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from parloop import PLTConfig, PLTForCausalLM

MODES = {"one-pass": True, "loop-by-loop": False}
PROMPT_TOKENS = 16


def bench_config(loops: int) -> PLTConfig:
    return PLTConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                     plt_num_loops=loops, plt_window_size=[64, 0], plt_normalize_per_loop=True,
                     plt_gate_use_hidden_states=True, bos_token_id=None, eos_token_id=None)


def step_seconds(llm: LLM, batch: int, tokens: int) -> float:
    """Seconds per decode step of `batch` requests decoding together."""
    g = torch.Generator().manual_seed(batch)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(1, 32000, (PROMPT_TOKENS,), generator=g).tolist())
               for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True, detokenize=False)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return max((o.metrics.last_token_ts - o.metrics.first_token_ts) / tokens for o in outputs)


def bench_loops(loops: int, batches: list[int], tokens: int, repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        PLTForCausalLM(bench_config(loops)).save_pretrained(directory)
        llm = LLM(directory, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=512,
                  max_num_seqs=max(batches), enable_prefix_caching=False, disable_log_stats=False, seed=0)
    rows = []
    for batch in batches:
        step_seconds(llm, batch, 2)  # warm-up
        best = {mode: float("inf") for mode in MODES}
        for _ in range(repeats):
            for mode, one_pass in MODES.items():
                llm.apply_model(lambda m, flag=one_pass: setattr(m.model, "one_pass_decode", flag))
                best[mode] = min(best[mode], step_seconds(llm, batch, tokens))
        rows += [dict(loops=loops, batch=batch, mode=mode, ms_per_step=1000 * s) for mode, s in best.items()]
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return rows


def report(rows: list[dict]) -> str:
    """A table: ms per decode step, and the speed-up of one-pass over loop-by-loop and its cost over R = 1."""
    ms = {(r["loops"], r["batch"], r["mode"]): r["ms_per_step"] for r in rows}
    lines = ["| R | batch | one-pass ms/step | loop-by-loop ms/step | speed-up | one-pass / R=1 |", "|---" * 6 + "|"]
    for loops, batch, mode in ms:
        if mode != "one-pass":
            continue
        one, seq = ms[loops, batch, "one-pass"], ms[loops, batch, "loop-by-loop"]
        base = ms.get((1, batch, "one-pass"))
        vs_one = f"{one / base:.2f}x" if base else "-"
        lines.append(f"| {loops} | {batch} | {one:.1f} | {seq:.1f} | {seq / one:.2f}x | {vs_one} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=24, help="decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON lines here")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # apply_model reaches the model in-process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    rows = [row for loops in args.loops for row in bench_loops(loops, args.batch, args.tokens, args.repeats)]
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(report(rows))


if __name__ == "__main__":
    main()
