"""Reading the study's results: rows by mode, the offset cost, paired differences and the recommended loop
count."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from parloop.eval.diagnostics import offset_cost

# (key in a model's evaluation, column title, higher is better)
METRICS = (
    ("val_bpb", "val bits/byte", False),
    ("test_bpb", "test bits/byte", False),
    ("code_reasoning", "code reasoning", True),
    ("line_completion", "line completion", True),
    ("humaneval", "HumanEval pass@1", True),
)

Rows = dict[str, dict[int, dict[str, Any]]]  # {mode: {R: model record}}


def rows_by_mode(models: Sequence[dict[str, Any]], modes: Sequence[str]) -> Rows:
    """{mode: {R: model record}}, the R = 1 model in every mode."""
    return {mode: {m["loops"]: m for m in models if mode in m["modes"]} for mode in modes}


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


def offset_costs(by_mode: Rows) -> dict[int, dict[str, float]]:
    """Per R: for each metric, how much worse `parallel` is than `sequential_shared` (positive = the offset costs)."""
    par, seq = by_mode.get("parallel", {}), by_mode.get("sequential_shared", {})
    return {r: {key: offset_cost(par[r]["evaluation"][key], seq[r]["evaluation"][key], higher)
                for key, _, higher in METRICS}
            for r in sorted(set(par) & set(seq))}


def _comparison_lines(mode: str, rows: dict[int, dict[str, Any]], best: int, chosen: int,
                      compared: dict[int, tuple[float, float]]) -> list[str]:
    """The recommendation's reasoning: the best model, each other one against it, and the verdict."""
    n_files = len(rows[best]["evaluation"]["test_files"]["bytes"])
    lines = [f"Among the {mode} models, R = {best} has the lowest test bits per byte "
             f"({rows[best]['evaluation']['test_bpb']:.4f})."]
    for r, (diff, se) in sorted(compared.items()):
        verdict = "within" if diff < 2 * se else "more than"
        lines.append(f"R = {r}: {rows[r]['evaluation']['test_bpb']:.4f}, {diff:+.4f} ± {se:.4f} (one standard error "
                     f"over {n_files} held-out files) against R = {best}: {verdict} two standard errors.")
    if chosen != best:
        lines.append(f"R = {chosen} is the smallest loop count within two standard errors of R = {best}, so the "
                     f"extra loops buy no measurable gain: R = {chosen} is recommended.")
    elif best == min(rows):
        lines.append(f"R = {best} is also the smallest loop count trained, so it is recommended.")
    else:
        lines.append(f"Every smaller loop count is measurably worse, so R = {best} is recommended.")
    return lines


def _loop_lines(rows: dict[int, dict[str, Any]], chosen: int) -> list[str]:
    """The per-loop measures of the recommended model, or of the smallest looped one when no loop was
    recommended."""
    looped = [r for r in sorted(rows) if rows[r]["evaluation"].get("diagnostics")]
    shown = chosen if chosen in looped else (looped[0] if looped else None)
    if shown is None:
        return []
    diag = rows[shown]["evaluation"]["diagnostics"]
    lens = ", ".join(f"loop {i}: {v:.3f}" for i, v in enumerate(diag["logit_lens_loss"]))
    updates = ", ".join(f"loop {i + 1}: {u:.3f}" for i, u in enumerate(diag["relative_update"]))
    lines = [f"In the R = {shown} model, the loss read out after each loop is {lens} (nats per token), "
             f"and the relative update size is {updates}."]
    if diag["update_cosine"]:
        cosines = ", ".join(f"loop {i + 2}: {c:+.3f}" for i, c in enumerate(diag["update_cosine"]))
        lines.append(f"Cosine between successive updates: {cosines} (negative means a loop undoes the one before).")
    return lines


def recommend(by_mode: Rows, offset: dict[int, dict[str, float]]) -> dict[str, Any]:
    """The loop count to use, by a rule fixed before any result was seen: among the `parallel` models (the
    architecture one would deploy), the lowest test bits per byte — the most precise of the evaluations for
    small models — but the smallest R whose test bits per byte is within two standard errors of that best one
    (paired over held-out files), since more loops cost compute for no measurable gain. The reason gives the
    numbers it was read from."""
    mode = "parallel" if "parallel" in by_mode else next(iter(by_mode))
    rows = by_mode[mode]
    best = min(rows, key=lambda r: rows[r]["evaluation"]["test_bpb"])
    if len(rows) == 1:
        return {"loops": best, "best_test_bpb_loops": best, "mode": mode, "paired_differences": {},
                "reason": f"Only R = {best} was trained: there is nothing to compare it with."}
    best_files = rows[best]["evaluation"]["test_files"]
    compared = {r: paired_difference(rows[r]["evaluation"]["test_files"], best_files) for r in rows if r != best}
    within = [r for r in sorted(rows) if r < best and compared[r][0] < 2 * compared[r][1]]
    chosen = within[0] if within else best
    lines = _comparison_lines(mode, rows, best, chosen, compared) + _loop_lines(rows, chosen)
    costs = {r: c["test_bpb"] for r, c in sorted(offset.items()) if r >= 2}
    if costs:
        listed = ", ".join(f"R = {r}: {c:+.4f}" for r, c in costs.items())
        lines.append(f"Offset cost (test bits per byte by which parallel is worse than sequential_shared): {listed}.")
    return {"loops": chosen, "best_test_bpb_loops": best, "mode": mode, "reason": " ".join(lines),
            "paired_differences": {str(r): {"diff": d, "se": s} for r, (d, s) in compared.items()}}
