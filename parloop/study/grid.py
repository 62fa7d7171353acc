"""What the study trains: its presets (model sizes, budgets, seeds, evaluation sizes) and the grid of models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

STUDY_MODES = ("parallel", "sequential_shared", "sequential")

# The released LoopCoder-V2 architecture settings (docs/design.md §4): loop models use them unless the user
# overrides them with --set.
RELEASED_ARCHITECTURE = dict(plt_normalize_per_loop=True, plt_emb_scale=0.707, plt_hidden_scale=0.053,
                             plt_gate_use_hidden_states=True)


@dataclass(frozen=True)
class Scale:
    """One point of the scale axis: a model size (fields that override the preset's model) and a token budget."""

    name: str
    model: dict[str, Any] = field(compare=False)  # a scale is known by its name (and hashable)
    budget: int = 0  # training tokens per model


@dataclass
class Preset:
    """Everything a study run is made of, apart from the grid. `--quick`, the default and `--preset gpu`."""

    source: str = "stdlib"
    vocab_size: int = 2048
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    program_fraction: float = 0.05  # share of the training split's tokens that are generated programs
    model: dict[str, Any] = field(default_factory=lambda: dict(
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, plt_window_size=[32, 0],
        tie_word_embeddings=True, **RELEASED_ARCHITECTURE))
    scales: tuple[Scale, ...] = (
        Scale("s", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2), 600_000),
        Scale("m", dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2), 1_200_000))
    train: dict[str, Any] = field(default_factory=lambda: dict(
        seq_len=128, batch_size=16, micro_batch_size=16, lr=3e-3, min_lr=3e-4, weight_decay=0.1, dtype="auto",
        device="auto", log_interval=10, eval_sequences=32, keep_checkpoints=1))
    loops: tuple[int, ...] = (1, 2)
    seeds: int = 3  # replicates per model: seed k sets the initial weights and the data order
    lr_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0)  # the per-model learning-rate sweep (times train.lr)
    sweep_seed: int = 1000  # the sweep's own seed, so that no compared model was picked by its own result
    checkpoints: int = 4  # checkpoints per training run (where an interrupted run resumes from)
    validations: int = 4  # validation passes per training run (the training curves)
    eval_batch: int = 32  # sequences per forward pass in the evaluations
    eval_bytes: int = 200_000  # held-out bytes per split for bits per byte and line completion
    programs: int = 100  # held-out code-reasoning programs
    lines: int = 200  # held-out lines for line completion
    humaneval: int | None = 20  # HumanEval problems (None: all 164)
    humaneval_tokens: int = 64  # new tokens per HumanEval completion
    diagnostic_sequences: int = 16  # held-out windows for the per-loop diagnostics
    # torch CPU threads (None: torch's default): for models this small one thread is about as fast as two on a
    # quiet machine and much faster on a busy one
    threads: int | None = 1


PRESETS = {
    "default": Preset(),
    # the whole grid in a few minutes on 2 CPU cores: a 30-file corpus, one-layer models, a few steps
    "quick": Preset(
        source="{stdlib}/[a-c]*.py", vocab_size=512, val_fraction=0.15, test_fraction=0.15,
        model=dict(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, plt_window_size=[8, 0],
                   tie_word_embeddings=True, **RELEASED_ARCHITECTURE),
        scales=(Scale("xs", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1), 8 * 32 * 8),
                Scale("s", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1), 8 * 32 * 16)),
        train=dict(seq_len=32, batch_size=8, micro_batch_size=8, lr=3e-3, min_lr=3e-4, dtype="float32",
                   device="cpu", log_interval=5, eval_sequences=8, keep_checkpoints=1),
        loops=(1, 2), seeds=2, lr_multipliers=(1.0, 2.0), checkpoints=1, validations=1, eval_bytes=6_000,
        programs=6, lines=20, humaneval=1, humaneval_tokens=8, diagnostic_sequences=4),
    # one H100 in about a minute (docs/gpu.md: the whole GPU check fits a 15-minute loan): a 9.6M-parameter model
    # (R = 1), 1.6M tokens per model in 50 steps of 64 x 512 tokens, 2 seeds, no learning-rate sweep; the stdlib
    # corpus; bf16, eager (compiling five distinct models would take longer than training them). A check that the
    # GPU path trains and evaluates the whole grid, and a measure of its throughput, not a result on loops.
    "gpu": Preset(
        source="stdlib", vocab_size=8192, val_fraction=0.02, test_fraction=0.02, program_fraction=0.01,
        model=dict(num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                   plt_window_size=[64, 0], tie_word_embeddings=True, **RELEASED_ARCHITECTURE),
        scales=(Scale("10m", dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4), 50 * 64 * 512),),
        train=dict(seq_len=512, batch_size=64, micro_batch_size=64, lr=3e-3, min_lr=3e-4, weight_decay=0.1,
                   dtype="bfloat16", device="cuda", compile=False, log_interval=10, eval_sequences=64,
                   keep_checkpoints=1),
        loops=(1, 2), seeds=2, lr_multipliers=(1.0,), checkpoints=1, validations=2, eval_batch=64,
        eval_bytes=60_000, programs=32, lines=32, humaneval=4, humaneval_tokens=32, diagnostic_sequences=8,
        threads=None),
}


@dataclass(frozen=True)
class Cell:
    """One model of the grid; `modes` are the loop modes whose rows it fills (all of them for an R = 1 model).
    `depth` multiplies the scale's layer count: R = 1 with R x the layers is the compute-matched baseline of R."""

    name: str
    loops: int
    mode: str
    modes: tuple[str, ...]
    depth: int = 1


@dataclass(frozen=True)
class Run:
    """One training run: a cell at a scale with a seed and a learning-rate multiplier (times the recipe's)."""

    cell: Cell
    scale: Scale
    seed: int
    lr_multiplier: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.scale.name}/{self.cell.name}/seed{self.seed}"


def grid(loops: Sequence[int], modes: Sequence[str], compute_matched: bool = True) -> list[Cell]:
    """The models to train at every scale and seed: one per (R, mode), a single model for R = 1 (the same in every
    mode) and, with `compute_matched`, an R = 1 model with R x the layers for every R >= 2."""
    cells = []
    for r in sorted(set(loops)):
        if r == 1:
            cells.append(Cell("r1", 1, "parallel", tuple(modes)))
            continue
        if compute_matched:
            cells.append(Cell(f"r1-x{r}layers", 1, "parallel", tuple(modes), depth=r))
        cells += [Cell(f"{mode}-r{r}", r, mode, (mode,)) for mode in modes]
    return cells


def pick_scales(preset: Preset, names: Sequence[str] | None) -> tuple[Scale, ...]:
    """The preset's scales named in `names` (all of them when None), in the preset's order."""
    if not names:
        return preset.scales
    known = {s.name: s for s in preset.scales}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown scale(s) {', '.join(unknown)}: this preset has {', '.join(known)}")
    return tuple(s for s in preset.scales if s.name in names)
