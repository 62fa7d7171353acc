"""One `parloop bench` run: every (mode, loops, batch, context) row and the `transformers` reference, measured the
same way on models that share one set of weights.

All models share one set of weights: the R = 1 model is built from the seed, and every other (mode, R) model
loads its state dict; only the G-SWA gates (absent at R = 1 and in `sequential` mode) are new, seeded by R, so
`parallel` and `sequential_shared` at the same R have the same gates. The peer is `transformers`'
`LlamaForCausalLM` with the R = 1 weights, timed with the same loop over its own `DynamicCache`, and also through
its own `generate`.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from functools import partial
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache, StaticCache

from parloop.bench.bandwidth import measure_memory_bandwidth
from parloop.bench.layouts import all_chosen, step_layouts, switch_count
from parloop.bench.models import CompiledDecode, build_plt, build_reference, plt_config
from parloop.bench.options import DTYPES, BenchOptions, check_options
from parloop.bench.timing import significant, time_decode, time_generate
from parloop.bench.traffic import decode_step_bytes, kv_cache_bytes_formula
from parloop.cache import PLTCache
from parloop.kernels import use_few_row_kernels
from parloop.model import PLTForCausalLM


class Measurer:
    """What every measurement of one `run_bench` call shares: device, dtype, prompts, the measured bandwidth.
    Public for `parloop.gpucheck.bench`, which measures rows one at a time within a time share."""

    def __init__(self, options: BenchOptions, device: torch.device, bandwidth_gbs: float) -> None:
        self.options, self.device, self.bandwidth_gbs = options, device, bandwidth_gbs
        self.dtype = DTYPES[options.dtype]
        self.compile = options.compiled_on(device)
        self.vocab_size = options.model_shape()["vocab_size"]
        self.prompts: dict[tuple[int, int], torch.Tensor] = {}
        # decode steps are timed with this many tokens after the prompt on average (what the attention reads)
        self.mid_length = options.warmup + (options.new_tokens + 1) // 2

    def place(self, model: PLTForCausalLM) -> PLTForCausalLM:
        """`model` on the bench's device and dtype, ready to be timed."""
        return use_few_row_kernels(model.to(device=self.device, dtype=self.dtype))

    def prompt(self, batch: int, context: int) -> torch.Tensor:
        if (batch, context) not in self.prompts:
            gen = torch.Generator().manual_seed(self.options.seed)
            ids = torch.randint(self.vocab_size, (batch, context), generator=gen)
            self.prompts[batch, context] = ids.to(self.device)
        return self.prompts[batch, context]

    def achieved(self, bytes_per_step: int, decode_ms: float) -> dict[str, float]:
        gbs = bytes_per_step / (decode_ms / 1e3) / 1e9
        return dict(bytes_per_step=bytes_per_step, achieved_gbs=significant(gbs),
                    achieved_bandwidth_pct=significant(100 * gbs / self.bandwidth_gbs))

    def reference(self, base: PLTForCausalLM, base_state: dict[str, torch.Tensor],
                  generate: bool = True) -> dict[str, Any]:
        """The `transformers` Llama with the R = 1 weights, and (with `generate`) both through `generate`, whose
        static cache compiles each model once more (None in those fields without it)."""
        o = self.options
        prompt = self.prompt(o.batch, o.context)
        llama = build_reference(base.config, base_state).to(device=self.device, dtype=self.dtype)
        if self.compile:  # transformers' fastest path: static cache, compiled forward (CUDA graphs on a GPU)
            total = o.context + o.warmup + o.new_tokens
            stepper, new_cache = CompiledDecode(llama), partial(StaticCache, config=llama.config, max_cache_len=total)
            base.compile_decode()
        else:
            stepper, new_cache = llama, partial(DynamicCache, config=llama.config)
        timing = time_decode(stepper, new_cache, prompt, o.warmup, o.new_tokens)
        step_bytes = decode_step_bytes(llama, "parallel", 1, o.batch, o.context + self.mid_length, 0)
        timed = partial(time_generate, prompt=prompt, warmup=o.warmup, steps=o.new_tokens, static=self.compile)
        llama_generate, r1_generate = (timed(llama), timed(base)) if generate else (None, None)
        return dict(model="transformers.LlamaForCausalLM", cache="static, compiled" if self.compile else "dynamic",
                    batch=o.batch, context=o.context,
                    new_tokens=o.new_tokens, params=sum(p.numel() for p in llama.parameters()),
                    decode_ms_per_token=significant(timing.decode_ms), **timing.spread(),
                    prefill_ms=significant(timing.prefill_ms),
                    generate_ms_per_token=llama_generate and significant(llama_generate),
                    plt_r1_generate_ms_per_token=r1_generate and significant(r1_generate),
                    **self.achieved(step_bytes, timing.decode_ms))

    def row(self, model: PLTForCausalLM, batch: int, context: int) -> dict[str, Any]:
        o, config = self.options, model.config
        mode, loops = config.plt_loop_mode, config.plt_num_loops
        total = context + o.warmup + o.new_tokens
        if self.compile and model.model.compiled_layers is None:
            model.compile_decode()  # compiled once per model; the throwaway call in time_decode compiles it
        new_cache = partial(PLTCache, config, max_length=total, static=self.compile)
        prompt = self.prompt(batch, context)
        switches = switch_count()
        timing = time_decode(model, new_cache, prompt, o.warmup, o.new_tokens)
        switches = switch_count() - switches
        step_bytes = decode_step_bytes(model, mode, loops, batch, context + self.mid_length, o.window)
        # few-row layouts are a CPU eager matter; hooks on a compiled model would make it recompile
        few_row = self.device.type == "cpu" and not self.compile
        return dict(mode=mode, loops=loops, batch=batch, context=context, new_tokens=o.new_tokens,
                    params=model.num_used_parameters(),
                    decode_ms_per_token=significant(timing.decode_ms), **timing.spread(),
                    prefill_ms=significant(timing.prefill_ms), kv_cache_bytes=timing.cache.kv_cache_bytes(),
                    kv_cache_bytes_formula=kv_cache_bytes_formula(config, batch, total, self.dtype.itemsize),
                    ratio_to_r1=None, **self.achieved(step_bytes, timing.decode_ms),
                    cpu_layouts=step_layouts(model, new_cache, prompt) if few_row else None,
                    cpu_layout_switches=switches if few_row else None)


def _load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): how busy the machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _machine(device: torch.device, bandwidth_gbs: float) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return dict(memory_bandwidth_gbs=significant(bandwidth_gbs), threads=torch.get_num_threads(), load=_load(),
                torch_version=torch.__version__, device=str(device), device_name=name)


def _runs(options: BenchOptions) -> list[tuple[int, str, int, int]]:
    """(loops, mode, batch, context) in measuring order: grouped by (R, mode), so each model is built once."""
    modes = list(dict.fromkeys(options.modes))
    runs = ((r, m, b, c) for r, b, c in options.points() for m in modes)
    return sorted(runs, key=lambda run: (run[0], modes.index(run[1]), run[2], run[3]))


def _measure_rows(measurer: Measurer, runs: list[tuple[int, str, int, int]], base: PLTForCausalLM,
                  base_state: dict[str, torch.Tensor], max_length: int, bar: tqdm) -> list[dict[str, Any]]:
    """A row per run; `base` is the R = 1 model, every other model loads `base_state`."""
    o = measurer.options
    rows: list[dict[str, Any]] = []
    model, model_key = None, None
    for loops, mode, batch, context in runs:
        bar.set_postfix_str(f"{mode} R={loops} batch={batch} context={context}")
        if model_key != (loops, mode):
            model = None  # free the previous model before building the next
            config = plt_config(o.model_shape(), loops, mode, o.window, max_length)
            model = base if (loops, mode) == (1, "parallel") else measurer.place(build_plt(config, base_state, o.seed))
            model_key = (loops, mode)
        rows.append(measurer.row(model, batch, context))
        bar.update()
    return rows


def _r1_row(rows: list[dict[str, Any]], batch: int, context: int) -> dict[str, Any] | None:
    """The R = 1 row at (batch, context): `parallel` if measured, else any mode (at R = 1 they are one model)."""
    r1 = [r for r in rows if r["loops"] == 1 and r["batch"] == batch and r["context"] == context]
    r1.sort(key=lambda r: r["mode"] != "parallel")
    return r1[0] if r1 else None


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        r1 = _r1_row(rows, row["batch"], row["context"])
        if r1 is not None:
            row["ratio_to_r1"] = significant(row["decode_ms_per_token"] / r1["decode_ms_per_token"])


def _add_order_spread(rows: list[dict[str, Any]], again: list[dict[str, Any]]) -> None:
    """Each row's median from the second pass (`again`, measured in reverse order), and how far apart the two are
    in % of the lower: noise or order effects that a single pass would hide."""
    second = {(r["mode"], r["loops"], r["batch"], r["context"]): r["decode_ms_per_token"] for r in again}
    for row in rows:
        first, other = row["decode_ms_per_token"], second[row["mode"], row["loops"], row["batch"], row["context"]]
        row["decode_ms_reversed"] = other
        row["order_spread_pct"] = significant(100 * abs(first - other) / min(first, other))


def _compare_to_reference(reference: dict[str, Any], r1: dict[str, Any] | None) -> None:
    reference["r1_over_reference"] = (None if r1 is None else
                                      significant(r1["decode_ms_per_token"] / reference["decode_ms_per_token"]))
    reference["r1_over_reference_generate"] = significant(reference["plt_r1_generate_ms_per_token"]
                                                          / reference["generate_ms_per_token"])


def run_bench(options: BenchOptions, progress: bool = True) -> dict[str, Any]:
    """Measure every (mode, loops, batch, context) of `options` and the `transformers` reference.

    Returns `{"rows": [...], "reference": {...}, "machine": {...}, "model": {...}, "options": {...}}`; rows carry
    `mode, loops, batch, context, new_tokens, params, decode_ms_per_token (median), decode_ms_p10, decode_ms_p90,
    prefill_ms, kv_cache_bytes (from the cache), kv_cache_bytes_formula (docs/design.md §3), ratio_to_r1,
    bytes_per_step, achieved_gbs, achieved_bandwidth_pct, cpu_layouts` (the few-row product layouts a CPU decode
    step used, None on GPUs and compiled), cpu_layout_switches` (how often the autotuner changed a layout during the
    row's timing); with `repeat_reversed`, also `decode_ms_reversed` (the median of a
    second pass in reverse order) and `order_spread_pct`.
    """
    device = check_options(options)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    bandwidth = measure_memory_bandwidth(device, options.bandwidth_mb)
    machine = _machine(device, bandwidth)
    measurer = Measurer(options, device, bandwidth)
    shape, runs = options.model_shape(), _runs(options)
    max_length = max(c for _, _, c in options.points()) + options.warmup + options.new_tokens

    passes = 2 if options.repeat_reversed else 1
    bar = tqdm(total=passes * len(runs) + 1, desc="parloop bench", unit="run", disable=not progress)
    bar.set_postfix_str("transformers Llama reference")
    base = build_plt(plt_config(shape, 1, "parallel", options.window, max_length), None, options.seed)
    base_state = base.state_dict()  # kept on the CPU in float32: what every other model loads
    base = measurer.place(base)
    reference = measurer.reference(base, base_state)
    bar.update()
    rows = _measure_rows(measurer, runs, base, base_state, max_length, bar)
    if options.repeat_reversed:
        _add_order_spread(rows, _measure_rows(measurer, runs[::-1], base, base_state, max_length, bar))
    bar.close()

    _add_ratios(rows)
    machine["cpu_few_row_layouts"] = all_chosen()
    machine["load_after"] = _load()
    machine["compiled"] = measurer.compile
    _compare_to_reference(reference, _r1_row(rows, options.batch, options.context))
    model_info = dict(preset=options.preset, **shape, head_dim=base.config.head_dim, tie_word_embeddings=True,
                      window=options.window, dtype=options.dtype, params_r1=base.num_used_parameters())
    return dict(rows=rows, reference=reference, machine=machine, model=model_info, options=asdict(options))
