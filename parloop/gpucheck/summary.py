"""The GPU check's markdown summary (`gpu-check.md`), from the report that `gpu-check.json` holds."""

from __future__ import annotations

from typing import Any

from parloop.gpucheck.acceptance import verdict


def _table(titles: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _number(value: float | None, fmt: str = "{:.3g}") -> str:
    return "-" if value is None else fmt.format(value)


def _parts(report: dict[str, Any]) -> list[str]:
    rows = [[name, p["status"] + (f": {p['reason']}" if p.get("reason") else ""), _number(p.get("seconds"), "{:.0f}"),
             f"{p['estimate_s']:.0f}", f"{p['share_s']:.0f}"] for name, p in report["parts"].items()]
    return _table(["part", "status", "seconds", "estimate (H100)", "share"], rows)


def _tests(tests: dict[str, Any]) -> list[str]:
    line = (f"tests/test_cuda.py: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
            f"of {tests['total']}" + (" (stopped at its share: tests not reached are not counted)"
                                       if tests.get("stopped") else ""))
    return [line] + [f"- failed: {name}" for name in tests["failures"]]


def _against_sequential(rows: list[dict[str, Any]]) -> list[str]:
    """Each sequential-mode row's decode time over parallel's at the same preset, batch and R."""
    parallel = {(r["preset"], r["batch"], r["loops"]): r["decode_ms_per_token"] for r in rows
                if r["mode"] == "parallel"}
    cells = [[r["preset"], str(r["batch"]), str(r["loops"]), r["mode"],
              f"{r['decode_ms_per_token'] / parallel[key]:.2f}"]
             for r in rows if r["mode"] != "parallel" and (key := (r["preset"], r["batch"], r["loops"])) in parallel]
    if not cells:
        return []
    return ["", "Sequential modes against parallel (decode time per token, same preset, batch and R):", "",
            *_table(["preset", "batch", "R", "mode", "x parallel"], cells)]


def _bench(bench: dict[str, Any]) -> list[str]:
    lines = [f"machine: {bench['machine']['device_name']}, torch {bench['machine']['torch_version']}, copy "
             f"bandwidth {bench['machine']['copy_bandwidth_gbs']:.0f} GB/s (read + write)", ""]
    figures = [[f["preset"], str(f["batch"]), f["name"], _number(f["value"], "{:.3f}"), f["limit"], verdict(f)]
               for f in bench["acceptance"]]
    lines += _table(["preset", "batch", "figure", "value", "limit", "verdict"], figures) + [""]
    rows = [[r["preset"], str(r["batch"]), r["mode"], str(r["loops"]),
             f"{r['decode_ms_per_token']:.3f} ({r['decode_ms_p10']:.3f}-{r['decode_ms_p90']:.3f})",
             _number(r.get("achieved_gbs"), "{:.0f}"), _number(r.get("achieved_bandwidth_pct"), "{:.1f}"),
             f"{r['seconds']:.0f}"] for r in bench["rows"] + bench["references"]]
    lines += _table(["preset", "batch", "mode", "R", "ms/token (p10-p90)", "GB/s", "% copy bw", "point s"], rows)
    lines += _against_sequential(bench["rows"])
    for e in bench.get("errors", []):
        lines += ["", f"FAILED: {e['preset']} b{e['batch']} {e['mode']} R={e['loops']}: {e['error']}"]
    if bench["skipped"]:
        skipped = ", ".join(f"{s['preset']} b{s['batch']} {s['mode']} R={s['loops']}" for s in bench["skipped"])
        lines += ["", f"not measured (time share spent): {skipped}"]
    return lines


def _study(study: dict[str, Any]) -> list[str]:
    c = study["compute"]
    lines = [f"training: {c['runs']} runs planned, {c['models_trained']} trained; {c['planned_tokens']:,} tokens "
             f"planned, {c['trained_tokens']:,} trained ({'match' if c['tokens_match'] else 'MISMATCH'}); "
             f"{c['planned_flops']:.3g} FLOPs in {c['train_seconds']:.0f} s of training = "
             f"{c['achieved_tflops']:.3g} TFLOP/s", ""]
    rows = [[m["name"], str(m["seed"]), f"{m['test_bpb']:.4f}", f"{m['tokens_per_s']:,}"] for m in study["models"]]
    lines += _table(["model", "seed", "test bits/byte", "tokens/s"], rows)
    rec = study["recommendation"]
    return lines + ["", f"recommendation: {'R = ' + str(rec['loops']) if rec['loops'] else 'no verdict'}. "
                    f"{rec['reason']}"]


SECTIONS = (("tests", "Tests", _tests), ("bench", "Decode bench", _bench), ("study", "Study (bits per byte)", _study))


def markdown(report: dict[str, Any]) -> str:
    """The summary: parts with their times, then each part's figures (what a part did not produce is left out)."""
    head = f"# GPU check{' (dry run, CPU)' if report['dry_run'] else ''}: {report['started']}, {report['card']}"
    lines = [head, "", *_parts(report)]
    for key, title, section in SECTIONS:
        part = report["parts"].get(key, {})
        if part.get("result"):
            lines += ["", f"## {title}", "", *section(part["result"])]
    reasoning = report["parts"].get("reasoning")
    if reasoning:
        lines += ["", "## Reasoning track", "", f"status: {reasoning['status']}"
                  + (f" ({reasoning['reason']})" if reasoning.get("reason") else "")]
    return "\n".join(lines) + "\n"
