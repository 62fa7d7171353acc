"""The study's outputs: results.json and report.md (tables with 95 % intervals over seeds, the recommendation)
and the PNG figures (`parloop.study.plots`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parloop.study.analysis import (
    METRICS,
    Groups,
    comparisons,
    gap_vs_scale,
    group_models,
    offset_costs,
)
from parloop.study.plots import (
    looped_diagnostics,
    plot_diagnostics,
    plot_evaluations,
    plot_gap_vs_scale,
    plot_offset_cost,
)
from parloop.study.recommend import recommend
from parloop.study.stats import Interval, mean_interval
from parloop.study.sweep import edge_warning

Cells = dict[str, dict[int, dict[str, Any]]]


def _fmt(value: Any, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _mean_pm(values: Sequence[float]) -> str:
    """`mean ± half-width of the 95 % interval` (just the mean for one seed)."""
    i = mean_interval(values)
    return f"{i.mean:.4f}" if i.n < 2 else f"{i.mean:.4f} ± {i.half_width:.4f}"


def _interval(i: Interval | None) -> str:
    return "—" if i is None else str(i)


def label(name: str) -> str:
    """A cell's row title: `R = 1`, `R = 1, 2 x layers`, `parallel R = 2`."""
    if name == "r1":
        return "R = 1"
    if name.startswith("r1-x"):
        return f"R = 1, {name[4:-6]} x layers"
    mode, r = name.rsplit("-r", 1)
    return f"{mode} R = {r}"


def results_table(cells: Cells) -> str:
    """The paper's shape: a row per model, a column per evaluation, each a mean over seeds ± its 95 % interval."""
    out = ["| model | " + " | ".join(title for _, title, _ in METRICS) + " | layers | parameters | lr | seeds |",
           "|---" * (len(METRICS) + 5) + "|"]
    for name, seeds in cells.items():
        first = next(iter(seeds.values()))
        out.append(f"| {label(name)} | "
                   + " | ".join(_mean_pm([m["evaluation"][key] for m in seeds.values()]) for key, _, _ in METRICS)
                   + f" | {first['layers']} | {first['training']['parameters']:,} | {first['lr']:.2g} | "
                   f"{len(seeds)} |")
    return "\n".join(out) + "\n"


def differences_table(compared: dict[str, dict[str, dict[str, Interval | None]]]) -> str:
    """Every looped model against its baselines: how much worse (positive) or better (negative) it is."""
    out = ["| model | against | " + " | ".join(title for _, title, _ in METRICS) + " |",
           "|---" * (len(METRICS) + 2) + "|"]
    for name, per_baseline in compared.items():
        for baseline, costs in per_baseline.items():
            out.append(f"| {label(name)} | {baseline} | "
                       + " | ".join(_interval(costs[key]) for key, _, _ in METRICS) + " |")
    return "\n".join(out) + "\n"


def offset_table(per_r: dict[int, dict[str, Interval | None]]) -> str:
    out = ["| R | " + " | ".join(title for _, title, _ in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    out += [f"| {r} | " + " | ".join(_interval(c[key]) for key, _, _ in METRICS) + " |"
            for r, c in sorted(per_r.items())]
    return "\n".join(out) + "\n"


def gap_table(groups: Groups) -> str:
    out = ["| R | scale | parameters x tokens (R = 1) | test bits/byte: parallel R minus R = 1 |", "|---|---|---|---|"]
    for r, points in sorted(gap_vs_scale(groups).items()):
        out += [f"| {r} | {p['scale']} | {p['compute']:.3g} | {_interval(p['gap'])} |" for p in points]
    return "\n".join(out) + "\n"


def sweep_table(sweep: dict[str, dict[str, Any]]) -> str:
    multipliers = sorted({m for s in sweep.values() for m in s["val_bpb"]}, key=float)
    if not multipliers:
        return "No learning-rate sweep: every model uses the recipe's learning rate.\n"
    out = ["| model | " + " | ".join(f"lr x {m}" for m in multipliers) + " | chosen |",
           "|---" * (len(multipliers) + 2) + "|"]
    out += [f"| {label(name)} | " + " | ".join(_fmt(s["val_bpb"].get(m)) for m in multipliers)
            + f" | x {s['multiplier']:g}{' (edge)' if s.get('edge') else ''} |" for name, s in sweep.items()]
    warning = edge_warning(sweep)
    return "\n".join(out) + "\n" + (f"\n{warning}\n" if warning else "")


def diagnostics_tables(cells: Cells, modes: list[str]) -> str:
    """One table per mode of the seed-averaged per-loop measures of every looped model (a row per R and loop)."""
    out = []
    for mode, per_r in looped_diagnostics(cells, modes).items():
        out += [f"### {mode}", "", "| R | loop | logit-lens loss | relative update | update cosine | attention JS "
                "(mean over layers) | effective rank | mean pairwise cosine | gate (mean over layers) |",
                "|---" * 9 + "|"]
        for r, d in sorted(per_r.items()):
            for loop in range(r):
                js = np.mean([layer[loop - 1] for layer in d["attention_js"]]) if loop and d["attention_js"] else None
                gate = np.mean([layer[loop - 1] for layer in d["gate_mean"]]) if loop and d["gate_mean"] else None
                out.append(f"| {r} | {loop} | {_fmt(d['logit_lens_loss'][loop])} | "
                           f"{_fmt(d['relative_update'][loop - 1] if loop else None)} | "
                           f"{_fmt(d['update_cosine'][loop - 2] if loop >= 2 else None, 3)} | {_fmt(js)} | "
                           f"{_fmt(d['effective_rank'][loop], 2)} | {_fmt(d['mean_pairwise_cosine'][loop], 3)} | "
                           f"{_fmt(gate, 3)} |")
        out.append("")
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    """Intervals as dicts, integer keys as strings, all the way down."""
    if isinstance(value, Interval):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _scale_sections(groups: Groups, modes: list[str]) -> list[str]:
    compared, offsets = comparisons(groups), offset_costs(groups)
    out = []
    for scale, cells in groups.items():
        first = next(iter(next(iter(cells.values())).values()))
        out += [f"## Scale {scale}: {first['training']['tokens']:,} training tokens per model", "",
                "Means over seeds ± the half-width of their 95 % t-interval.", "", results_table(cells),
                "Paired differences (mean over seeds of model minus baseline, [95 % interval]); positive = the "
                "model is worse (higher bits per byte, lower accuracy).", "", differences_table(compared[scale])]
        if offsets[scale]:
            out += ["Offset cost: how much worse `parallel` is than `sequential_shared` at the same R (the price "
                    "of the cross-loop offset), paired by seed.", "", offset_table(offsets[scale])]
    return out


def report_markdown(groups: Groups, modes: list[str], sweep: dict[str, Any], recommendation: dict[str, Any],
                    figures: Sequence[str], settings: dict[str, Any]) -> str:
    largest = recommendation["scale"]
    seeds = sorted({s for cells in groups.values() for c in cells.values() for s in c})
    verdict = f"R = {recommendation['loops']}" if recommendation["loops"] else "No verdict"
    report = [
        "# Loop-count study", "",
        f"Scales: {', '.join(groups)}; seeds: {', '.join(map(str, seeds))} (a seed sets the initial weights and "
        "the data order); every model of a scale sees the same number of tokens. Baselines: R = 1 with the same "
        "parameters and R = 1 with R x the layers (the same compute per token). Loop models use the released "
        "architecture's settings unless overridden (see Settings). Rule, intervals and sweep: docs/study.md.", "",
        "## Recommendation", "", f"**{verdict}.** {recommendation['reason']}", "",
        *_scale_sections(groups, modes),
        "## Gap against scale", "", gap_table(groups),
        "## Learning-rate sweep (validation bits per byte, smallest scale, sweep seed)", "", sweep_table(sweep),
        f"## Per-loop diagnostics (scale {largest}, test files, means over seeds)", "",
        "Loop 0 is the first pass. Relative update: ||h_r - h_(r-1)|| / ||h_(r-1)||; update cosine: between "
        "h_r - h_(r-1) and h_(r-1) - h_(r-2) (negative = oscillation); attention JS: Jensen-Shannon divergence "
        "of the global attention from the previous loop's; gate: weight of the shared-KV (global) branch.", "",
        diagnostics_tables(groups[largest], modes), "## Figures", "",
        *[f"![{name}]({name})" for name in figures], "",
        "## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    return "\n".join(report)


def write_report(study: Path, models: Sequence[dict[str, Any]], modes: Sequence[str], sweep: dict[str, Any],
                 settings: dict[str, Any]) -> dict[str, Any]:
    """results.json, report.md and the figures, from the records of all models."""
    modes = list(modes)
    groups = group_models(models)
    recommendation = recommend(groups)
    plot_evaluations(study / "evaluations.png", groups[recommendation["scale"]], modes)
    plot_diagnostics(study / "diagnostics.png", groups[recommendation["scale"]], modes)
    plot_gap_vs_scale(study / "gap_vs_scale.png", groups)
    plot_offset_cost(study / "offset_cost.png", groups)
    figures = ["evaluations.png", "gap_vs_scale.png", "offset_cost.png", "diagnostics.png"]
    results = {"settings": settings, "models": list(models), "lr_sweep": sweep,
               "comparisons": _jsonable(comparisons(groups)), "offset_cost": _jsonable(offset_costs(groups)),
               "gap_vs_scale": _jsonable(gap_vs_scale(groups)), "recommendation": recommendation}
    (study / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (study / "report.md").write_text(report_markdown(groups, modes, sweep, recommendation, figures, settings))
    return results
