"""The acceptance figures of the GPU decode path, read off the bench part's result, each met, not met or not
measured (docs/gpu.md, "What each figure means").

Per preset and batch size, all at bf16, context 512, decode compiled (CUDA graphs):
- parallel R = 2 over R = 1 decode time per token: at most 1.10 (the loops ride along in one pass);
- parallel R = 4 over R = 1: at most 1.30;
- R = 1 over `transformers`' Llama with the same weights, static cache and compiled forward: at most 1.00 (no
  slower; a miss inside both medians' p10-p90 spread is marked as such);
- the largest preset's R = 1 achieved bandwidth (bytes a step must read over its median time) as a share of the
  card's measured copy bandwidth: at least 40 %.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

RATIO_LIMITS = {2: 1.10, 4: 1.30}
REFERENCE_LIMIT = 1.00
BANDWIDTH_SHARE_PCT = 40.0


@dataclass
class Figure:
    preset: str
    batch: int
    name: str
    value: float | None  # None: not measured (skipped for time, or its part failed)
    limit: str
    met: bool | None
    note: str = ""


def _row(result: dict[str, Any], preset: str, batch: int, loops: int) -> dict[str, Any] | None:
    return next((r for r in result["rows"] if (r["preset"], r["batch"], r["mode"], r["loops"])
                 == (preset, batch, "parallel", loops)), None)


def _reference(result: dict[str, Any], preset: str, batch: int) -> dict[str, Any] | None:
    return next((r for r in result["references"] if (r["preset"], r["batch"]) == (preset, batch)), None)


def _ratio_figures(result: dict[str, Any], preset: str, batch: int) -> list[Figure]:
    r1 = _row(result, preset, batch, 1)
    figures = []
    for loops, limit in RATIO_LIMITS.items():
        row = _row(result, preset, batch, loops)
        value = None if row is None or r1 is None else row["decode_ms_per_token"] / r1["decode_ms_per_token"]
        figures.append(Figure(preset, batch, f"parallel R={loops} / R=1 decode time", value, f"<= {limit:.2f}",
                              None if value is None else value <= limit))
    return figures


def _reference_figure(result: dict[str, Any], preset: str, batch: int) -> Figure:
    r1, ref = _row(result, preset, batch, 1), _reference(result, preset, batch)
    name = "R=1 / transformers Llama (static cache, compiled)"
    if r1 is None or ref is None:
        return Figure(preset, batch, name, None, f"<= {REFERENCE_LIMIT:.2f}", None)
    value = r1["decode_ms_per_token"] / ref["decode_ms_per_token"]
    met = value <= REFERENCE_LIMIT
    overlap = r1["decode_ms_p10"] <= ref["decode_ms_p90"]
    note = "" if met or not overlap else "within the steps' p10-p90 spread"
    return Figure(preset, batch, name, value, f"<= {REFERENCE_LIMIT:.2f}", met, note)


def _bandwidth_figure(result: dict[str, Any], preset: str, batch: int) -> Figure:
    r1 = _row(result, preset, batch, 1)
    value = None if r1 is None else r1["achieved_bandwidth_pct"]
    return Figure(preset, batch, "R=1 achieved / copy bandwidth (%)", value, f">= {BANDWIDTH_SHARE_PCT:.0f}",
                  None if value is None else value >= BANDWIDTH_SHARE_PCT)


def acceptance(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure for every preset and batch size of the bench part's settings, as dicts (for the JSON)."""
    settings = result["settings"]
    figures = []
    for batch in settings["batches"]:
        for preset in settings["presets"]:
            figures += _ratio_figures(result, preset, batch)
            figures.append(_reference_figure(result, preset, batch))
            if preset == settings["presets"][0]:
                figures.append(_bandwidth_figure(result, preset, batch))
    return [asdict(f) for f in figures]


def verdict(figure: dict[str, Any]) -> str:
    """'met', 'not met' (with its note) or 'not measured'."""
    if figure["met"] is None:
        return "not measured"
    text = "met" if figure["met"] else "not met"
    return f"{text} ({figure['note']})" if figure["note"] else text
