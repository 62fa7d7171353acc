"""Decode speed of PLT in vLLM: one-pass decoding against loop-by-loop decoding, in the same run (docs/vllm.md).

    python -m parloop.vllm.bench [--preset 100m] [--loops 1 2 3 4] [--batch 1 16] [--tokens 24] [--repeats 3]
    parloop bench --engine vllm [--preset 100m] [--loops 1 2 3 4] [--batch 1] [--new-tokens 24]   (the same)

For each loop count R one engine serves a randomly initialised model of the shape `parloop bench` uses (`--preset`:
100m = hidden 768, 12 layers, 12 heads of 64, 4 KV heads, tied embeddings, 100.1M parameters; 1b = hidden 2048, 22
layers), with the window [--window, 0] (default the released [64, 0]); each (batch, mode) then decodes `--tokens`
tokens after a 16-token prompt per request, `--repeats` times, modes interleaved. The time per decode step is read
off vLLM's own timestamps (first to last token of a request) and as this process's CPU time (the engine runs in-
process on one thread by default), prefill not counted; the best repeat is reported. On a shared machine the CPU
time is the figure to read: wall time counts whatever else the core ran.
Loop-by-loop is the algorithm of the vLLM fork (every loop one more pass per token); parloop's plugin switches to
it for this comparison only. A last table times the step's weight products alone (the first engine's linear layers,
batch x 1..R rows): the part of a step that stacking the loops can share; the rest of a step is per-call work.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from parloop import PLTConfig, PLTForCausalLM
from parloop.bench.options import PRESETS

MODES = {"one-pass": True, "loop-by-loop": False}
CLOCKS = ("cpu", "wall")
PROMPT_TOKENS = 16


def bench_config(loops: int, preset: str = "100m", window: int = 64) -> PLTConfig:
    shape = PRESETS[preset]
    return PLTConfig(**shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                     tie_word_embeddings=True, max_position_embeddings=2048, plt_num_loops=loops,
                     plt_window_size=[window, 0], plt_normalize_per_loop=True, plt_gate_use_hidden_states=True,
                     bos_token_id=None, eos_token_id=None)


def generate_cpu_seconds(llm: LLM, prompts: list[TokensPrompt], max_tokens: int) -> tuple[list, float]:
    """The outputs, and the CPU seconds this process spent: the engine runs in-process on one thread, so this
    counts the work of the steps, not the time other programs held the core (the machine may be shared)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    start = time.process_time()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return outputs, time.process_time() - start


def step_seconds(llm: LLM, batch: int, tokens: int) -> dict[str, float]:
    """Seconds per decode step of `batch` requests decoding together: CPU time (decode run minus prefill-only run)
    and wall time (vLLM's timestamps from first to last token)."""
    g = torch.Generator().manual_seed(batch)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(1, 32000, (PROMPT_TOKENS,), generator=g).tolist())
               for _ in range(batch)]
    _, prefill_cpu = generate_cpu_seconds(llm, prompts, 1)
    outputs, total_cpu = generate_cpu_seconds(llm, prompts, tokens + 1)
    wall = max((o.metrics.last_token_ts - o.metrics.first_token_ts) / tokens for o in outputs)
    return dict(cpu=(total_cpu - prefill_cpu) / tokens, wall=wall)


def weight_products_ms(model: nn.Module, rows: int, repeats: int) -> dict[str, float]:
    """CPU ms of one decode step's weight products alone (best of `repeats`), through the engine's own linear layers:
    the layer stack's with `rows` rows (one-pass decoding multiplies R x batch rows, a loop-by-loop pass batch rows)
    and the head's. What a step costs beyond these is per-call overhead that does not shrink with the rows."""
    linears = [m for layer in model.model.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                           layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    inputs = [torch.randn(rows, m.input_size_per_partition) for m in linears]
    hidden = torch.randn(rows, model.config.hidden_size)

    def best_ms(work: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            start = time.process_time()
            work()
            times.append(time.process_time() - start)
        return 1000 * min(times)

    with torch.no_grad():
        return dict(rows=rows, layers=best_ms(lambda: [m(x) for m, x in zip(linears, inputs, strict=True)]),
                    head=best_ms(lambda: model.compute_logits(hidden)))


def bench_loops(loops: int, batches: list[int], tokens: int, repeats: int, config: PLTConfig,
                product_rows: list[int]) -> tuple[list[dict], list[dict]]:
    """Decode-step rows of every (batch, mode, clock) for this R, and the weight products for `product_rows`."""
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        PLTForCausalLM(config).save_pretrained(directory)
        llm = LLM(directory, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=512,
                  max_num_seqs=max(batches), enable_prefix_caching=False, disable_log_stats=False, seed=0)
    rows = []
    for batch in batches:
        step_seconds(llm, batch, 2)  # warm-up
        best = {(mode, clock): float("inf") for mode in MODES for clock in CLOCKS}
        for _ in range(repeats):
            for mode, one_pass in MODES.items():
                llm.apply_model(lambda m, flag=one_pass: setattr(m.model, "one_pass_decode", flag))
                for clock, seconds in step_seconds(llm, batch, tokens).items():
                    best[mode, clock] = min(best[mode, clock], seconds)
        rows += [dict(loops=loops, batch=batch, mode=mode, clock=clock, ms_per_step=1000 * s)
                 for (mode, clock), s in best.items()]
    products = [llm.apply_model(lambda m, n=n: weight_products_ms(m, n, 2 * repeats + 1))[0] for n in product_rows]
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return rows, products


def report(rows: list[dict], clock: str) -> str:
    """A table of one clock: ms per decode step, the speed-up of one-pass over loop-by-loop, its cost over R = 1."""
    ms = {(r["loops"], r["batch"], r["mode"]): r["ms_per_step"] for r in rows if r["clock"] == clock}
    lines = [f"{clock} time", "| R | batch | one-pass ms/step | loop-by-loop ms/step | speed-up | one-pass / R=1 |",
             "|---" * 6 + "|"]
    for loops, batch, mode in ms:
        if mode != "one-pass":
            continue
        one, seq = ms[loops, batch, "one-pass"], ms[loops, batch, "loop-by-loop"]
        base = ms.get((1, batch, "one-pass"))
        vs_one = f"{one / base:.2f}x" if base else "-"
        lines.append(f"| {loops} | {batch} | {one:.1f} | {seq:.1f} | {seq / one:.2f}x | {vs_one} |")
    return "\n".join(lines)


def products_report(products: list[dict]) -> str:
    lines = ["weight products alone (CPU ms per step, through the engine's linear layers)",
             "| rows | layer stack | head |", "|---|---|---|"]
    lines += [f"| {p['rows']} | {p['layers']:.1f} | {p['head']:.1f} |" for p in products]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=[p for p in PRESETS if p != "tiny"], default="100m",
                        help="model shape, as in `parloop bench` (default: 100m)")
    parser.add_argument("--window", type=int, default=64, help="sliding window W of loops >= 1 (keys t-W..t)")
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=24, help="decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the engine")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON lines here")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # apply_model reaches the model in-process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # one thread (set before vLLM's worker takes torch.set_num_threads away): CPU time is then the steps' work, and
    # on a shared core no step waits for a second thread that another program holds
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    product_rows = sorted({b * r for b in args.batch for r in range(1, max(args.loops) + 1)})
    products: list[dict] = []
    for i, loops in enumerate(args.loops):
        step_rows, measured = bench_loops(loops, args.batch, args.tokens, args.repeats,
                                          bench_config(loops, args.preset, args.window), product_rows if i == 0 else [])
        rows += step_rows
        products += measured
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows + products))
    print("\n\n".join([report(rows, clock) for clock in CLOCKS] + [products_report(products)]))


if __name__ == "__main__":
    main()
