"""The reasoning track's report.md, results.json and accuracy_vs_difficulty.png."""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import product
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from parloop.study.reasoning_analysis import (
    Groups,
    accuracy,
    averaged_diagnostics,
    depth_hungry,
    group,
    loop_counts,
    offset_and_filler,
    recommend,
    variants,
    verdict,
)
from parloop.study.stats import Interval

_STYLE = {"parallel": "-", "sequential_shared": "--", "sequential": ":"}


def _acc(i: Interval | None) -> str:
    if i is None:
        return "—"
    return f"{i.mean:.3f}" if i.n < 2 else f"{i.mean:.3f} ± {i.half_width:.3f}"


def _cell_order(groups: Groups) -> list[str]:
    names: list[str] = []
    for cells in groups.values():
        names += [n for n in cells if n not in names]
    key = {"r1": (0, 0)}
    return sorted(names, key=lambda n: key.get(n, (1 if n.startswith("r1-x") else 2 + ("fill" in n), n)))


def accuracy_table(groups: Groups) -> list[str]:
    pts = list(groups)
    lines = ["| model | " + " | ".join(pts) + " |", "|---" * (len(pts) + 1) + "|"]
    for name in _cell_order(groups):
        lines.append(f"| {name} | " + " | ".join(_acc(accuracy(groups[p], name)) for p in pts) + " |")
    return lines


def plot_accuracy(path: Path, groups: Groups) -> None:
    """Accuracy against difficulty, a panel per task (rows) and base depth L (columns), a line per model with 95 %
    intervals as error bars; one legend, from the panel with the most models."""
    tasks = sorted({p.split("-")[0] for p in groups})
    depths = sorted({p.split("/")[1] for p in groups}, key=lambda x: int(x[1:]))
    fig = Figure(figsize=(4.5 * len(depths) + 2.5, 3.2 * len(tasks)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(tasks), len(depths), squeeze=False)
    crowded = (0, 0, -1)
    for (row, task), (col, layers) in product(enumerate(tasks), enumerate(depths)):
        ax = axes[row][col]
        pts = sorted((int(p.split("-")[1].split("/")[0]), p) for p in groups
                     if p.startswith(task + "-") and p.endswith("/" + layers))
        lines = 0
        for name in _cell_order(groups):
            xs = [(d, accuracy(groups[p], name)) for d, p in pts if name in groups[p]]
            if xs:
                mode = next((m for m in _STYLE if name.startswith(m)), None)
                ax.errorbar([d for d, _ in xs], [i.mean for _, i in xs],
                            yerr=[0 if i.n < 2 else i.half_width for _, i in xs], capsize=3, marker="o",
                            linestyle=_STYLE.get(mode, "-"), label=name)
                lines += 1
        crowded = max(crowded, (row, col, lines), key=lambda c: c[2])
        ax.set(title=f"{task}, {layers}", xlabel="difficulty", ylabel="held-out accuracy", ylim=(0, 1.02))
        ax.set_xticks([d for d, _ in pts])
    handles, labels = axes[crowded[0]][crowded[1]].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.savefig(path, dpi=110)


def _interval_rows(title: str, rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"| {title} | comparison | difference [95 % interval] |", "|---|---|---|"]
    for where, comparisons in rows.items():
        lines += [f"| {where} | {c} | {i} |" for c, i in comparisons.items() if i is not None]
    return lines


def analyse(groups: Groups) -> dict[str, Any]:
    depth = {p: depth_hungry(cells) for p, cells in groups.items()}
    hungry = [p for p, (h, _) in depth.items() if h]
    recs = {p: recommend(groups[p]) for p in hungry}
    return {"depth": depth, "hungry": hungry, "recommendations": recs, "verdict": verdict(recs),
            "offset": {f"{p} R = {r}": c for p in groups for r, c in offset_and_filler(groups[p]).items()},
            "loop_counts": {p: loop_counts(groups[p]) for p in groups},
            "variants": {p: variants(groups[p]) for p in groups},
            "diagnostics": {f"{p} {n}": averaged_diagnostics(s) for p in groups for n, s in groups[p].items()
                            if next(iter(s.values()))["loops"] > 1}}


def _report_lines(groups: Groups, a: dict[str, Any], chosen: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    v = a["verdict"]
    lines = ["# Reasoning track: where loops pay off", "",
             f"Verdict (docs/study.md rule): **{'R = ' + str(v) if v else 'none: no point is depth-hungry'}**.",
             f"Wall time {settings.get('wall_seconds', 0) / 60:.1f} min. Accuracy = exact match on held-out test "
             "instances; differences are A minus B in accuracy, paired by seed, with 95 % intervals.", "",
             "## Depth check (R = 1 with 2 x L layers minus R = 1)", "", "| point | difference | depth-hungry |",
             "|---|---|---|"]
    lines += [f"| {p} | {d if d is not None else '— (a model is missing)'} | "
              f"{'yes' if h else 'no: the track cannot speak about loops here'} |" for p, (h, d) in a["depth"].items()]
    lines += ["", "## Accuracy (mean ± 95 % half-width over seeds)", "", *accuracy_table(groups), "",
              "![accuracy against difficulty](accuracy_vs_difficulty.png)", "", "## Recommendation per depth-hungry "
              "point", ""]
    lines += [f"- {p}: R = {r['loops']} ({r['reason']})" for p, r in a["recommendations"].items()] or ["- none"]
    lines += ["", "## Offset cost and filler tokens", "", *_interval_rows("point", a["offset"]), "",
              "## R = 2 against R = 3 and 4", "", *_interval_rows("point", a["loop_counts"]), "",
              "## Loop settings at R = 2 (plain: no per-loop norm, emb and hidden scale 1, query-read gate; wN: "
              "window N)", "", *_interval_rows("point", a["variants"]), "",
              "## Per-loop diagnostics (means over seeds)", "",
              "| model | accuracy after each loop | gate (global branch) | relative update |", "|---|---|---|---|"]
    fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs) if xs else "—"  # noqa: E731
    lines += [f"| {k} | {fmt(d.get('per_loop_accuracy'))} | {fmt(d.get('gate_mean'))} | "
              f"{fmt(d.get('relative_update'))} |" for k, d in a["diagnostics"].items()]
    lines += ["", "## Learning-rate sweep (validation accuracy, answer loss per multiplier)", "",
              "| task | model | chosen | tried |", "|---|---|---|---|"]
    lines += [f"| {t} | {n} | x{c['multiplier']:g}{' (edge)' if c['edge'] else ''} | "
              + ", ".join(f"x{m}: {v[0]:.3f}/{v[1]:.3f}" for m, v in c["tried"].items()) + " |"
              for t, cells in chosen.items() for n, c in cells.items()]
    return lines


def _jsonable(x: Any) -> Any:
    if isinstance(x, Interval):
        return x.to_dict()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_reasoning_report(study: Path, models: Sequence[dict[str, Any]], sweep: Sequence[dict[str, Any]],
                           chosen: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """report.md, results.json (every model's task, difficulty, seed and accuracy; every interval) and the plot."""
    groups = group(models)
    a = analyse(groups)
    plot_accuracy(study / "accuracy_vs_difficulty.png", groups)
    (study / "report.md").write_text("\n".join(_report_lines(groups, a, chosen, settings)) + "\n")
    strip = lambda r: {k: v for k, v in r.items() if k != "settings"}  # noqa: E731
    results = {"track": "reasoning", "settings": settings, "models": [strip(m) for m in models],
               "sweep": [strip(s) for s in sweep], "learning_rates": chosen,
               **_jsonable({k: v for k, v in a.items() if k != "depth"}),
               "depth": {p: {"hungry": h, "difference": _jsonable(d)} for p, (h, d) in a["depth"].items()}}
    (study / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results
