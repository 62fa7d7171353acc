"""`parloop study`: the grid, the recommendation rule, and the `--quick` preset end to end (with resuming)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from parloop.cli import main
from parloop.eval.programs import is_held_out, load_programs
from parloop.study.analysis import paired_difference, recommend
from parloop.study.grid import PRESETS, Cell, grid
from parloop.study.run import recipe_for
from parloop.train.corpus import Corpus
from parloop.train.errors import RecipeError


def test_grid_trains_r1_once_and_every_other_cell_per_mode() -> None:
    cells = grid([3, 1, 2, 2], ["parallel", "sequential_shared"])
    assert [c.name for c in cells] == ["r1", "parallel-r2", "sequential_shared-r2", "parallel-r3",
                                       "sequential_shared-r3"]
    assert cells[0].modes == ("parallel", "sequential_shared")


def test_paired_difference_and_its_standard_error() -> None:
    a = {"bits": [10.0, 20.0, 30.0], "bytes": [10, 20, 30]}
    assert paired_difference(a, a) == (0.0, 0.0)
    # b costs 0.1 bit more on every byte of every file: the difference is exact, with no spread
    b = {"bits": [11.0, 22.0, 33.0], "bytes": [10, 20, 30]}
    diff, se = paired_difference(b, a)
    assert diff == pytest.approx(0.1) and se == pytest.approx(0.0, abs=1e-12)
    c = {"bits": [11.0, 20.0, 30.0], "bytes": [10, 20, 30]}  # all of the gain on one file
    diff, se = paired_difference(c, a)
    assert diff == pytest.approx(1 / 60) and se > 0.005


def _row(loops: int, per_file_bits: list[float]) -> dict:
    files = {"bits": per_file_bits, "bytes": [100] * len(per_file_bits)}
    return {"loops": loops, "evaluation": {"test_bpb": sum(per_file_bits) / (100 * len(per_file_bits)),
                                           "test_files": files}}


def test_recommendation_prefers_fewer_loops_only_when_the_difference_is_not_measurable() -> None:
    noisy = {1: _row(1, [101.0, 99.0, 104.0, 96.0]), 2: _row(2, [100.0, 100.0, 100.0, 99.0]),
             3: _row(3, [130.0, 131.0, 129.0, 130.0])}
    rec = recommend({"parallel": noisy}, {})
    assert rec["best_test_bpb_loops"] == 2 and rec["loops"] == 1  # R = 1 is within noise of R = 2
    clear = {1: _row(1, [110.0, 111.0, 109.0, 110.0]), 2: noisy[2], 3: noisy[3]}
    rec = recommend({"parallel": clear}, {})
    assert rec["loops"] == 2 and "R = 2 has the lowest test bits per byte" in rec["reason"]


def test_the_study_sets_loops_and_mode_itself(tmp_path: Path) -> None:
    cell = Cell("parallel-r2", 2, "parallel", ("parallel",))
    recipe = recipe_for(cell, PRESETS["quick"], tmp_path, ["model.num_hidden_layers=2"])
    assert recipe.model["plt_num_loops"] == 2 and recipe.model["num_hidden_layers"] == 2
    assert recipe.train.max_steps * recipe.train.batch_size * recipe.train.seq_len <= PRESETS["quick"].budget
    with pytest.raises(RecipeError, match="plt_num_loops"):
        recipe_for(cell, PRESETS["quick"], tmp_path, ["model.plt_num_loops=3"])


def test_quick_study_end_to_end_and_resumed(tmp_path: Path) -> None:
    out = tmp_path / "study"
    assert main(["study", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    models = {m["name"]: m for m in results["models"]}
    assert set(models) == {"r1"} | {f"{mode}-r{r}" for mode in ("parallel", "sequential_shared") for r in range(2, 6)}

    # matched models: the same token budget and data, the size differs only by the G-SWA gates
    assert len({m["training"]["tokens"] for m in models.values()}) == 1
    for name, m in models.items():
        ev = m["evaluation"]
        for key in ("val_bpb", "test_bpb"):
            assert 0 < ev[key] < 12
        for key in ("code_reasoning", "line_completion", "humaneval"):
            assert 0 <= ev[key] <= 1
        if m["loops"] >= 2:
            d = ev["diagnostics"]
            assert len(d["logit_lens_loss"]) == m["loops"] and len(d["relative_update"]) == m["loops"] - 1
            assert len(d["gate_mean"]) == 1 and len(d["attention_js"][0]) == m["loops"] - 1
        else:
            assert "diagnostics" not in ev, name
    # R = 1 is one model in both modes, so the offset costs nothing there
    assert all(v == 0 for v in results["offset_cost"]["1"].values())
    assert results["recommendation"]["loops"] in range(1, 6)

    report = (out / "report.md").read_text()
    assert "| R | val bits/byte | test bits/byte | code reasoning | line completion | HumanEval pass@1" in report
    assert f"**R = {results['recommendation']['loops']}.**" in report
    for png in ("evaluations.png", "diagnostics.png", "offset_cost.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in report

    # held-out programs are not in the training mix, which only adds to the train split
    held_out = load_programs(out / "programs" / "test.jsonl")
    training = load_programs(out / "programs" / "train.jsonl")
    assert all(is_held_out(p.source) for p in held_out) and not any(is_held_out(p.source) for p in training)
    base, mix = Corpus(out / "corpus" / "base"), Corpus(out / "corpus" / "mix")
    for split in ("val", "test"):
        assert np.array_equal(base.tokens(split), mix.tokens(split))
    assert len(mix.tokens("train")) > len(base.tokens("train"))
    assert np.array_equal(mix.tokens("train")[:len(base.tokens("train"))], base.tokens("train"))

    # Resuming: finished models and evaluations are kept as they are; a model whose run is gone is trained again
    # and, the training being deterministic, gives the same numbers.
    kept = out / "models" / "parallel-r3" / "evaluation.json"
    kept_time = kept.stat().st_mtime_ns
    redo = out / "models" / "r1"
    for name in ("final_metrics.json", "evaluation.json"):
        (redo / name).unlink()
    assert main(["study", "--quick", "--out", str(out)]) == 0
    assert kept.stat().st_mtime_ns == kept_time
    again = {m["name"]: m for m in json.loads((out / "results.json").read_text())["models"]}
    assert again["r1"]["evaluation"]["test_bpb"] == pytest.approx(models["r1"]["evaluation"]["test_bpb"], rel=1e-6)
