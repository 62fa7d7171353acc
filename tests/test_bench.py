"""`parloop bench` on a tiny model: the JSON it writes, the KV bytes against docs/design.md §3, the sweep's grid
and plots, the shared weights of every row and the reference, and its errors. No timing is asserted."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from transformers import DynamicCache, StaticCache

from parloop.bench.layouts import switch_count
from parloop.bench.models import CompiledDecode, build_plt, build_reference, plt_config
from parloop.bench.options import PRESETS, BenchOptions
from parloop.bench.timing import time_decode
from parloop.cli import main
from parloop.kernels import CANDIDATES

TINY = ["bench", "--preset", "tiny", "--new-tokens", "3", "--warmup", "1", "--bandwidth-mb", "4", "--no-progress",
        "--threads", "1"]  # the default measures idle cores for a second and would change the tests' threads
ROW_FIELDS = {"mode", "loops", "batch", "context", "new_tokens", "params", "decode_ms_per_token", "prefill_ms",
              "kv_cache_bytes", "kv_cache_bytes_formula", "ratio_to_r1", "bytes_per_step", "achieved_gbs",
              "achieved_bandwidth_pct"}


def design_kv_bytes(model: dict, mode: str, loops: int, batch: int, length: int, window: int) -> int:
    """docs/design.md §3, per sequence and layer: `2*n_kv*hd*s*(T + (R-1)*min(T, W+1))`, or `2*n_kv*hd*s*R*T`
    in `sequential` mode; fp32 here."""
    per_slot = 2 * model["num_key_value_heads"] * model["head_dim"] * 4
    slots = loops * length if mode == "sequential" else length + (loops - 1) * min(length, window + 1)
    return model["num_hidden_layers"] * batch * per_slot * slots


def bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    assert main([*TINY, *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_rows_fields_ratios_and_kv_bytes(tmp_path, capsys):
    result = bench(tmp_path, "--loops", "1", "2", "3", "--batch", "2", "--context", "20", "--window", "4")
    rows, model = result["rows"], result["model"]
    modes = ("parallel", "sequential_shared", "sequential")
    assert sorted((r["mode"], r["loops"]) for r in rows) == sorted((m, r) for m in modes for r in (1, 2, 3))
    length = 20 + 1 + 3  # context + warm-up + timed steps
    for row in rows:
        assert row.keys() >= ROW_FIELDS
        assert (row["batch"], row["context"], row["new_tokens"]) == (2, 20, 3)
        expected = design_kv_bytes(model, row["mode"], row["loops"], 2, length, 4)
        assert row["kv_cache_bytes"] == expected == row["kv_cache_bytes_formula"], row
        assert row["decode_ms_per_token"] > 0 and row["prefill_ms"] > 0 and row["achieved_bandwidth_pct"] > 0
        assert row["ratio_to_r1"] > 0

    by = {(r["mode"], r["loops"]): r for r in rows}
    assert by["parallel", 1]["ratio_to_r1"] == 1.0
    # the window (5 slots) is shorter than the text, so parallel R=3 stores 2 windows, sequential 3 full caches
    assert by["parallel", 3]["kv_cache_bytes"] < by["sequential", 3]["kv_cache_bytes"]

    # one set of weights: R = 1 and `sequential` have no gates; the G-SWA modes add a [H, hd] weight and [H] bias
    params = model["params_r1"]
    gates = model["num_hidden_layers"] * model["num_attention_heads"] * (model["head_dim"] + 1)
    for (mode, loops), row in by.items():
        assert row["params"] == params + (gates if loops > 1 and mode != "sequential" else 0)

    # bytes a parallel step reads: all weights once (lm_head = the tied embedding), the new tokens' embedding
    # rows, and the KV of loop 0 plus the windows at the timed steps' middle length
    mid = 20 + 1 + 2
    kv_read = design_kv_bytes(model, "parallel", 3, 2, mid, 4)
    assert by["parallel", 3]["bytes_per_step"] == 4 * (params + gates) + 2 * model["hidden_size"] * 4 + kv_read
    # the sequential modes read the layers once per loop
    assert by["sequential_shared", 3]["bytes_per_step"] > by["parallel", 3]["bytes_per_step"]
    assert by["sequential", 1]["bytes_per_step"] == by["parallel", 1]["bytes_per_step"]

    ref, machine = result["reference"], result["machine"]
    assert ref["params"] == params and ref["decode_ms_per_token"] > 0 and ref["generate_ms_per_token"] > 0
    assert ref["r1_over_reference"] > 0 and ref["r1_over_reference_generate"] > 0
    assert machine["memory_bandwidth_gbs"] > 0 and machine["threads"] >= 1
    assert machine["torch_version"] == torch.__version__ and machine["device"] == "cpu"

    table = capsys.readouterr().out
    assert "decode ms/tok" in table and "transformers LlamaForCausalLM" in table
    assert sum(line.startswith(modes) for line in table.splitlines()) == len(rows)
    assert "NO (" not in table


def test_kv_bytes_when_window_exceeds_text(tmp_path):
    result = bench(tmp_path, "--loops", "2", "4", "--modes", "parallel", "sequential", "--context", "5",
                   "--window", "64")
    for row in result["rows"]:
        expected = design_kv_bytes(result["model"], row["mode"], row["loops"], 1, 5 + 1 + 3, 64)
        assert row["kv_cache_bytes"] == expected, row
        assert row["ratio_to_r1"] is None  # no R = 1 row was asked for


def test_sweep_grid_and_plots(tmp_path):
    plots = tmp_path / "plots"
    result = bench(tmp_path, "--sweep", "--sweep-loops", "1", "2", "--sweep-batches", "1", "2",
                   "--sweep-contexts", "8", "16", "--context", "8", "--modes", "parallel", "sequential",
                   "--plot-dir", str(plots))
    got = [(r["mode"], r["loops"], r["batch"], r["context"]) for r in result["rows"]]
    points = {(r, b, 8) for r in (1, 2) for b in (1, 2)} | {(r, 1, c) for r in (1, 2) for c in (8, 16)}
    assert sorted(got) == sorted((m, *p) for m in ("parallel", "sequential") for p in points)
    for name in ("decode_latency_vs_loops.png", "kv_bytes_vs_context.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_rows_and_the_reference_share_the_r1_weights():
    shape = PRESETS["tiny"]
    base = build_plt(plt_config(shape, 1, "parallel", 4, 64), None, seed=0)
    state = {k: v for k, v in base.state_dict().items() if ".plt_gate." not in k}  # R = 1's gate is unused
    par = build_plt(plt_config(shape, 2, "parallel", 4, 64), state, seed=0).state_dict()
    shared = build_plt(plt_config(shape, 2, "sequential_shared", 4, 64), state, seed=0).state_dict()
    seq = build_plt(plt_config(shape, 2, "sequential", 4, 64), state, seed=0).state_dict()
    assert par.keys() == shared.keys() and all(torch.equal(par[k], shared[k]) for k in par)
    assert seq.keys() == state.keys() and all(torch.equal(seq[k], state[k]) for k in state)
    assert all(torch.equal(par[k], state[k]) for k in state)

    llama = build_reference(base.config, state)
    ids = torch.randint(shape["vocab_size"], (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-5)


def test_repeat_reversed_measures_every_row_again_and_reports_the_spread(tmp_path, capsys):
    once = bench(tmp_path, "--loops", "1", "2", "--modes", "parallel", "--context", "8")
    assert all("order_spread_pct" not in row for row in once["rows"])
    assert "spread %" not in capsys.readouterr().out
    twice = bench(tmp_path, "--loops", "1", "2", "--modes", "parallel", "--context", "8", "--repeat-reversed")
    assert [r["loops"] for r in twice["rows"]] == [1, 2]  # one row per measurement point, not two
    for row in twice["rows"]:
        first, second = row["decode_ms_per_token"], row["decode_ms_reversed"]
        assert second > 0
        assert row["order_spread_pct"] == pytest.approx(100 * abs(first - second) / min(first, second), rel=1e-3)
    assert "spread %" in capsys.readouterr().out


def test_rows_report_the_cpu_layouts_their_decode_step_used(tmp_path, capsys):
    # enough steps for the autotuner to choose for every product (4 timed trials per candidate layout)
    result = bench(tmp_path, "--loops", "1", "2", "--modes", "parallel", "sequential", "--context", "8",
                   "--new-tokens", "12")
    chosen = result["machine"]["cpu_few_row_layouts"]
    by = {(r["mode"], r["loops"]): r["cpu_layouts"] for r in result["rows"]}
    for layouts in by.values():
        assert layouts and layouts.items() <= chosen.items()
        assert set(layouts.values()) <= CANDIDATES.keys()
    # a parallel R=2 step stacks the 2 loop streams into 2-row products; a sequential step has 1 row per product
    assert any("rows=2" in key for key in by["parallel", 2])
    assert all("rows=1" in key for key in by["sequential", 2])
    assert "CPU layouts" in capsys.readouterr().out
    # the autotuner re-checks its choices while rows are timed; each row says how often it changed one
    assert all(isinstance(r["cpu_layout_switches"], int) for r in result["rows"])
    assert sum(r["cpu_layout_switches"] for r in result["rows"]) <= switch_count()  # none that did not happen
    assert len(result["machine"]["load"]) == 3


def test_compile_is_the_default_on_cuda_only():
    assert BenchOptions().compiled_on(torch.device("cuda")) and not BenchOptions().compiled_on(torch.device("cpu"))
    assert BenchOptions(compile=True).compiled_on(torch.device("cpu"))
    assert not BenchOptions(compile=False).compiled_on(torch.device("cuda"))


def test_compiled_reference_decodes_one_token_steps_through_its_compiled_call():
    shape = PRESETS["tiny"]
    base = build_plt(plt_config(shape, 1, "parallel", 4, 64), None, seed=0)
    llama = build_reference(base.config, base.state_dict())
    stepper = CompiledDecode(llama)
    lengths = []

    def compiled(input_ids, **kwargs):  # stands in for the torch.compile'd call (no compiling in a unit test)
        lengths.append(input_ids.shape[1])
        return llama(input_ids=input_ids, **kwargs)

    stepper.compiled = compiled
    prompt = torch.randint(shape["vocab_size"], (2, 10))
    static = time_decode(stepper, partial(StaticCache, config=llama.config, max_cache_len=24), prompt, 2, 3)
    dynamic = time_decode(llama, partial(DynamicCache, config=llama.config), prompt, 2, 3)
    assert lengths == [1] * (1 + 2 + 3)  # the throwaway run's step, then warm-up and timed steps; prefills eager
    assert static.cache.get_seq_length() == dynamic.cache.get_seq_length() == 10 + 2 + 3
    torch.testing.assert_close(static.cache.layers[0].keys[:, :, :15], dynamic.cache.layers[0].keys)


def test_compiled_rows_use_static_caches_and_the_static_reference(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the plumbing, not Inductor: run eager
    result = bench(tmp_path, "--loops", "1", "2", "--modes", "parallel", "sequential_shared", "--context", "8",
                   "--compile")
    assert result["machine"]["compiled"] and result["reference"]["cache"] == "static, compiled"
    for row in result["rows"]:
        assert row["cpu_layouts"] is None and row["decode_ms_per_token"] > 0
        assert row["kv_cache_bytes"] == row["kv_cache_bytes_formula"]
    assert "static, compiled cache" in capsys.readouterr().out


def test_errors_say_what_to_change(capsys):
    assert main([*TINY, "--warmup", "-1"]) == 2
    assert "warmup and window must be >= 0" in capsys.readouterr().err
    assert main([*TINY, "--heads", "3"]) == 2  # 3 heads cannot share the preset's 2 KV heads
    assert "num_key_value_heads" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*TINY, "--loops", "0"])
    assert "must be an integer >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*TINY, "--device", "cuda"]) == 2
        assert "--device cpu" in capsys.readouterr().err
