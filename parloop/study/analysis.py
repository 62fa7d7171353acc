"""Reading the study's results: models grouped by scale and cell, paired differences over seeds with their
95 % intervals (against R = 1, against the compute-matched R = 1, parallel against sequential_shared), the gap
against scale, and the recommended loop count by the rule of docs/study.md."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from parloop.eval.diagnostics import offset_cost
from parloop.study.stats import Interval, mean_interval

# (key in a model's evaluation, column title, higher is better)
METRICS = (
    ("val_bpb", "val bits/byte", False),
    ("test_bpb", "test bits/byte", False),
    ("code_reasoning", "code reasoning", True),
    ("line_completion", "line completion", True),
    ("humaneval", "HumanEval pass@1", True),
)

Groups = dict[str, dict[str, dict[int, dict[str, Any]]]]  # {scale: {cell name: {seed: model record}}}


def group_models(models: Sequence[dict[str, Any]]) -> Groups:
    """{scale: {cell: {seed: record}}}, scales and cells in the order they were trained."""
    groups: Groups = {}
    for m in models:
        groups.setdefault(m["scale"], {}).setdefault(m["name"], {})[m["seed"]] = m
    return groups


def by_seed(seeds: dict[int, dict[str, Any]], key: str) -> dict[int, float]:
    return {s: m["evaluation"][key] for s, m in seeds.items()}


def cost(model: dict[int, dict[str, Any]], baseline: dict[int, dict[str, Any]], key: str,
         higher: bool) -> Interval | None:
    """How much worse `model` is than `baseline` on `key` (positive: worse), paired by seed, with its interval."""
    a, b = by_seed(model, key), by_seed(baseline, key)
    seeds = sorted(set(a) & set(b))
    return mean_interval([offset_cost(a[s], b[s], higher) for s in seeds]) if seeds else None


def cell_loops(cells: dict[str, dict[int, dict[str, Any]]], name: str) -> int:
    return next(iter(cells[name].values()))["loops"]


def baselines(cells: dict[str, dict[int, dict[str, Any]]], name: str) -> dict[str, str]:
    """The baselines of a looped cell present in the grid: `r1` (same parameters) and `r1-x{R}layers` (same
    compute)."""
    r = cell_loops(cells, name)
    return {label: b for label, b in (("R = 1", "r1"), ("R = 1, compute-matched", f"r1-x{r}layers")) if b in cells}


def comparisons(groups: Groups) -> dict[str, dict[str, dict[str, dict[str, Interval | None]]]]:
    """{scale: {looped cell: {baseline label: {metric: cost interval}}}}: every looped model against its
    baselines."""
    out: dict[str, dict[str, dict[str, dict[str, Interval | None]]]] = {}
    for scale, cells in groups.items():
        out[scale] = {}
        for name in cells:
            if cell_loops(cells, name) < 2:
                continue
            out[scale][name] = {label: {key: cost(cells[name], cells[b], key, higher) for key, _, higher in METRICS}
                                for label, b in baselines(cells, name).items()}
    return out


def offset_costs(groups: Groups) -> dict[str, dict[int, dict[str, Interval | None]]]:
    """{scale: {R: {metric: interval}}}: how much worse `parallel` is than `sequential_shared` (the CLP offset's
    cost), paired by seed."""
    out: dict[str, dict[int, dict[str, Interval | None]]] = {}
    for scale, cells in groups.items():
        rs = sorted(cell_loops(cells, n) for n in cells if n.startswith("parallel-r"))
        out[scale] = {r: {key: cost(cells[f"parallel-r{r}"], cells[f"sequential_shared-r{r}"], key, higher)
                          for key, _, higher in METRICS}
                      for r in rs if f"sequential_shared-r{r}" in cells}
    return out


def compute(cells: dict[str, dict[int, dict[str, Any]]], name: str) -> float:
    """Parameters times training tokens of a cell (the x axis of the gap-vs-scale plot)."""
    m = next(iter(cells[name].values()))
    return float(m["training"]["parameters"]) * float(m["training"]["tokens"])


def gap_vs_scale(groups: Groups, mode: str = "parallel") -> dict[int, list[dict[str, Any]]]:
    """{R: [{scale, parameters x tokens of the R = 1 model, test bits/byte gap R - (R = 1) with interval}]}."""
    out: dict[int, list[dict[str, Any]]] = {}
    for scale, cells in groups.items():
        if "r1" not in cells:
            continue
        for name in cells:
            if name.startswith(f"{mode}-r"):
                gap = cost(cells[name], cells["r1"], "test_bpb", False)
                out.setdefault(cell_loops(cells, name), []).append(
                    {"scale": scale, "compute": compute(cells, "r1"), "gap": gap})
    return out


def average_diagnostics(seeds: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The per-loop diagnostics of a looped cell, each measure averaged over its seeds."""
    diags = [m["evaluation"]["diagnostics"] for m in seeds.values() if m["evaluation"].get("diagnostics")]
    if not diags:
        return None
    return {key: (np.mean([np.asarray(d[key], dtype=np.float64) for d in diags], axis=0).tolist()
                  if diags[0][key] else []) for key in diags[0]}


def paired_difference(a: dict[str, list], b: dict[str, list]) -> tuple[float, float]:
    """Bits per byte of model a minus model b over the same held-out files, and its standard error with the
    files as the sampling unit (ratio estimator: the difference is sum(bits_a - bits_b) / sum(bytes))."""
    delta = np.asarray(a["bits"]) - np.asarray(b["bits"])
    size = np.asarray(a["bytes"], dtype=np.float64)
    diff = delta.sum() / size.sum()
    n = len(size)
    if n < 2:
        return float(diff), float("nan")
    resid = delta - diff * size
    se = math.sqrt(n / (n - 1) * float((resid ** 2).sum())) / size.sum()
    return float(diff), se


def seed_averaged_files(seeds: dict[int, dict[str, Any]]) -> dict[str, list]:
    """Per held-out test file: its bits averaged over the seeds, and its bytes."""
    files = [m["evaluation"]["test_files"] for m in seeds.values()]
    return {"bits": np.mean([f["bits"] for f in files], axis=0).tolist(), "bytes": files[0]["bytes"]}
