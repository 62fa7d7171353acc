"""`parloop bench --preset 7b`: decode time of the released shapes in bf16, int8 and int4, side by side.

Each weight format is measured in a process of its own (`python -m parloop.bench.run7b SPEC`), so that its peak
resident memory is its own (plus the interpreter's, ~0.5 GB). The formats run one after another in one `parloop
bench` run, each right after this process measures the machine's copy bandwidth again, so that ratios between
them come from the same conditions as far as a shared machine allows. Every (R, mode) row loads the checkpoint
lazily (memory-mapped) with that loop count and mode. The embedding's bytes are read into the OS page cache once
first (`parloop.checkpoint.read_into_page_cache`), as `parloop generate` and `serve` do, so that a step does not wait
on the disk for a token's row.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import parloop  # noqa: F401  (registers the model type with the Auto classes)
from parloop.bench.bandwidth import measure_memory_bandwidth
from parloop.bench.options import BenchError, BenchOptions, check_options
from parloop.bench.preset7b import RELEASED_7B, cache_root, checkpoint_for
from parloop.bench.timing import significant, time_decode
from parloop.bench.traffic import decode_step_bytes
from parloop.cache import PLTCache
from parloop.checkpoint import read_into_page_cache
from parloop.kernels import use_few_row_kernels

WEIGHTS = ("bf16", "int8", "int4")


def _files_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over an
    exec, so a child would report its parent's peak when that was higher."""
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_format(spec: dict[str, Any]) -> dict[str, Any]:
    """Every (loops, mode) row of one weight format (`spec`: directory, weights, loops, modes, context, warmup,
    new_tokens, threads, memory_bandwidth_gbs, seed, vocab_size), in this process."""
    torch.set_num_threads(spec["threads"])
    directory = Path(spec["directory"])
    bandwidth = spec["memory_bandwidth_gbs"]
    prompt = torch.randint(spec["vocab_size"], (1, spec["context"]),
                           generator=torch.Generator().manual_seed(spec["seed"]))
    start = time.perf_counter()
    page_cache_bytes = read_into_page_cache(directory)  # the embedding: see its docstring
    page_cache_s = time.perf_counter() - start
    rows, load_s = [], []
    for loops in spec["loops"]:
        for mode in spec["modes"]:
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(directory, plt_num_loops=loops, plt_loop_mode=mode)
            model = use_few_row_kernels(model.eval())
            load_s.append(time.perf_counter() - start)
            length = spec["context"] + spec["warmup"] + spec["new_tokens"]
            timing = time_decode(model, lambda c=model.config, n=length: PLTCache(c, max_length=n), prompt,
                                 spec["warmup"], spec["new_tokens"])
            mid = spec["context"] + spec["warmup"] + spec["new_tokens"] // 2
            step_bytes = decode_step_bytes(model, mode, loops, 1, mid, model.config.window)
            gbs = step_bytes / (timing.decode_ms / 1e3) / 1e9
            rows.append(dict(weights=spec["weights"], mode=mode, loops=loops,
                             decode_ms_per_token=significant(timing.decode_ms), **timing.spread(),
                             prefill_ms=significant(timing.prefill_ms), bytes_per_step=step_bytes,
                             achieved_gbs=significant(gbs), achieved_bandwidth_pct=significant(100 * gbs / bandwidth)))
            del model, timing
    return dict(weights=spec["weights"], rows=rows, memory_bandwidth_gbs=significant(bandwidth),
                checkpoint_bytes=_files_bytes(directory), peak_rss_bytes=_peak_rss_bytes(),
                load_s=significant(min(load_s)), threads=spec["threads"], page_cache_bytes=page_cache_bytes,
                page_cache_s=significant(page_cache_s))


def run_7b(options: BenchOptions, weights: list[str], root: Path | None = None, progress: bool = True,
           shape: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build (once, under `root`, default `cache_root()`) and measure the 7b checkpoint (or one of `shape`, for
    tests) in each of `weights`, one child process per format; unless `options.repeat_reversed` is False, every
    format a second time in reverse order (bf16 int8 int4 int4 int8 bf16, and within each the loop counts reversed too),
    whose mean cancels a steady drift of the machine."""
    check_options(options)
    if options.device != "cpu" or options.dtype not in ("float32", "bfloat16"):
        raise BenchError("--preset 7b measures CPU decoding of bf16 weights and their int8/int4 copies: leave "
                         "--device and --dtype out (the checkpoint is bf16)")
    if options.sweep or options.compile or options.shape:
        raise BenchError("--preset 7b takes none of --sweep, --compile or the shape options: it measures the "
                         "released shapes")
    root = cache_root() if root is None else Path(root)
    shape = RELEASED_7B if shape is None else shape
    directories = {w: checkpoint_for(w, root, shape, progress) for w in weights}
    two_passes = options.repeat_reversed is not False  # the default here: see --repeat-reversed
    order = list(weights) + (list(reversed(weights)) if two_passes else [])
    passes: dict[str, list[dict[str, Any]]] = {w: [] for w in weights}
    for i, w in enumerate(tqdm(order, desc="parloop bench 7b", unit="format", disable=not progress)):
        # the reversed pass also takes the loop counts in reverse, so that R = 1 and R = 2 share their mean time
        loops = sorted(set(options.loops), reverse=i >= len(weights))
        spec = dict(directory=str(directories[w]), weights=w, loops=loops,
                    modes=list(dict.fromkeys(options.modes)), context=options.context, warmup=options.warmup,
                    new_tokens=options.new_tokens, threads=options.threads or torch.get_num_threads(),
                    seed=options.seed, vocab_size=shape["vocab_size"],
                    # measured here, not in the child, whose peak memory would then include the copied buffers
                    memory_bandwidth_gbs=measure_memory_bandwidth(torch.device("cpu"), options.bandwidth_mb))
        child = subprocess.run([sys.executable, "-m", "parloop.bench.run7b", json.dumps(spec)],
                               capture_output=True, text=True, env=os.environ.copy())
        if child.returncode != 0:
            raise BenchError(f"measuring {w} failed:\n{child.stderr[-3000:]}")
        passes[w].append(json.loads(child.stdout.strip().splitlines()[-1]))
    formats = [_combine_passes(*passes[w]) for w in weights]
    _add_ratios(formats)
    return dict(formats=formats, cache_dir=str(root), load=[round(x, 2) for x in os.getloadavg()],
                torch_version=torch.__version__)


def _combine_passes(first: dict[str, Any], second: dict[str, Any] | None = None) -> dict[str, Any]:
    """One format's result; with a second (reversed) pass, each row also gets that pass's median
    (`decode_ms_reversed`), the two medians' spread, and its ratios, GB/s and % of copy bandwidth from the mean of
    the two medians over the mean of the two bandwidth measurements (`decode_ms_mean`)."""
    if second is None:
        return first
    again = {(r["mode"], r["loops"]): r for r in second["rows"]}
    bandwidth = (first["memory_bandwidth_gbs"] + second["memory_bandwidth_gbs"]) / 2
    for row in first["rows"]:
        one, other = row["decode_ms_per_token"], again[row["mode"], row["loops"]]["decode_ms_per_token"]
        mean = (one + other) / 2
        gbs = row["bytes_per_step"] / (mean / 1e3) / 1e9
        row.update(decode_ms_reversed=other, order_spread_pct=significant(100 * abs(one - other) / min(one, other)),
                   decode_ms_mean=significant(mean), achieved_gbs=significant(gbs),
                   achieved_bandwidth_pct=significant(100 * gbs / bandwidth))
    return dict(first, memory_bandwidth_gbs=significant(bandwidth),
                memory_bandwidth_passes=[first["memory_bandwidth_gbs"], second["memory_bandwidth_gbs"]],
                loops_measured=[[r["loops"] for r in first["rows"]], [r["loops"] for r in second["rows"]]],
                peak_rss_bytes=max(first["peak_rss_bytes"], second["peak_rss_bytes"]))


def _add_ratios(formats: list[dict[str, Any]]) -> None:
    """Each row's time (the mean of both passes where there are two) over the same format's R = 1 row (same mode),
    and over the bf16 row of the same R and mode."""
    def ms(row: dict[str, Any]) -> float:
        return row.get("decode_ms_mean", row["decode_ms_per_token"])

    bf16 = {(r["mode"], r["loops"]): ms(r) for f in formats if f["weights"] == "bf16" for r in f["rows"]}
    for f in formats:
        r1 = {r["mode"]: ms(r) for r in f["rows"] if r["loops"] == 1}
        for row in f["rows"]:
            key = (row["mode"], row["loops"])
            row["ratio_to_r1"] = significant(ms(row) / r1[row["mode"]]) if row["mode"] in r1 else None
            row["ratio_to_bf16"] = significant(ms(row) / bf16[key]) if key in bf16 else None
        f["peak_rss_over_checkpoint"] = significant(f["peak_rss_bytes"] / f["checkpoint_bytes"])


def format_7b_table(result: dict[str, Any]) -> str:
    """The rows of `run_7b` as a text table (with two passes: ms/token is their mean, then each pass's median and
    their spread), and one line per format on memory and load time."""
    two = all("decode_ms_mean" in r for f in result["formats"] for r in f["rows"])
    passes = f"{'pass 1':>9}{'pass 2':>9}{'spread':>8}" if two else ""
    lines = [f"{'weights':<8}{'mode':<19}{'R':>2}{'ms/token':>10}{passes}{'x R=1':>7}{'x bf16':>8}{'GB/s':>7}"
             f"{'% copy BW':>11}{'prefill ms':>12}"]
    for f in result["formats"]:
        for r in f["rows"]:
            ratio = "" if r["ratio_to_bf16"] is None else f"{r['ratio_to_bf16']:.2f}"
            ms = r["decode_ms_mean"] if two else r["decode_ms_per_token"]
            both = (f"{r['decode_ms_per_token']:>9.1f}{r['decode_ms_reversed']:>9.1f}{r['order_spread_pct']:>7.0f}%"
                    if two else "")
            lines.append(f"{r['weights']:<8}{r['mode']:<19}{r['loops']:>2}{ms:>10.1f}{both}"
                         f"{r['ratio_to_r1'] or 0:>7.2f}{ratio:>8}{r['achieved_gbs']:>7.1f}"
                         f"{r['achieved_bandwidth_pct']:>10.0f}%{r['prefill_ms']:>12.0f}")
    for f in result["formats"]:
        bandwidth = " / ".join(f"{b:.1f}" for b in f.get("memory_bandwidth_passes", [f["memory_bandwidth_gbs"]]))
        lines.append(f"- {f['weights']}: checkpoint {f['checkpoint_bytes'] / 1e9:.2f} GB, peak RSS "
                     f"{f['peak_rss_bytes'] / 1e9:.2f} GB ({f['peak_rss_over_checkpoint']:.2f}x the checkpoint), "
                     f"load {f['load_s']:.2f} s (embedding into the page cache once: "
                     f"{f['page_cache_bytes'] / 1e9:.2f} GB in {f['page_cache_s']:.1f} s), "
                     f"copy bandwidth {bandwidth} GB/s, {f['threads']} threads")
    lines.append(f"- checkpoints under {result['cache_dir']}; load average after the run {result['load']}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(measure_format(json.loads(sys.argv[1]))))
