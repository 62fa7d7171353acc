"""CPU matrix products with a handful of rows: the few-row layout tuner of a stacked decode step.

A `parallel` decode step multiplies every weight matrix by R rows (one per loop stream) instead of one. The step is
bound by reading the weights, so R rows should cost what one row costs. On CPU BLAS libraries they often do not:
which call streams a weight fastest for 1-7 rows depends on the shape, the thread count and the CPU (measured on a
2-core AMD EPYC with MKL: `x @ W.T` with 2 rows took up to 4x its 1-row time, `W @ x.T` was flat for 768x768 but
not for 768x2048, where one matrix-vector product per row was). So, like cuDNN's benchmark mode, the first products
of each (shape, rows, dtype, threads) are spread over the candidate layouts, timed, and the fastest is kept; unlike
it, the choice is then re-checked at a falling rate against the other layouts in back-to-back pairs of real calls,
and changed when most recent pairs say so, so that a burst of load during the first calls cannot lock in a bad one.

For bf16 weights on a CPU with AVX512-BF16 there is nothing to tune: parloop's own kernel (`parloop.cpu_kernels`)
streams the weight once for all rows and is used directly.

On a GPU the same step is launch-bound instead; `parloop.compile` handles that (docs/design.md §3).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from parloop import cpu_kernels

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [M, K], W [N, K]) -> [M, N]


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _weight_first(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # contiguous: a column-major result would push every later op (and attention) onto slow strided paths
    return (w @ x.T).T.contiguous()


def _row_by_row(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.mv(w, row) for row in x])


def _paired(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # one row doubled: some BLAS run the two-row product faster than their matrix-vector kernel
    return _weight_first(x.repeat(2, 1), w)[:1]


CANDIDATES: dict[str, Product] = {"linear": _linear, "weight_first": _weight_first, "row_by_row": _row_by_row,
                                  "paired": _paired}
TRIALS = 4  # timed calls per candidate before the first choice
CHECK_PAIRS = 5  # back-to-back (challenger, choice) pairs whose median time ratio decides a switch
SWITCH_BELOW = 0.9  # switch when the challenger's median time is below this fraction of the choice's
clock: Callable[[], float] = time.perf_counter  # what times the calls (a variable, so tests can simulate load)
FIRST_GAP, LAST_GAP = 4, 256  # calls between checks: from FIRST_GAP, doubled after each confirmation up to LAST_GAP


@dataclass
class LayoutTuner:
    """The layout choice for one (weight shape, rows, dtype, threads), made and re-checked from timed real calls.

    The caller asks `next_name()` which layout to run and whether to time it, and hands the time to `record()`.
    Each other layout (challenger) is re-checked in a pair of back-to-back calls, itself and the choice, whose order
    alternates so that load changing between the two favours neither; the choice switches when the median time
    ratio of the challenger's last `CHECK_PAIRS` pairs is below `SWITCH_BELOW`. While the choice is no slower, that
    challenger is checked half as often as before, so a clearly worse layout costs little once the choice is sure.
    """

    names: tuple[str, ...]
    trials: dict[str, list[float]] = field(default_factory=dict)
    best: str | None = None
    ratios: dict[str, deque[float]] = field(default_factory=dict)  # challenger time / choice time, recent pairs
    gaps: dict[str, int] = field(default_factory=dict)  # calls between checks, per challenger
    due: dict[str, int] = field(default_factory=dict)  # the call at which each challenger is checked next
    calls: int = 0
    pair: list[str] = field(default_factory=list)  # the names the next calls run, timed, in a check
    pair_times: dict[str, float] = field(default_factory=dict)
    checks: int = 0
    switches: int = 0

    def __post_init__(self) -> None:
        self.trials = {n: [] for n in self.names}

    def _settle(self, best: str) -> None:
        self.best = best
        challengers = [n for n in self.names if n != best]
        self.ratios = {n: deque(maxlen=CHECK_PAIRS) for n in challengers}
        self.gaps = dict.fromkeys(challengers, FIRST_GAP)
        self.due = {n: self.calls + FIRST_GAP + i for i, n in enumerate(challengers)}

    def next_name(self) -> tuple[str, bool]:
        """The layout of the next call, and whether to time it."""
        self.calls += 1
        if self.best is None:
            return min(self.trials, key=lambda n: len(self.trials[n])), True
        if self.pair:
            return self.pair.pop(), True
        challenger = min(self.due, key=self.due.__getitem__, default=None)
        if challenger is None or self.due[challenger] > self.calls:
            return self.best, False
        self.pair = [self.best, challenger] if self.checks % 2 else [challenger, self.best]
        self.pair_times, self.checks = {}, self.checks + 1
        return self.pair.pop(), True

    def record(self, name: str, seconds: float) -> None:
        """The time of a call that `next_name` asked to time."""
        if self.best is None:
            self.trials[name].append(seconds)
            if all(len(t) >= TRIALS for t in self.trials.values()):
                self._settle(min(self.trials, key=lambda n: statistics.median(self.trials[n])))
                self.trials = {}
            return
        self.pair_times[name] = seconds
        if len(self.pair_times) == 2:
            self._judge(next(n for n in self.pair_times if n != self.best))

    def _judge(self, challenger: str) -> None:
        ratios = self.ratios[challenger]
        ratios.append(self.pair_times[challenger] / max(self.pair_times[self.best], 1e-9))
        median = statistics.median(ratios)
        if len(ratios) == CHECK_PAIRS and median < SWITCH_BELOW:
            self.switches += 1
            self._settle(challenger)
            return
        # no slower than the challenger: check it less often; else keep looking often until the evidence is in
        self.gaps[challenger] = min(2 * self.gaps[challenger], LAST_GAP) if median >= 1 else FIRST_GAP
        self.due[challenger] = self.calls + self.gaps[challenger]


_tunings: dict[tuple, LayoutTuner] = {}


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for a CPU `x` of a few rows `[M, K]`, by the layout measured fastest for this case.

    The candidates are timed on the real calls (round robin, `TRIALS` each), not in a loop of their own: a weight
    multiplied again and again stays in the CPU cache, while in a decode step every weight streams from memory,
    and the two favour different layouts. Layouts sum in different orders, so calls can differ in the last bits
    whenever the layout changes (as results do across BLAS builds or thread counts).
    """
    key = (tuple(weight.shape), x.shape[0], x.dtype, torch.get_num_threads())
    tuning = _tunings.get(key)
    if tuning is None:
        names = ("linear", "paired") if x.shape[0] == 1 else ("linear", "weight_first", "row_by_row")
        tuning = _tunings[key] = LayoutTuner(names)
    name, timed = tuning.next_name()
    if not timed:
        return CANDIDATES[name](x, weight)
    start = clock()
    out = CANDIDATES[name](x, weight)
    tuning.record(name, clock() - start)
    return out


def chosen_layouts() -> dict[tuple, str]:
    """What `few_rows_linear` uses now, keyed by (weight shape, rows, dtype, threads): for benchmarks' notes."""
    return {key: t.best for key, t in _tunings.items() if t.best is not None}


def layout_switches() -> dict[tuple, int]:
    """How often each choice of `few_rows_linear` was changed after re-checking (same keys as `chosen_layouts`)."""
    return {key: t.switches for key, t in _tunings.items() if t.best is not None}


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, with CPU inference calls of a few rows through parloop's bf16 kernel (bf16
    weights, where the CPU has AVX512-BF16: `parloop.cpu_kernels`) or else `few_rows_linear`. Training, GPUs, many
    rows and compiled steps use `F.linear` (their own kernels are already good)."""
    if not cpu_kernels.fits(x) or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, weight.shape[1])
    kernels = cpu_kernels.kernels() if x.dtype == weight.dtype == torch.bfloat16 else None
    if kernels is not None and weight.is_contiguous():
        out = kernels.linear_bf16(flat.contiguous(), weight)
    else:
        out = few_rows_linear(flat, weight)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


class FewRowLinear(nn.Linear):
    """`nn.Linear` whose products go through `decode_linear`; installed into a model by `use_few_row_kernels`.
    Weights, names and state dict are those of `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)


def use_few_row_kernels(model: nn.Module) -> nn.Module:
    """Make every `nn.Linear` of `model` a `FewRowLinear`, and give `decode_linear` to every module that makes a
    product with its own weights through an attribute `linear` (the G-SWA gate), in place; returns the model. For
    CPU decoding.

    A stacked `parallel` decode step multiplies each weight by R rows; this keeps that as cheap as one row on CPU
    BLAS libraries that are slow for a few rows. Results equal `nn.Linear`'s up to summation order.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FewRowLinear
        elif getattr(module, "linear", None) is F.linear:
            module.linear = decode_linear
    return model
