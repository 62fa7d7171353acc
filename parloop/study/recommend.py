"""The recommended loop count, by the rule fixed in docs/study.md before any result was seen, and its reason.

Rule: at each scale, among the `parallel` models and R = 1, take the R with the lowest mean test bits per byte
over seeds ("best"); recommend the smallest R whose paired difference to the best (test bits per byte, mean over
seeds with its 95 % t-interval) is not measurably positive (the interval reaches zero or below). More loops cost
compute, so they must buy a gain the seeds can tell apart from noise. The study's verdict is the recommendation at
its largest scale (parameters x tokens). Fewer than two seeds give no interval, hence no verdict.
"""

from __future__ import annotations

from typing import Any

from parloop.study.analysis import (
    Groups,
    cell_loops,
    compute,
    cost,
    offset_costs,
    paired_difference,
    seed_averaged_files,
)


def _rows(cells: dict[str, dict[int, dict[str, Any]]]) -> dict[int, str]:
    """{R: cell name} of the candidates: R = 1 and the parallel models."""
    rows = {cell_loops(cells, n): n for n in cells if n.startswith("parallel-r")}
    return {1: "r1", **rows} if "r1" in cells else rows


def _mean_test(cells: dict[str, dict[int, dict[str, Any]]], name: str) -> float:
    values = [m["evaluation"]["test_bpb"] for m in cells[name].values()]
    return sum(values) / len(values)


def _file_error_lines(cells: dict[str, dict[int, dict[str, Any]]], rows: dict[int, str]) -> list[str]:
    """How uncertain the largest R's gap to R = 1 is from the choice of held-out files alone."""
    top = max(rows)
    if top == 1 or "r1" not in cells:
        return []
    diff, se = paired_difference(seed_averaged_files(cells[rows[top]]), seed_averaged_files(cells["r1"]))
    return [f"The held-out files add a sampling error of their own, not in the seed intervals: R = {top} minus "
            f"R = 1 is {diff:+.4f} ± {se:.4f} (one standard error over the test files, seeds averaged)."]


def recommend_at(cells: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """The rule at one scale: {"loops" (None: no verdict), "best", "differences", "lines" (the reasoning)}."""
    rows = _rows(cells)
    seeds = min(len(cells[n]) for n in rows.values())
    best = min(rows, key=lambda r: _mean_test(cells, rows[r]))
    means = ", ".join(f"R = {r}: {_mean_test(cells, rows[r]):.4f}" for r in sorted(rows))
    lines = [f"Mean test bits per byte over {seeds} seed(s): {means}; R = {best} is lowest."]
    if seeds < 2 or len(rows) < 2:
        why = "one seed gives no interval" if seeds < 2 else "there is nothing to compare"
        return {"loops": None, "best": best, "differences": {}, "lines": lines + [f"No verdict: {why}."]}
    diffs = {r: cost(cells[rows[r]], cells[rows[best]], "test_bpb", False) for r in rows if r != best}
    for r, d in sorted(diffs.items()):
        verdict = "measurably worse" if d.low > 0 else "not measurably worse"
        lines.append(f"R = {r} minus R = {best}: {d} (95 % interval over seeds): {verdict}.")
    chosen = min([best] + [r for r, d in diffs.items() if r < best and d.low <= 0])
    if chosen != best:
        lines.append(f"R = {chosen} is the smallest loop count not measurably worse than R = {best}: "
                     f"the extra loops buy no gain the seeds can separate from noise.")
    elif best == min(rows):
        lines.append(f"R = {best} is also the smallest loop count trained.")
    else:
        lines.append(f"Every smaller loop count is measurably worse, so R = {best} it is.")
    lines += _file_error_lines(cells, rows)
    return {"loops": chosen, "best": best, "lines": lines,
            "differences": {str(r): d.to_dict() for r, d in sorted(diffs.items())}}


def recommend(groups: Groups) -> dict[str, Any]:
    """The recommendation at every scale and the study's verdict (that of the largest scale), with its reason."""
    per_scale = {scale: recommend_at(cells) for scale, cells in groups.items() if _rows(cells)}
    if not per_scale:
        return {"loops": None, "scale": list(groups)[-1], "per_scale": {},
                "reason": "No verdict: the rule compares R = 1 and parallel models, and none was trained."}
    largest = max(per_scale, key=lambda s: compute(groups[s], _rows(groups[s])[min(_rows(groups[s]))]))
    verdict = per_scale[largest]
    lines = [f"At the largest scale ({largest}):", *verdict["lines"]]
    lines += [f"At scale {s} the rule gives " + (f"R = {v['loops']}." if v["loops"] else "no verdict.")
              for s, v in per_scale.items() if s != largest]
    offsets = offset_costs({largest: groups[largest]})[largest]
    if offsets:
        listed = ", ".join(f"R = {r}: {c['test_bpb']}" for r, c in sorted(offsets.items()) if c["test_bpb"])
        lines.append(f"Offset cost (test bits per byte by which parallel is worse than sequential_shared, "
                     f"95 % interval): {listed}.")
    return {"loops": verdict["loops"], "scale": largest, "reason": " ".join(lines),
            "per_scale": {s: {k: v[k] for k in ("loops", "best", "differences")} for s, v in per_scale.items()}}
