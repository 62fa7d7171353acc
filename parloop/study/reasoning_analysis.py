"""Reading the reasoning track's results (rules in docs/study.md, "The reasoning track"): the learning rate each
model type gets, paired accuracy differences with 95 % intervals, the depth check, the offset's cost and what filler
tokens recover, R = 2 against 3 and 4, and the recommended loop count.

Every difference is "A minus B" in accuracy (positive: A more accurate), paired by seed."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from parloop.study.stats import Interval, mean_interval

Groups = dict[str, dict[str, dict[int, dict[str, Any]]]]  # {point: {cell: {seed: record}}}


def group(records: Sequence[dict[str, Any]]) -> Groups:
    out: Groups = {}
    for r in records:
        out.setdefault(r["point"], {}).setdefault(r["name"], {})[r["seed"]] = r
    return out


def sweep_key(cell_name: str) -> str:
    """The swept model whose learning rate a model takes: R = 3, 4 and filler models take their mode's R = 2
    choice, the deeper compute-matched models take that of 2 x L layers."""
    if cell_name.startswith("r1-x"):
        return "r1-x2layers"
    if cell_name == "r1":
        return cell_name
    return cell_name.split("-r")[0] + "-r2"


def choose_multipliers(sweep: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{task: {swept model: {"multiplier", "tried": {multiplier: [val accuracy, val answer loss]}, "edge"}}}: the
    multiplier with the highest validation accuracy, ties broken by the lower validation answer loss."""
    tried: dict[str, dict[str, dict[float, tuple[float, float]]]] = {}
    for r in sweep:
        e = r["evaluation"]
        tried.setdefault(r["task"], {}).setdefault(r["name"], {})[r["lr_multiplier"]] = (e["accuracy"],
                                                                                         e["answer_loss"])
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, cells in tried.items():
        out[task] = {}
        for name, by_m in cells.items():
            best = max(by_m, key=lambda m: (by_m[m][0], -by_m[m][1]))
            edge = {max(by_m): "largest", min(by_m): "smallest"}.get(best) if len(by_m) > 2 else None
            out[task][name] = {"multiplier": best, "tried": {f"{m:g}": list(v) for m, v in sorted(by_m.items())},
                               "edge": edge}
    return out


def multiplier(chosen: dict[str, dict[str, dict[str, Any]]], task: str, cell_name: str) -> float:
    """The multiplier a model trains at (1 without a sweep)."""
    return chosen.get(task, {}).get(sweep_key(cell_name), {}).get("multiplier", 1.0)


def accuracy(cells: dict[str, dict[int, dict[str, Any]]], name: str) -> Interval | None:
    if name not in cells:
        return None
    return mean_interval([m["evaluation"]["accuracy"] for m in cells[name].values()])


def difference(cells: dict[str, dict[int, dict[str, Any]]], a: str, b: str) -> Interval | None:
    """Accuracy of `a` minus accuracy of `b`, paired by seed, with its 95 % interval (None if either is missing)."""
    if a not in cells or b not in cells:
        return None
    seeds = sorted(set(cells[a]) & set(cells[b]))
    if not seeds:
        return None
    return mean_interval([cells[a][s]["evaluation"]["accuracy"] - cells[b][s]["evaluation"]["accuracy"]
                          for s in seeds])


def depth_hungry(cells: dict[str, dict[int, dict[str, Any]]]) -> tuple[bool, Interval | None]:
    """The depth check: R = 1 with 2 x L layers minus R = 1, and whether it is measurably positive."""
    d = difference(cells, "r1-x2layers", "r1")
    return bool(d is not None and d.excludes_zero and d.mean > 0), d


def loops_present(cells: dict[str, dict[int, dict[str, Any]]], mode: str = "parallel") -> list[int]:
    """The R of the plain `mode` models at a point (no filler, no variant)."""
    return sorted(int(m.group(1)) for n in cells if (m := re.fullmatch(rf"{mode}-r(\d+)", n)))


def recommend(cells: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """At a depth-hungry point: the smallest R (R = 1 or `parallel` R) whose accuracy is not measurably below the
    best candidate's (best minus it: interval reaching zero)."""
    candidates = {1: "r1", **{r: f"parallel-r{r}" for r in loops_present(cells)}}
    means = {r: accuracy(cells, n) for r, n in candidates.items()}
    best = max(means, key=lambda r: means[r].mean)
    gaps = {r: difference(cells, candidates[best], n) for r, n in candidates.items() if r != best}
    fine = [r for r in sorted(candidates) if r == best or not (gaps[r].excludes_zero and gaps[r].mean > 0)]
    reason = "; ".join([f"best {candidates[best]} {means[best].mean:.3f}"]
                       + [f"{candidates[best]} minus {candidates[r]}: {gaps[r]}" for r in sorted(gaps)])
    return {"loops": fine[0], "best": best, "reason": reason}


def offset_and_filler(cells: dict[str, dict[int, dict[str, Any]]]) -> dict[int, dict[str, Interval | None]]:
    """Per R: the offset's cost (sequential_shared minus parallel: positive means the offset costs accuracy), the
    same against `sequential`, and with filler tokens: what they give parallel, what cost remains, what they give
    sequential_shared."""
    out: dict[int, dict[str, Interval | None]] = {}
    for r in loops_present(cells):
        fill = next((n.split("-fill")[1] for n in cells if n.startswith(f"parallel-r{r}-fill")), None)
        p, s, pf, sf = f"parallel-r{r}", f"sequential_shared-r{r}", f"parallel-r{r}-fill{fill}", \
            f"sequential_shared-r{r}-fill{fill}"
        out[r] = {"offset cost (sequential_shared - parallel)": difference(cells, s, p),
                  "sequential - parallel": difference(cells, f"sequential-r{r}", p),
                  f"filler gain for parallel (fill {fill})": difference(cells, pf, p),
                  "cost left with filler (sequential_shared - parallel+fill)": difference(cells, s, pf),
                  "filler gain for sequential_shared": difference(cells, sf, s)}
    return out


def loop_counts(cells: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Interval | None]:
    """R = 3 and 4 against R = 2, per mode (accuracy of the larger R minus R = 2)."""
    out = {}
    for mode in ("parallel", "sequential_shared", "sequential"):
        for r in loops_present(cells, mode):
            if r > 2:
                out[f"{mode} R = {r} - R = 2"] = difference(cells, f"{mode}-r{r}", f"{mode}-r2")
    return out


def variants(cells: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Interval | None]:
    """Each loop-setting variant at R = 2 against the preset's settings (variant minus preset, per mode) and the
    offset's cost under it (sequential_shared minus parallel)."""
    out = {}
    for name in sorted({n.split("parallel-r2-")[1] for n in cells if re.fullmatch(r"parallel-r2-(?!fill)\w+", n)}):
        for mode in ("parallel", "sequential_shared"):
            out[f"{mode} R = 2 {name} - {mode} R = 2"] = difference(cells, f"{mode}-r2-{name}", f"{mode}-r2")
        out[f"offset cost with {name} (sequential_shared - parallel)"] = difference(
            cells, f"sequential_shared-r2-{name}", f"parallel-r2-{name}")
    return out


def verdict(recommendations: dict[str, dict[str, Any]]) -> int | None:
    """The track's verdict: the R recommended at the most depth-hungry points (ties: the smaller R); None when no
    point is depth-hungry."""
    counts: dict[int, int] = {}
    for rec in recommendations.values():
        counts[rec["loops"]] = counts.get(rec["loops"], 0) + 1
    return min(counts, key=lambda r: (-counts[r], r)) if counts else None


def averaged_diagnostics(seeds: dict[int, dict[str, Any]]) -> dict[str, list[float]]:
    """Per-loop accuracy, gate weight (mean over layers) and relative update of a looped model, averaged over its
    seeds."""
    evals = [m["evaluation"] for m in seeds.values()]
    out = {}
    for key in ("per_loop_accuracy", "relative_update", "gate_mean"):
        rows = [np.asarray(e[key], dtype=np.float64) for e in evals if e.get(key)]
        if rows:
            per_loop = [r.mean(axis=0) if r.ndim == 2 else r for r in rows]  # gate: [layers, loops - 1]
            out[key] = np.mean(per_loop, axis=0).tolist()
    return out
