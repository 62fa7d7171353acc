"""`parloop bench`: decode latency, prefill time and KV-cache bytes per loop mode and loop count.

Every row builds a model with random weights (nothing is downloaded) and measures it the same way: a prefill of a
random prompt of `context` tokens into a fresh `PLTCache` (timed once), then `warmup` untimed and `new_tokens`
timed single-token greedy decode steps; the row reports the median step time, the KV bytes the cache holds
(checked against docs/design.md §3) and the achieved share of the machine's memory bandwidth.

Modules, one job each: `options` (presets, what to measure, validation), `models` (PLT models sharing the R = 1
weights, and the `transformers` Llama reference), `timing` (decode and `generate` step clocks), `bandwidth` (the
machine's copy bandwidth), `traffic` (KV-cache and per-step byte formulas), `layouts` (the CPU few-row layouts a
step used), `runner` (one run: every row and the reference), `table` and `plots` (output), `command` (the CLI).
"""

from parloop.bench.options import BenchError, BenchOptions
from parloop.bench.runner import run_bench
from parloop.bench.table import format_table

__all__ = ["BenchError", "BenchOptions", "format_table", "run_bench"]
