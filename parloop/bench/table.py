"""A bench result as the text table `parloop bench` prints: a row per measurement, then the model, the reference
and the machine."""

from __future__ import annotations

from typing import Any

from parloop.bench.layouts import summary

# (title, row key, format) per column
COLUMNS = [("mode", "mode", "{}"), ("R", "loops", "{}"), ("batch", "batch", "{}"), ("context", "context", "{}"),
           ("decode ms/tok", "decode_ms_per_token", "{:.2f}"), ("x R=1", "ratio_to_r1", "{:.2f}"),
           ("prefill ms", "prefill_ms", "{:.1f}"), ("KV bytes", "kv_cache_bytes", "{:,}"),
           ("= formula", "kv_cache_bytes_formula", "{}"), ("GB/s", "achieved_gbs", "{:.1f}"),
           ("% bw", "achieved_bandwidth_pct", "{:.1f}")]
# columns shown only when some row has a value for them
OPTIONAL_COLUMNS = [("spread %", "order_spread_pct", "{:.1f}"), ("CPU layouts", "cpu_layouts", "{}"),
                    ("switches", "cpu_layout_switches", "{}")]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if key == "kv_cache_bytes_formula":
        value = "yes" if value == row["kv_cache_bytes"] else f"NO ({value:,})"
    elif key == "cpu_layouts":
        value = summary(value)
    return "-" if value is None else fmt.format(value)


def _aligned(cells: list[list[str]]) -> list[str]:
    """Cells as lines: the first column left-aligned, the others right-aligned, a rule under the titles."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
             for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _model_line(result: dict[str, Any]) -> str:
    m, options = result["model"], result["options"]
    return (f"model: preset {m['preset']}, {m['params_r1'] / 1e6:.1f}M parameters at R=1, hidden "
            f"{m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']} heads / "
            f"{m['num_key_value_heads']} KV heads, window {m['window']}, {m['dtype']}; decode = median of "
            f"{options['new_tokens']} steps after {options['warmup']} warm-up steps")


def _reference_line(ref: dict[str, Any]) -> str:
    r1_ratio = "-" if ref["r1_over_reference"] is None else f"{ref['r1_over_reference']:.2f}"
    return (f"reference: transformers LlamaForCausalLM, same weights as R=1, {ref['cache']} cache (batch "
            f"{ref['batch']}, context "
            f"{ref['context']}): {ref['decode_ms_per_token']:.2f} ms/tok by the same forward loop "
            f"({ref['achieved_bandwidth_pct']:.1f} % bw), {ref['generate_ms_per_token']:.2f} ms/tok through "
            f"generate; R=1 / reference = {r1_ratio} (forward loop), "
            f"{ref['r1_over_reference_generate']:.2f} (generate, R=1 at "
            f"{ref['plt_r1_generate_ms_per_token']:.2f} ms/tok)")


def _machine_line(mach: dict[str, Any]) -> str:
    load = "" if mach.get("load") is None else (f", load average {mach['load'][0]:.2f} before / "
                                               f"{mach['load_after'][0]:.2f} after")
    compiled = ", decode compiled (CUDA graphs on a GPU)" if mach.get("compiled") else ""
    return (f"machine: {mach['device']} ({mach['device_name']}), {mach['threads']} threads, torch "
            f"{mach['torch_version']}, memory bandwidth {mach['memory_bandwidth_gbs']:.1f} GB/s (tensor copy)"
            f"{load}{compiled}")


def format_table(result: dict[str, Any]) -> str:
    """The rows as an aligned text table, with the model, the reference and the machine below."""
    rows = result["rows"]
    columns = COLUMNS + [c for c in OPTIONAL_COLUMNS if any(row.get(c[1]) is not None for row in rows)]
    cells = [[title for title, _, _ in columns]]
    cells += [[_cell(row, key, fmt) for _, key, fmt in columns] for row in rows]
    lines = [_model_line(result), *_aligned(cells), _reference_line(result["reference"]),
             _machine_line(result["machine"])]
    return "\n".join(lines)
