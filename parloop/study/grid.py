"""What the study trains: its presets (model, recipe, budgets and evaluation sizes) and the grid of models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

STUDY_MODES = ("parallel", "sequential_shared")


@dataclass
class Preset:
    """Everything a study run is made of, apart from the grid. `--quick` and the default are two presets."""

    source: str = "stdlib"
    vocab_size: int = 8192
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    program_fraction: float = 0.05  # share of the training split's tokens that are generated programs
    model: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, plt_window_size=[32, 0]))
    train: dict[str, Any] = field(default_factory=lambda: dict(
        seq_len=128, batch_size=16, micro_batch_size=16, lr=3e-3, min_lr=3e-4, weight_decay=0.1, dtype="auto",
        device="auto", seed=0, log_interval=10, eval_sequences=32, keep_checkpoints=1))
    budget: int = 500_000  # training tokens per model
    checkpoints: int = 10  # checkpoints per training run (where an interrupted run resumes from)
    validations: int = 4  # validation passes per training run (the training curves)
    eval_batch: int = 32  # sequences per forward pass in the evaluations
    eval_bytes: int = 300_000  # held-out bytes per split for bits per byte and line completion
    programs: int = 300  # held-out code-reasoning programs
    lines: int = 500  # held-out lines for line completion
    humaneval: int | None = None  # HumanEval problems (None: all 164)
    humaneval_tokens: int = 128  # new tokens per HumanEval completion
    diagnostic_sequences: int = 32  # held-out windows for the per-loop diagnostics
    threads: int | None = None  # torch CPU threads (None: torch's default)


PRESETS = {
    "default": Preset(),
    # the whole grid in a few minutes on 2 CPU cores: a 30-file corpus, a one-layer model, a few steps
    "quick": Preset(
        source="{stdlib}/[a-c]*.py", vocab_size=512, val_fraction=0.15, test_fraction=0.15,
        model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=64, plt_window_size=[8, 0]),
        train=dict(seq_len=32, batch_size=8, micro_batch_size=8, lr=3e-3, min_lr=3e-4, dtype="float32",
                   device="cpu", seed=0, log_interval=5, eval_sequences=8, keep_checkpoints=1),
        budget=8 * 32 * 12, checkpoints=1, validations=1, eval_bytes=8_000, programs=12, lines=40, humaneval=3,
        humaneval_tokens=16, diagnostic_sequences=4,
        # for a model this small one thread is faster, and on a busy machine much faster, than two
        threads=1),
}


@dataclass(frozen=True)
class Cell:
    """One trained model of the grid; `modes` are the loop modes whose rows it fills (all of them for R = 1)."""

    name: str
    loops: int
    mode: str
    modes: tuple[str, ...]


def grid(loops: Sequence[int], modes: Sequence[str]) -> list[Cell]:
    """The models to train: one per (R, mode), except a single model for R = 1, which is the same in every mode."""
    cells = []
    for r in sorted(set(loops)):
        if r == 1:
            cells.append(Cell("r1", 1, "parallel", tuple(modes)))
        else:
            cells += [Cell(f"{mode}-r{r}", r, mode, (mode,)) for mode in modes]
    return cells
