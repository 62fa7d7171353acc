"""CPU matrix products with a handful of rows: the decode step of stacked loop streams.

A `parallel` decode step multiplies every weight matrix by R rows (one per loop stream) instead of one. The step is
bound by reading the weights, so R rows should cost what one row costs. On CPU BLAS libraries they often do not:
which call streams a weight fastest for 1-7 rows depends on the shape, the thread count and the CPU (measured on a
2-core AMD EPYC with MKL: `x @ W.T` with 2 rows took up to 4x its 1-row time, `W @ x.T` was flat for 768x768 but
not for 768x2048, where one matrix-vector product per row was). So, like cuDNN's benchmark mode, the first product
of each (shape, rows, dtype, threads) are spread over the candidate layouts, timed, and the fastest is kept.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

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
TRIALS = 4  # timed calls per candidate before choosing
_trials: dict[tuple, dict[str, list[float]]] = {}
_chosen: dict[tuple, str] = {}


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for a CPU `x` of a few rows `[M, K]`, by the layout measured fastest for this case.

    The candidates are timed on the real calls (round robin, `TRIALS` each), not in a loop of their own: a weight
    multiplied again and again stays in the CPU cache, while in a decode step every weight streams from memory,
    and the two favour different layouts. Layouts sum in different orders, so until the choice is made, repeated
    calls can differ in the last bits (as results do across BLAS builds or thread counts).
    """
    key = (tuple(weight.shape), x.shape[0], x.dtype, torch.get_num_threads())
    name = _chosen.get(key)
    if name is not None:
        return CANDIDATES[name](x, weight)
    names = ("linear", "paired") if x.shape[0] == 1 else ("linear", "weight_first", "row_by_row")
    trials = _trials.setdefault(key, {n: [] for n in names})
    name = min(trials, key=lambda n: len(trials[n]))
    start = time.perf_counter()
    out = CANDIDATES[name](x, weight)
    trials[name].append(time.perf_counter() - start)
    if all(len(t) >= TRIALS for t in trials.values()):
        _chosen[key] = min(trials, key=lambda n: statistics.median(trials[n]))
        del _trials[key]
    return out


def chosen_layouts() -> dict[tuple, str]:
    """What `few_rows_linear` picked so far, keyed by (weight shape, rows, dtype, threads): for benchmarks' notes."""
    return dict(_chosen)


class FewRowLinear(nn.Linear):
    """`nn.Linear` whose CPU inference calls with a few rows go through `few_rows_linear`.

    Installed into a model by `use_few_row_kernels`; weights, names and state dict are those of `nn.Linear`.
    Training, GPUs, many rows and compiled steps use `F.linear` (their own kernels are already good).
    """

    FEW_ROWS = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (x.device.type != "cpu" or rows >= self.FEW_ROWS or torch.is_grad_enabled()
                or torch.compiler.is_compiling()):
            return F.linear(x, self.weight, self.bias)
        out = few_rows_linear(x.reshape(rows, self.in_features), self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


def use_few_row_kernels(model: nn.Module) -> nn.Module:
    """Make every `nn.Linear` of `model` a `FewRowLinear` (in place; returns the model), for CPU decoding.

    A stacked `parallel` decode step multiplies each weight by R rows; this keeps that as cheap as one row on CPU
    BLAS libraries that are slow for a few rows. Results equal `nn.Linear`'s up to summation order.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FewRowLinear
    return model


def compile_step(fn: Callable, **compile_kwargs) -> Callable:
    """`torch.compile` a one-token decode step whose shapes never change (a static cache)."""
    # Dynamo caches compiled graphs per code object, so every model in a process (and every loop index of the
    # sequential modes) shares the step's budget of recompilations; past it, decoding silently runs eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=False, **compile_kwargs)
