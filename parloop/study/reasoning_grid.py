"""The reasoning track's presets and grid (docs/study.md, "The reasoning track"): at every task, difficulty and
base depth L, the models R = 1 (L layers), R = 1 with R x L layers (compute-matched), and `parallel`,
`sequential_shared` and `sequential` at each R, plus `parallel` and `sequential_shared` with filler tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from parloop.study.grid import RELEASED_ARCHITECTURE, STUDY_MODES


@dataclass(frozen=True)
class TaskSetting:
    """A task, the difficulties to study, and its generator's options."""

    name: str
    difficulties: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Point:
    """Where models are compared: a task at a difficulty, at base depth `layers`."""

    task: str
    difficulty: int
    layers: int

    @property
    def name(self) -> str:
        return f"{self.task}-{self.difficulty}/L{self.layers}"


@dataclass(frozen=True)
class ReasoningCell:
    """One model of the grid at a point: R loops of `depth` x L layers in `mode`, with `filler` tokens between
    question and answer, and the loop settings of `variant` (a key of the preset's `variants`; "" = the preset's)."""

    loops: int
    mode: str = "parallel"
    depth: int = 1
    filler: int = 0
    variant: str = ""

    @property
    def name(self) -> str:
        if self.loops == 1:
            return "r1" if self.depth == 1 else f"r1-x{self.depth}layers"
        return (f"{self.mode}-r{self.loops}" + (f"-fill{self.filler}" if self.filler else "")
                + (f"-{self.variant}" if self.variant else ""))


@dataclass
class ReasoningPreset:
    tasks: tuple[TaskSetting, ...]
    layers: tuple[int, ...] = (1, 2)
    loops: tuple[int, ...] = (2, 3, 4)
    seeds: int = 3
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    lr_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0)
    sweep_seed: int = 1000  # never a compared seed: no compared model was picked by its own result
    curriculum: float = 0.0  # share of the steps over which the difficulty ramps up from 1 (every model alike)
    filler_per_loop: int = 1  # filler tokens per extra loop in the filler models (R - 1 loops: (R - 1) x this)
    held_out: int = 2000  # held-out instances per point
    loops_everywhere: bool = False  # loop models at every point, not only the depth-hungry ones (--quick)
    # the trims that fit the default preset into an hour on 2 cores (docs/study.md): loop models only at these base
    # depths (None: all), R > 2 only at this many depth-hungry points (the largest depth gains first; None: all)
    # and only in these modes
    loop_layers: tuple[int, ...] | None = None
    more_loops_at: int | None = None
    more_loops_modes: tuple[str, ...] = STUDY_MODES
    # loop settings compared at R = 2 (parallel and sequential_shared) where R > 2 is trained: name -> PLTConfig
    # fields that replace the preset's (the released settings against plain ones, other window sizes)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
        plt_window_size=[16, 0], tie_word_embeddings=True, **RELEASED_ARCHITECTURE))
    workers: int = 2  # training processes at once
    threads: int | None = 1  # torch threads per process
    device: str = "cpu"


def depth_cells() -> list[ReasoningCell]:
    """The depth check's pair: R = 1 and the compute-matched R = 1 of R = 2 (2 x L layers)."""
    return [ReasoningCell(1), ReasoningCell(1, depth=2)]


def loop_cells(loops: Sequence[int], modes: Sequence[str] = STUDY_MODES,
               more_modes: Sequence[str] | None = None) -> list[ReasoningCell]:
    """Every looped model at each R (in `more_modes` for R > 2, default all of `modes`), and the compute-matched
    R = 1 of the largest R when it is above 2 (that of R = 2 is in the depth check)."""
    cells = []
    for r in sorted(set(loops)):
        if r > 2 and r == max(loops):
            cells.append(ReasoningCell(1, depth=r))
        cells += [ReasoningCell(r, mode) for mode in (modes if r <= 2 or more_modes is None else more_modes)]
    return cells


def filler_cells(loops: Sequence[int], per_loop: int) -> list[ReasoningCell]:
    """`parallel` and `sequential_shared` with (R - 1) x `per_loop` filler tokens, at R = 2 and the largest R."""
    return [ReasoningCell(r, mode, filler=(r - 1) * per_loop) for r in sorted({2, max(loops)} & set(loops))
            for mode in ("parallel", "sequential_shared")]


PLAIN_LOOPS = dict(plt_normalize_per_loop=False, plt_emb_scale=None, plt_hidden_scale=None,
                   plt_gate_use_hidden_states=False)  # the PLT paper's plain loop input: embedding + hidden state


def variant_cells(variants: Sequence[str]) -> list[ReasoningCell]:
    """`parallel` and `sequential_shared` at R = 2 with each variant's loop settings."""
    return [ReasoningCell(2, mode, variant=v) for v in variants for mode in ("parallel", "sequential_shared")]


def points(preset: ReasoningPreset) -> list[Point]:
    return [Point(t.name, d, layers) for t in preset.tasks for d in t.difficulties for layers in preset.layers]


REASONING_PRESETS = {
    # about an hour on 2 busy CPU cores (docs/study.md, "The reasoning track"): d = 64, 500 steps of 32 sequences;
    # the depth check at L = 1 and 2, loop models at L = 1 only, R = 3 and 4 at one point
    "default": ReasoningPreset(
        tasks=(TaskSetting("phop", (1, 2), dict(alphabet=4, length=32)), TaskSetting("tracing", (1,)),
               TaskSetting("addition", (2,))),
        steps=500, lr_multipliers=(1.0, 2.0), loop_layers=(1,), more_loops_at=1,
        more_loops_modes=("parallel", "sequential_shared"),
        variants={"plain": PLAIN_LOOPS, "w4": dict(plt_window_size=[4, 0]), "w32": dict(plt_window_size=[32, 0])}),
    # a follow-up to the default (docs/study.md, Results): its hardest p-hop point at twice the steps and twice the
    # length, base depth 1, R = 2, at the learning rate the default's sweep chose for every p-hop model (x2)
    "hard": ReasoningPreset(
        tasks=(TaskSetting("phop", (2,), dict(alphabet=4, length=64)),), layers=(1,), loops=(2,), steps=1000,
        lr=6e-3, lr_multipliers=(1.0,)),
    # the whole pipeline in about a minute: tiny models, a few steps, 2 seeds, every stage
    "quick": ReasoningPreset(
        tasks=(TaskSetting("phop", (1,), dict(alphabet=4, length=24)), TaskSetting("tracing", (1,))),
        layers=(1,), loops=(2, 3), seeds=2, steps=6, batch_size=8, lr_multipliers=(1.0, 2.0), held_out=64,
        loops_everywhere=True, more_loops_at=1, more_loops_modes=("parallel", "sequential_shared"),
        variants={"plain": PLAIN_LOOPS},
        model=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                   plt_window_size=[4, 0], tie_word_embeddings=True, **RELEASED_ARCHITECTURE), workers=1),
    # one H100 (not run yet; sized by counting: 140 to 320 runs of 400 steps, 6 processes sharing the GPU, at an
    # assumed 20 ms per step for these launch-bound models, 4 to 9 minutes; docs/study.md): the default's tasks
    # plus p = 3, 8 x the batch, loop models at both base depths, R = 3, 4 at the two points with the largest
    # depth gain
    "gpu": ReasoningPreset(
        tasks=(TaskSetting("phop", (1, 2, 3), dict(alphabet=4, length=32)), TaskSetting("tracing", (1,)),
               TaskSetting("addition", (2,))),
        steps=400, batch_size=256, lr_multipliers=(1.0, 2.0), more_loops_at=2,
        more_loops_modes=("parallel", "sequential_shared"),
        variants={"plain": PLAIN_LOOPS, "w4": dict(plt_window_size=[4, 0]), "w32": dict(plt_window_size=[32, 0])},
        workers=6, threads=2, device="cuda"),
}
