"""What `parloop bench` measures: model presets, the options of one run, and their validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from parloop.config import LOOP_MODES, ConfigError, PLTConfig

# Llama-like shapes; tied embeddings, so "100m" is 100.1M parameters at R = 1 (the lm_head is the embedding).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000),
    # the released LoopCoder-V2 shapes (head_dim 128), measured from a checkpoint on disk (parloop/bench/run7b.py)
    "7b": dict(hidden_size=5120, num_hidden_layers=14, num_attention_heads=40, num_key_value_heads=8,
               intermediate_size=27648, vocab_size=76800),
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
    compile: bool | None = None  # static cache + compiled decode step (CUDA graphs on a GPU); None: on CUDA only
    repeat_reversed: bool | None = None  # measure every row again in reverse order (None: only with --preset 7b)

    def model_shape(self) -> dict[str, int]:
        if self.preset not in PRESETS:
            raise BenchError(f"unknown preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        return {**PRESETS[self.preset], **self.shape}

    def compiled_on(self, device: torch.device) -> bool:
        return self.compile if self.compile is not None else device.type == "cuda"

    def points(self) -> list[tuple[int, int, int]]:
        """(loops, batch, context) to measure. A sweep is loops x batches at `context` plus loops x contexts at
        `batch` (not the full product, whose long contexts at large batches would take hours on a CPU)."""
        if not self.sweep:
            return sorted({(r, self.batch, self.context) for r in self.loops})
        grid = {(r, b, self.context) for r in self.sweep_loops for b in self.sweep_batches}
        grid |= {(r, self.batch, c) for r in self.sweep_loops for c in self.sweep_contexts}
        return sorted(grid)


def _check_numbers(options: BenchOptions) -> None:
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
    if options.threads is not None and options.threads < 1:
        raise BenchError(f"threads must be >= 1 (got {options.threads})")


def check_options(options: BenchOptions) -> torch.device:
    """The device to measure on, once `options` are known to be measurable; else a `BenchError` saying why."""
    _check_numbers(options)
    try:
        device = torch.device(options.device)
    except RuntimeError as err:
        raise BenchError(f"--device {options.device!r} is not a device: use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {options.device}: this torch ({torch.__version__}) sees no CUDA GPU; run on a "
                         "machine with one and a CUDA build of torch, or use --device cpu")
    try:
        PLTConfig(**options.model_shape())
    except ConfigError as err:
        raise BenchError(f"model shape {options.model_shape()} cannot work: {err}") from err
    return device
