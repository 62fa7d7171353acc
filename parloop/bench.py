"""`parloop bench`: decode latency, prefill time and KV-cache bytes per loop mode and loop count.

Every row builds a model with random weights (nothing is downloaded) and measures it the same way:

1. prefill: one forward over a random prompt of `context` tokens into a fresh `PLTCache` (timed once);
2. decode: `warmup` untimed steps, then `new_tokens` timed steps, each one
   `model(input_ids=next_token, past_key_values=cache, use_cache=True)` under `torch.inference_mode()` with the
   greedy next token fed back; the row reports the median step time.

All models share one set of weights: the R = 1 model is built from `--seed`, and every other (mode, R) model
loads its state dict; only the G-SWA gates (absent at R = 1 and in `sequential` mode) are new, seeded by R, so
`parallel` and `sequential_shared` at the same R have the same gates. The peer is `transformers`'
`LlamaForCausalLM` with the R = 1 weights, timed with the same loop over its own `DynamicCache`, and also through
its own `generate` (median time between consecutive new tokens, after the same warm-up).

Achieved bandwidth = bytes a decode step must read / step time, as a share of the machine's memory bandwidth
(best of several large tensor copies, bytes read + written). The bytes a step must read: every layer weight once
per pass through the layers (1 pass in `parallel` mode and at R = 1, R passes in the sequential modes), the final
norm and the full `lm_head` once, the embedding rows of the new tokens, and the keys/values the step attends to
(`parallel`: loop 0's full cache + R-1 windows; `sequential_shared`: loop 0's full cache once per loop + R-1
windows; `sequential`: R full caches).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from parloop.cache import PLTCache
from parloop.config import LOOP_MODES, ConfigError, PLTConfig
from parloop.kernels import chosen_layouts
from parloop.model import PLTForCausalLM

# Llama-like shapes; tied embeddings, so "100m" is 100.1M parameters at R = 1 (the lm_head is the embedding).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SWEEP_LOOPS = (1, 2, 3, 4, 5)
SWEEP_BATCHES = (1, 4, 16)
SWEEP_CONTEXTS = (128, 256, 512, 1024, 2048, 4096)
# (CLI option, model field) pairs that override a preset's shape
SHAPE_OPTIONS = (("hidden", "hidden_size"), ("layers", "num_hidden_layers"), ("heads", "num_attention_heads"),
                 ("kv_heads", "num_key_value_heads"), ("intermediate", "intermediate_size"), ("vocab", "vocab_size"))


class BenchError(ValueError):
    """Options that cannot be benchmarked; the message says what to change."""


@dataclass
class BenchOptions:
    """What `run_bench` measures. Defaults are those of `parloop bench`."""

    preset: str = "100m"
    shape: dict[str, int] = field(default_factory=dict)  # overrides of the preset's fields, e.g. {"hidden_size": 512}
    loops: Sequence[int] = (1, 2, 3, 4)
    modes: Sequence[str] = LOOP_MODES
    batch: int = 1
    context: int = 512
    new_tokens: int = 32
    warmup: int = 10
    dtype: str = "float32"
    threads: int | None = None
    device: str = "cpu"
    window: int = 64
    seed: int = 0
    sweep: bool = False
    sweep_loops: Sequence[int] = SWEEP_LOOPS
    sweep_batches: Sequence[int] = SWEEP_BATCHES
    sweep_contexts: Sequence[int] = SWEEP_CONTEXTS
    bandwidth_mb: int = 512
    compile: bool = False

    def model_shape(self) -> dict[str, int]:
        if self.preset not in PRESETS:
            raise BenchError(f"unknown preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        return {**PRESETS[self.preset], **self.shape}

    def points(self) -> list[tuple[int, int, int]]:
        """(loops, batch, context) to measure. A sweep is loops x batches at `context` plus loops x contexts at
        `batch` (not the full product, whose long contexts at large batches would take hours on a CPU)."""
        if not self.sweep:
            return sorted({(r, self.batch, self.context) for r in self.loops})
        grid = {(r, b, self.context) for r in self.sweep_loops for b in self.sweep_batches}
        grid |= {(r, self.batch, c) for r in self.sweep_loops for c in self.sweep_contexts}
        return sorted(grid)


# -- formulas -------------------------------------------------------------------------------------------------------
def kv_slots(mode: str, loops: int, length: int, window: int) -> int:
    """Key/value slots per layer and sequence that the cache holds after `length` tokens (DESIGN.md section 3):
    one full cache plus R-1 windows of `window + 1`, or R full caches in `sequential` mode."""
    if mode == "sequential":
        return loops * length
    return length + (loops - 1) * min(length, window + 1)


def kv_cache_bytes_formula(config: PLTConfig, batch: int, length: int, element_size: int) -> int:
    """DESIGN.md section 3's KV bytes, summed over layers and sequences."""
    per_slot = 2 * config.num_key_value_heads * config.head_dim * element_size  # K and V
    slots = kv_slots(config.plt_loop_mode, config.plt_num_loops, length, config.window)
    return config.num_hidden_layers * batch * per_slot * slots


def _sig(x: float) -> float:
    """x to 4 significant digits, for readable JSON that keeps small figures (tiny models) non-zero."""
    return float(f"{x:.4g}")


def _nbytes(params: Any) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def decode_step_bytes(model: nn.Module, mode: str, loops: int, batch: int, length: int, window: int) -> int:
    """Bytes one decode step must read from memory with `length` tokens in the cache (see the module docstring).
    Works for `PLTForCausalLM` and `LlamaForCausalLM` (same module names; pass mode "parallel", loops 1)."""
    config = model.config
    element_size = model.lm_head.weight.element_size()
    passes = 1 if mode == "parallel" else loops
    layers = _nbytes(model.model.layers.parameters())
    head = _nbytes(model.lm_head.parameters()) + _nbytes(model.model.norm.parameters())
    embedding_rows = batch * config.hidden_size * element_size
    read_slots = kv_slots(mode, loops, length, window)
    if mode == "sequential_shared":  # every loop's global branch reads loop 0's full cache again
        read_slots += (loops - 1) * length
    kv = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * config.head_dim * element_size
    return passes * layers + head + embedding_rows + kv * read_slots


# -- models ---------------------------------------------------------------------------------------------------------
def plt_config(shape: dict[str, int], loops: int, mode: str, window: int, max_length: int) -> PLTConfig:
    return PLTConfig(**shape, tie_word_embeddings=True, plt_num_loops=loops, plt_loop_mode=mode,
                     plt_window_size=[window, 0], max_position_embeddings=max(4096, max_length))


def build_plt(config: PLTConfig, base_state: dict[str, torch.Tensor] | None, seed: int) -> PLTForCausalLM:
    """A model of `config` with the weights of `base_state` (the R = 1 model); gates are seeded by R."""
    torch.manual_seed(seed + 1000 * config.plt_num_loops)
    model = PLTForCausalLM(config)
    if base_state is not None:
        missing, unexpected = model.load_state_dict(base_state, strict=False)
        not_gates = [k for k in missing if ".plt_gate." not in k]
        if unexpected or not_gates:
            raise RuntimeError(f"R = 1 weights do not fit the {config.plt_loop_mode} R = {config.plt_num_loops} "
                               f"model: missing {not_gates}, unexpected {unexpected}")
    return model.eval()


def build_reference(config: PLTConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """`transformers`' `LlamaForCausalLM` with the weights of an R = 1 PLT model (the names are the same)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
              "tie_word_embeddings", "attention_bias", "mlp_bias")
    llama = LlamaForCausalLM(LlamaConfig(**{k: getattr(config, k) for k in fields}, attn_implementation="sdpa"))
    llama.load_state_dict(state, strict=True)
    return llama.eval()


# -- measuring ------------------------------------------------------------------------------------------------------
def _synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def measure_memory_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 10) -> float:
    """GB/s of a large tensor copy (bytes read + written), best of `repeats`: the machine's practical limit."""
    sync = _synchronizer(device)
    src = torch.rand(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages is not a copy
    best = math.inf
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best / 1e9


@dataclass
class Timing:
    prefill_ms: float
    step_ms: list[float]
    cache: Any

    @property
    def decode_ms(self) -> float:
        return statistics.median(self.step_ms)

    def spread(self) -> dict[str, float]:
        """10th and 90th percentile step times: how noisy the median is."""
        deciles = statistics.quantiles(self.step_ms, n=10) if len(self.step_ms) > 1 else self.step_ms * 9
        return dict(decode_ms_p10=_sig(deciles[0]), decode_ms_p90=_sig(deciles[-1]))


def time_decode(model: nn.Module, new_cache: Callable[[], Any], prompt: torch.Tensor, warmup: int,
                steps: int) -> Timing:
    """Prefill `prompt` into `new_cache()`, then decode `warmup` + `steps` greedy tokens one forward call each."""
    sync = _synchronizer(prompt.device)

    def forward(input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    with torch.inference_mode():
        # first-call costs (allocator, thread pool, lazy imports in transformers) off the clock
        throwaway = new_cache()
        forward(forward(prompt[:, :8], throwaway), throwaway)
        del throwaway
        cache = new_cache()
        sync()
        start = time.perf_counter()
        token = forward(prompt, cache)
        sync()
        prefill_ms = (time.perf_counter() - start) * 1e3
        step_ms = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            token = forward(token, cache)
            sync()
            if i >= warmup:
                step_ms.append((time.perf_counter() - start) * 1e3)
    return Timing(prefill_ms, step_ms, cache)


class _StepClock(StoppingCriteria):
    """Never stops generation; notes the time after each new token, so generate's own steps can be timed."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync, self.times = sync, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.sync()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def time_generate(model: nn.Module, prompt: torch.Tensor, warmup: int, steps: int) -> float:
    """Median ms per token of greedy `model.generate` with its own cache: time between consecutive new tokens
    (everything generate does per token), skipping the prefill's token and `warmup` steps."""
    clock = _StepClock(_synchronizer(prompt.device))
    n = warmup + steps + 1
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
    gaps = [(b - a) * 1e3 for a, b in zip(clock.times[:-1], clock.times[1:], strict=True)]
    return statistics.median(gaps[warmup:])


# -- the benchmark --------------------------------------------------------------------------------------------------
def _check(options: BenchOptions) -> torch.device:
    if options.dtype not in DTYPES:
        raise BenchError(f"unknown dtype {options.dtype!r}: use one of {', '.join(DTYPES)}")
    bad_modes = [m for m in options.modes if m not in LOOP_MODES]
    if bad_modes or not options.modes:
        raise BenchError(f"modes {list(options.modes)} are not valid: use some of {', '.join(LOOP_MODES)}")
    numbers = dict(batch=options.batch, context=options.context, new_tokens=options.new_tokens,
                   bandwidth_mb=options.bandwidth_mb, loops=min(options.loops, default=0),
                   sweep_loops=min(options.sweep_loops, default=0), sweep_batches=min(options.sweep_batches, default=0),
                   sweep_contexts=min(options.sweep_contexts, default=0))
    for name, value in numbers.items():
        if value < 1:
            raise BenchError(f"{name} must be >= 1 (got {value})")
    if options.warmup < 0 or options.window < 0:
        raise BenchError(f"warmup and window must be >= 0 (got {options.warmup}, {options.window})")
    try:
        device = torch.device(options.device)
    except RuntimeError as err:
        raise BenchError(f"--device {options.device!r} is not a device: use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {options.device}: this torch ({torch.__version__}) sees no CUDA GPU; run on a "
                         "machine with one and a CUDA build of torch, or use --device cpu")
    if options.threads is not None and options.threads < 1:
        raise BenchError(f"threads must be >= 1 (got {options.threads})")
    try:
        PLTConfig(**options.model_shape())
    except ConfigError as err:
        raise BenchError(f"model shape {options.model_shape()} cannot work: {err}") from err
    return device


class _Runner:
    """What every measurement of one `run_bench` call shares: device, dtype, prompts, the measured bandwidth."""

    def __init__(self, options: BenchOptions, device: torch.device, bandwidth_gbs: float) -> None:
        self.options, self.device, self.bandwidth_gbs = options, device, bandwidth_gbs
        self.dtype = DTYPES[options.dtype]
        self.vocab_size = options.model_shape()["vocab_size"]
        self.prompts: dict[tuple[int, int], torch.Tensor] = {}
        # decode steps are timed with this many tokens after the prompt on average (what the attention reads)
        self.mid_length = options.warmup + (options.new_tokens + 1) // 2

    def prompt(self, batch: int, context: int) -> torch.Tensor:
        if (batch, context) not in self.prompts:
            gen = torch.Generator().manual_seed(self.options.seed)
            ids = torch.randint(self.vocab_size, (batch, context), generator=gen)
            self.prompts[batch, context] = ids.to(self.device)
        return self.prompts[batch, context]

    def achieved(self, bytes_per_step: int, decode_ms: float) -> dict[str, float]:
        gbs = bytes_per_step / (decode_ms / 1e3) / 1e9
        return dict(bytes_per_step=bytes_per_step, achieved_gbs=_sig(gbs),
                    achieved_bandwidth_pct=_sig(100 * gbs / self.bandwidth_gbs))

    def reference(self, base: PLTForCausalLM, base_state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The `transformers` Llama with the R = 1 weights, and R = 1 itself through `generate`."""
        o = self.options
        prompt = self.prompt(o.batch, o.context)
        llama = build_reference(base.config, base_state).to(device=self.device, dtype=self.dtype)
        timing = time_decode(llama, partial(DynamicCache, config=llama.config), prompt, o.warmup, o.new_tokens)
        step_bytes = decode_step_bytes(llama, "parallel", 1, o.batch, o.context + self.mid_length, 0)
        return dict(model="transformers.LlamaForCausalLM", batch=o.batch, context=o.context,
                    new_tokens=o.new_tokens, params=sum(p.numel() for p in llama.parameters()),
                    decode_ms_per_token=_sig(timing.decode_ms), **timing.spread(),
                    prefill_ms=_sig(timing.prefill_ms),
                    generate_ms_per_token=_sig(time_generate(llama, prompt, o.warmup, o.new_tokens)),
                    plt_r1_generate_ms_per_token=_sig(time_generate(base, prompt, o.warmup, o.new_tokens)),
                    **self.achieved(step_bytes, timing.decode_ms))

    def row(self, model: PLTForCausalLM, batch: int, context: int) -> dict[str, Any]:
        o, config = self.options, model.config
        mode, loops = config.plt_loop_mode, config.plt_num_loops
        total = context + o.warmup + o.new_tokens
        if o.compile:
            model.compile_decode()  # compiled once per model; the throwaway call in time_decode compiles it
        timing = time_decode(model, partial(PLTCache, config, max_length=total, static=o.compile),
                             self.prompt(batch, context), o.warmup, o.new_tokens)
        step_bytes = decode_step_bytes(model, mode, loops, batch, context + self.mid_length, o.window)
        return dict(mode=mode, loops=loops, batch=batch, context=context, new_tokens=o.new_tokens,
                    params=sum(p.numel() for p in model.parameters()),
                    decode_ms_per_token=_sig(timing.decode_ms), **timing.spread(),
                    prefill_ms=_sig(timing.prefill_ms), kv_cache_bytes=timing.cache.kv_cache_bytes(),
                    kv_cache_bytes_formula=kv_cache_bytes_formula(config, batch, total, self.dtype.itemsize),
                    ratio_to_r1=None, **self.achieved(step_bytes, timing.decode_ms))


def run_bench(options: BenchOptions, progress: bool = True) -> dict[str, Any]:
    """Measure every (mode, loops, batch, context) of `options` and the `transformers` reference.

    Returns `{"rows": [...], "reference": {...}, "machine": {...}, "model": {...}, "options": {...}}`; rows carry
    `mode, loops, batch, context, new_tokens, params, decode_ms_per_token (median), decode_ms_p10, decode_ms_p90,
    prefill_ms, kv_cache_bytes (from the cache), kv_cache_bytes_formula (DESIGN.md section 3), ratio_to_r1,
    bytes_per_step, achieved_gbs, achieved_bandwidth_pct`.
    """
    from tqdm import tqdm

    device = _check(options)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    bandwidth = measure_memory_bandwidth(device, options.bandwidth_mb)
    machine = dict(memory_bandwidth_gbs=_sig(bandwidth), threads=torch.get_num_threads(),
                   torch_version=torch.__version__, device=str(device),
                   device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine())
    runner = _Runner(options, device, bandwidth)
    shape, points = options.model_shape(), options.points()
    max_length = max(c for _, _, c in points) + options.warmup + options.new_tokens
    modes = list(dict.fromkeys(options.modes))
    runs = sorted(((r, m, b, c) for r, b, c in points for m in modes),
                  key=lambda run: (run[0], modes.index(run[1]), run[2], run[3]))  # one model per (R, mode)

    bar = tqdm(total=len(runs) + 1, desc="parloop bench", unit="run", disable=not progress)
    bar.set_postfix_str("transformers Llama reference")
    base = build_plt(plt_config(shape, 1, "parallel", options.window, max_length), None, options.seed)
    base_state = base.state_dict()  # kept on the CPU in float32: what every other model loads
    base = base.to(device=device, dtype=runner.dtype)
    reference = runner.reference(base, base_state)
    bar.update()

    rows: list[dict[str, Any]] = []
    model, model_key = None, None
    for loops, mode, batch, context in runs:
        bar.set_postfix_str(f"{mode} R={loops} batch={batch} context={context}")
        if model_key != (loops, mode):
            model = None  # free the previous model before building the next
            config = plt_config(shape, loops, mode, options.window, max_length)
            model = base if (loops, mode) == (1, "parallel") else build_plt(config, base_state, options.seed)
            model, model_key = model.to(device=device, dtype=runner.dtype), (loops, mode)
        rows.append(runner.row(model, batch, context))
        bar.update()
    bar.close()

    _add_ratios(rows)
    # which product layout the stacked decode steps ended up using per weight shape and row count (CPU only)
    machine["cpu_few_row_layouts"] = {f"{shape[0]}x{shape[1]} rows={rows_} threads={threads}": name
                                      for (shape, rows_, _, threads), name in chosen_layouts().items()}
    r1 = _r1_row(rows, options.batch, options.context)
    reference["r1_over_reference"] = (None if r1 is None else
                                      _sig(r1["decode_ms_per_token"] / reference["decode_ms_per_token"]))
    reference["r1_over_reference_generate"] = _sig(reference["plt_r1_generate_ms_per_token"]
                                                    / reference["generate_ms_per_token"])
    model_info = dict(preset=options.preset, **shape, head_dim=base.config.head_dim, tie_word_embeddings=True,
                      window=options.window, dtype=options.dtype, params_r1=sum(p.numel() for p in base.parameters()))
    return dict(rows=rows, reference=reference, machine=machine, model=model_info, options=asdict(options))


def _r1_row(rows: list[dict[str, Any]], batch: int, context: int) -> dict[str, Any] | None:
    """The R = 1 row at (batch, context): `parallel` if measured, else any mode (at R = 1 they are one model)."""
    r1 = [r for r in rows if r["loops"] == 1 and r["batch"] == batch and r["context"] == context]
    r1.sort(key=lambda r: r["mode"] != "parallel")
    return r1[0] if r1 else None


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        r1 = _r1_row(rows, row["batch"], row["context"])
        if r1 is not None:
            row["ratio_to_r1"] = _sig(row["decode_ms_per_token"] / r1["decode_ms_per_token"])


# -- output ---------------------------------------------------------------------------------------------------------
def format_table(result: dict[str, Any]) -> str:
    """The rows as an aligned text table, with the model, the reference and the machine below."""
    columns = [("mode", "mode", "{}"), ("R", "loops", "{}"), ("batch", "batch", "{}"), ("context", "context", "{}"),
               ("decode ms/tok", "decode_ms_per_token", "{:.2f}"), ("x R=1", "ratio_to_r1", "{:.2f}"),
               ("prefill ms", "prefill_ms", "{:.1f}"), ("KV bytes", "kv_cache_bytes", "{:,}"),
               ("= formula", "kv_cache_bytes_formula", "{}"), ("GB/s", "achieved_gbs", "{:.1f}"),
               ("% bw", "achieved_bandwidth_pct", "{:.1f}")]
    cells = [[title for title, _, _ in columns]]
    for row in result["rows"]:
        line = []
        for _, key, fmt in columns:
            value = row[key]
            if key == "kv_cache_bytes_formula":
                value = "yes" if value == row["kv_cache_bytes"] else f"NO ({value:,})"
            line.append("-" if value is None else fmt.format(value))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
             for line in cells]
    lines.insert(1, "-" * len(lines[0]))

    m, ref, mach = result["model"], result["reference"], result["machine"]
    lines.insert(0, f"model: preset {m['preset']}, {m['params_r1'] / 1e6:.1f}M parameters at R=1, hidden "
                    f"{m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']} heads / "
                    f"{m['num_key_value_heads']} KV heads, window {m['window']}, {m['dtype']}; decode = median of "
                    f"{result['options']['new_tokens']} steps after {result['options']['warmup']} warm-up steps")
    r1_ratio = "-" if ref["r1_over_reference"] is None else f"{ref['r1_over_reference']:.2f}"
    lines.append(f"reference: transformers LlamaForCausalLM, same weights as R=1 (batch {ref['batch']}, context "
                 f"{ref['context']}): {ref['decode_ms_per_token']:.2f} ms/tok by the same forward loop "
                 f"({ref['achieved_bandwidth_pct']:.1f} % bw), {ref['generate_ms_per_token']:.2f} ms/tok through "
                 f"generate; R=1 / reference = {r1_ratio} (forward loop), "
                 f"{ref['r1_over_reference_generate']:.2f} (generate, R=1 at "
                 f"{ref['plt_r1_generate_ms_per_token']:.2f} ms/tok)")
    lines.append(f"machine: {mach['device']} ({mach['device_name']}), {mach['threads']} threads, torch "
                 f"{mach['torch_version']}, memory bandwidth {mach['memory_bandwidth_gbs']:.1f} GB/s (tensor copy)")
    return "\n".join(lines)


# one look per mode in every plot; sequential_shared dashed, since its KV line lies on top of parallel's
MODE_STYLE = {"parallel": dict(color="C0", marker="o"), "sequential_shared": dict(color="C1", marker="s", ls="--"),
              "sequential": dict(color="C2", marker="^")}


def write_plots(result: dict[str, Any], plot_dir: Path) -> list[Path]:
    """PNG plots of what the rows vary: decode latency vs loops per mode (a panel per batch, at the main context)
    and KV bytes vs context per mode (at the main batch). A plot whose x axis has fewer than 2 values is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, options, ref = result["rows"], result["options"], result["reference"]
    modes = [m for m in options["modes"] if any(r["mode"] == m for r in rows)]
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        written.append(plot_dir / name)
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

    at_context = [r for r in rows if r["context"] == options["context"]]
    batches = sorted({r["batch"] for r in at_context
                      if len({q["loops"] for q in at_context if q["batch"] == r["batch"]}) >= 2})
    if batches:
        fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
        for ax, batch in zip(axes[0], batches, strict=True):
            for mode in modes:
                pts = sorted((r["loops"], r["decode_ms_per_token"]) for r in at_context
                             if r["batch"] == batch and r["mode"] == mode)
                ax.plot(*zip(*pts, strict=True), label=mode, **MODE_STYLE[mode])
            if (ref["batch"], ref["context"]) == (batch, options["context"]):
                ax.axhline(ref["decode_ms_per_token"], color="grey", ls=":", label="transformers Llama")
            ax.set(title=f"batch {batch}, context {options['context']}", xlabel="loops R",
                   ylabel="decode ms / token (median)")
            ax.set_xticks(sorted({r["loops"] for r in at_context if r["batch"] == batch}))
            ax.set_ylim(bottom=0)
            ax.legend()
        save(fig, "decode_latency_vs_loops.png")

    at_batch = [r for r in rows if r["batch"] == options["batch"]]
    contexts = sorted({r["context"] for r in at_batch})
    if len(contexts) >= 2:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        top = max(r["loops"] for r in at_batch)
        r1 = sorted((r["context"], r["kv_cache_bytes"] / 2**20) for r in at_batch
                    if r["loops"] == 1 and r["mode"] == at_batch[0]["mode"])
        if len(r1) >= 2:
            ax.plot(*zip(*r1, strict=True), color="black", marker=".", label="R=1 (every mode)")
        for mode in modes if top > 1 else []:
            pts = sorted((r["context"], r["kv_cache_bytes"] / 2**20) for r in at_batch
                         if r["mode"] == mode and r["loops"] == top)
            if len(pts) >= 2:
                ax.plot(*zip(*pts, strict=True), label=f"{mode} R={top}", **MODE_STYLE[mode])
        ax.set(title=f"KV cache after prefill + decode, batch {options['batch']}, window {options['window']}",
               xlabel="context tokens", ylabel="MiB", xscale="log", yscale="log")
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.minorticks_off()
        ax.legend()
        save(fig, "kv_bytes_vs_context.png")
    return written


# -- command line ---------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Decode latency is the median of --new-tokens single-token forward calls after --warmup "
                     "ones, with the cache prefilled by a random prompt of --context tokens; every model uses "
                     "the same random weights. Timings depend on what else runs on the machine.")
    model = parser.add_argument_group("model (random weights)")
    model.add_argument("--preset", choices=list(PRESETS), default="100m",
                       help="model shape: tiny (smoke tests), 100m (hidden 768, 12 layers, 12 heads, 4 KV heads, "
                            "intermediate 2048, vocab 32000, tied embeddings: 100.1M parameters), 1b (hidden 2048, "
                            "22 layers, 32/4 heads, intermediate 5632: 1.03B)")
    for option, name in SHAPE_OPTIONS:
        model.add_argument(f"--{option.replace('_', '-')}", type=_positive_int, default=None,
                           help=f"override the preset's {name}%(default).0s")
    model.add_argument("--window", type=int, default=64, help="sliding window W of loops >= 1 (keys t-W..t)")
    model.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights and activations")
    model.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")

    what = parser.add_argument_group("what to measure")
    what.add_argument("--loops", type=_positive_int, nargs="+", default=[1, 2, 3, 4], help="loop counts R")
    what.add_argument("--modes", choices=LOOP_MODES, nargs="+", default=list(LOOP_MODES), help="loop modes")
    what.add_argument("--batch", type=_positive_int, default=1, help="sequences decoded together")
    what.add_argument("--context", type=_positive_int, default=512, help="prompt tokens prefilled before decoding")
    what.add_argument("--new-tokens", type=_positive_int, default=32, help="timed decode steps per row")
    what.add_argument("--warmup", type=int, default=10, help="untimed decode steps before the timed ones")
    what.add_argument("--compile", action="store_true",
                      help="decode with a static cache and the layer stack compiled by torch.compile (the "
                           "first call per model compiles, off the clock)")
    what.add_argument("--sweep", action="store_true",
                      help="instead of --loops: every --sweep-loops x --sweep-batches at --context, and every "
                           "--sweep-loops x --sweep-contexts at --batch; writes plots (long on a CPU with the "
                           "100m model: tens of minutes)")
    what.add_argument("--sweep-loops", type=_positive_int, nargs="+", default=list(SWEEP_LOOPS), help="sweep's R")
    what.add_argument("--sweep-batches", type=_positive_int, nargs="+", default=list(SWEEP_BATCHES),
                      help="sweep's batch sizes")
    what.add_argument("--sweep-contexts", type=_positive_int, nargs="+", default=list(SWEEP_CONTEXTS),
                      help="sweep's context lengths")

    where = parser.add_argument_group("machine and output")
    where.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    # "%(default).0s" prints nothing; it stops the CLI's formatter from adding "(default: None)"
    where.add_argument("--threads", type=_positive_int, default=None,
                       help="torch.set_num_threads (default: torch's choice)%(default).0s")
    where.add_argument("--bandwidth-mb", type=_positive_int, default=512,
                       help="size of the tensor copied to measure memory bandwidth")
    where.add_argument("--json", type=Path, default=None, metavar="FILE",
                       help="write the rows, reference, machine and model as JSON%(default).0s")
    where.add_argument("--plot-dir", type=Path, default=None, metavar="DIR",
                       help="write PNG plots here (default: none, or bench-plots with --sweep)%(default).0s")
    where.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    shape = {name: getattr(args, option) for option, name in SHAPE_OPTIONS if getattr(args, option) is not None}
    return BenchOptions(
        preset=args.preset, shape=shape, loops=args.loops, modes=args.modes, batch=args.batch, context=args.context,
        new_tokens=args.new_tokens, warmup=args.warmup, dtype=args.dtype, threads=args.threads, device=args.device,
        window=args.window, seed=args.seed, sweep=args.sweep, sweep_loops=args.sweep_loops,
        sweep_batches=args.sweep_batches, sweep_contexts=args.sweep_contexts, bandwidth_mb=args.bandwidth_mb,
        compile=args.compile)


def run(args: argparse.Namespace) -> int:
    try:
        result = run_bench(options_from_args(args), progress=not args.no_progress)
    except BenchError as err:
        print(f"parloop bench: error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    plot_dir = args.plot_dir if args.plot_dir is not None else (Path("bench-plots") if args.sweep else None)
    if plot_dir is not None:
        for path in write_plots(result, plot_dir):
            print(f"wrote {path}")
    return 0
