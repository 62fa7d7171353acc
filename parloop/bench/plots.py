"""PNG plots of a bench sweep: decode latency against loops, and KV-cache bytes against context.

Figures are drawn with matplotlib's object API (no pyplot), so plotting needs no GUI backend and leaves no global
figure state behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

# one look per mode in every plot; sequential_shared dashed, since its KV line lies on top of parallel's
MODE_STYLE = {"parallel": dict(color="C0", marker="o"), "sequential_shared": dict(color="C1", marker="s", ls="--"),
              "sequential": dict(color="C2", marker="^")}


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _latency_plot(result: dict[str, Any], modes: list[str], path: Path) -> Path | None:
    """Decode latency vs loops per mode, a panel per batch with at least 2 loop counts, at the main context."""
    rows, options, ref = result["rows"], result["options"], result["reference"]
    at_context = [r for r in rows if r["context"] == options["context"]]
    batches = sorted({r["batch"] for r in at_context
                      if len({q["loops"] for q in at_context if q["batch"] == r["batch"]}) >= 2})
    if not batches:
        return None
    fig = Figure(figsize=(5 * len(batches), 4))
    axes = fig.subplots(1, len(batches), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for mode in modes:
            pts = sorted((r["loops"], r["decode_ms_per_token"]) for r in at_context
                         if r["batch"] == batch and r["mode"] == mode)
            ax.plot(*zip(*pts, strict=True), label=mode, **MODE_STYLE[mode])
        if (ref["batch"], ref["context"]) == (batch, options["context"]):
            ax.axhline(ref["decode_ms_per_token"], color="grey", ls=":", label="transformers Llama")
        ax.set(title=f"batch {batch}, context {options['context']}", xlabel="loops R",
               ylabel="decode ms / token (median)")
        ax.set_xticks(sorted({r["loops"] for r in at_context if r["batch"] == batch}))
        ax.set_ylim(bottom=0)
        ax.legend()
    return _save(fig, path)


def _kv_plot(result: dict[str, Any], modes: list[str], path: Path) -> Path | None:
    """KV bytes vs context per mode at the largest R (and R = 1), at the main batch; needs 2 contexts."""
    options = result["options"]
    at_batch = [r for r in result["rows"] if r["batch"] == options["batch"]]
    contexts = sorted({r["context"] for r in at_batch})
    if len(contexts) < 2:
        return None
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    top = max(r["loops"] for r in at_batch)
    r1 = sorted((r["context"], r["kv_cache_bytes"] / 2**20) for r in at_batch
                if r["loops"] == 1 and r["mode"] == at_batch[0]["mode"])
    if len(r1) >= 2:
        ax.plot(*zip(*r1, strict=True), color="black", marker=".", label="R=1 (every mode)")
    for mode in modes if top > 1 else []:
        pts = sorted((r["context"], r["kv_cache_bytes"] / 2**20) for r in at_batch
                     if r["mode"] == mode and r["loops"] == top)
        if len(pts) >= 2:
            ax.plot(*zip(*pts, strict=True), label=f"{mode} R={top}", **MODE_STYLE[mode])
    ax.set(title=f"KV cache after prefill + decode, batch {options['batch']}, window {options['window']}",
           xlabel="context tokens", ylabel="MiB", xscale="log", yscale="log")
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.minorticks_off()
    ax.legend()
    return _save(fig, path)


def write_plots(result: dict[str, Any], plot_dir: Path) -> list[Path]:
    """PNG plots of what the rows vary: decode latency vs loops per mode (a panel per batch, at the main context)
    and KV bytes vs context per mode (at the main batch). A plot whose x axis has fewer than 2 values is skipped."""
    modes = [m for m in result["options"]["modes"] if any(r["mode"] == m for r in result["rows"])]
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = [_latency_plot(result, modes, plot_dir / "decode_latency_vs_loops.png"),
               _kv_plot(result, modes, plot_dir / "kv_bytes_vs_context.png")]
    return [path for path in written if path is not None]
