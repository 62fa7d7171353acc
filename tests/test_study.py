"""`parloop study`: the grid, the intervals, the recommendation rule, and the `--quick` preset end to end (with two
seeds, two scales, the learning-rate sweep, and resuming)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from parloop.cli import main
from parloop.eval.programs import is_held_out, load_programs
from parloop.study.analysis import cost, group_models, paired_difference
from parloop.study.grid import PRESETS, Cell, Run, grid
from parloop.study.recommend import recommend
from parloop.study.report import sweep_table
from parloop.study.run import recipe_for
from parloop.study.stats import mean_interval, t_quantile
from parloop.study.sweep import choose_learning_rates
from parloop.train.corpus import Corpus
from parloop.train.errors import RecipeError


def test_grid_trains_r1_once_and_every_other_cell_per_mode() -> None:
    cells = grid([3, 1, 2, 2], ["parallel", "sequential_shared"], compute_matched=False)
    assert [c.name for c in cells] == ["r1", "parallel-r2", "sequential_shared-r2", "parallel-r3",
                                       "sequential_shared-r3"]
    assert cells[0].modes == ("parallel", "sequential_shared")
    # the compute-matched baselines: R = 1 with R x the layers, one per R >= 2
    matched = {c.name: c for c in grid([1, 2, 3], ["parallel", "sequential"])}
    assert list(matched) == ["r1", "r1-x2layers", "parallel-r2", "sequential-r2", "r1-x3layers", "parallel-r3",
                             "sequential-r3"]
    assert (matched["r1-x3layers"].loops, matched["r1-x3layers"].depth) == (1, 3)


def test_t_quantiles_and_intervals_match_the_textbook() -> None:
    # Student's t table, two-sided 95 %
    for df, t in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423), (1000, 1.9623)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    i = mean_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3: half-width t(0.975, 2) / sqrt(3)
    assert (i.mean, i.n) == (2.0, 3) and i.half_width == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert i.low == pytest.approx(2 - 2.4842, abs=1e-4) and not i.excludes_zero
    assert mean_interval([5.0, 5.0]).half_width == 0.0 and mean_interval([5.0, 5.0]).excludes_zero
    one = mean_interval([0.3])
    assert one.n == 1 and math.isnan(one.half_width) and not one.excludes_zero


def _model(name: str, loops: int, seed: int, test_bpb: float, scale: str = "s") -> dict:
    files = {"bits": [test_bpb * 100, test_bpb * 300], "bytes": [100, 300]}
    return {"name": name, "scale": scale, "seed": seed, "loops": loops, "depth": 1,
            "training": {"parameters": 1000, "tokens": 5000},
            "evaluation": {"test_bpb": test_bpb, "val_bpb": test_bpb, "test_files": files}}


def test_paired_cost_is_the_mean_of_the_per_seed_differences() -> None:
    a = {s: _model("parallel-r2", 2, s, v) for s, v in enumerate([1.0, 1.2, 1.1])}
    b = {s: _model("r1", 1, s, v) for s, v in enumerate([0.9, 1.0, 1.0])}
    # per-seed differences 0.1, 0.2, 0.1: mean 0.1333, sd 0.0577, half-width 4.3027 * 0.0577 / sqrt(3)
    c = cost(a, b, "test_bpb", higher=False)
    assert c.mean == pytest.approx(0.4 / 3) and c.half_width == pytest.approx(0.14343, abs=1e-4)
    assert c.excludes_zero is False
    flipped = cost(a, b, "test_bpb", higher=True)  # for an accuracy, higher a is better: the cost changes sign
    assert flipped.mean == pytest.approx(-0.4 / 3)
    assert cost(a, {5: b[0]}, "test_bpb", higher=False) is None  # no seed in common


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


def _groups(per_r: dict[int, list[float]]) -> dict:
    names = {1: "r1"} | {r: f"parallel-r{r}" for r in per_r if r > 1}
    return group_models([_model(names[r], r, s, v) for r, values in per_r.items() for s, v in enumerate(values)])


def test_recommendation_prefers_fewer_loops_only_when_the_seeds_can_tell_them_apart() -> None:
    # R = 2 is lower on average, but R = 1 - R = 2 varies in sign over the seeds: not measurable
    noisy = recommend(_groups({1: [2.00, 2.10, 1.90], 2: [2.05, 1.95, 1.92], 3: [2.30, 2.31, 2.29]}))
    assert noisy["per_scale"]["s"]["best"] == 2 and noisy["loops"] == 1
    assert "not measurably worse" in noisy["reason"]
    # R = 2 lower than R = 1 by about 0.1 with every seed: measurable, so R = 2
    clear = recommend(_groups({1: [2.10, 2.21, 2.00], 2: [2.00, 2.10, 1.91], 3: [2.30, 2.31, 2.29]}))
    assert clear["loops"] == 2 and clear["per_scale"]["s"]["differences"]["1"]["low"] > 0
    # one seed: no interval, so no verdict
    single = recommend(_groups({1: [2.1], 2: [2.0]}))
    assert single["loops"] is None and "No verdict" in single["reason"]


def test_a_sweep_that_chooses_an_end_of_its_range_says_so() -> None:
    cells = grid([1, 2], ["parallel"], compute_matched=False)
    scale, quick = PRESETS["default"].scales[0], PRESETS["default"]
    bpb = {"r1": {0.5: 2.7, 1.0: 2.6, 2.0: 2.5}, "parallel-r2": {0.5: 2.7, 1.0: 2.5, 2.0: 2.6}}
    val_bpb = {Run(c, scale, quick.sweep_seed, m): bpb[c.name][m] for c in cells for m in quick.lr_multipliers}
    chosen = choose_learning_rates(cells, quick, val_bpb)
    assert (chosen["r1"]["multiplier"], chosen["r1"]["edge"]) == (2.0, "largest")
    assert (chosen["parallel-r2"]["multiplier"], chosen["parallel-r2"]["edge"]) == (1.0, None)
    table = sweep_table(chosen)
    assert "| x 2 (edge) |" in table and "| x 1 |" in table
    assert "r1 (the largest, x 2)" in table and "parallel-r2 (" not in table
    smallest = {Run(cells[0], scale, quick.sweep_seed, m): bpb for m, bpb in ((0.5, 2.4), (1.0, 2.6), (2.0, 2.7))}
    assert choose_learning_rates(cells[:1], quick, smallest)["r1"]["edge"] == "smallest"
    two = {run: bpb for run, bpb in smallest.items() if run.lr_multiplier < 2}  # two points bracket nothing
    assert choose_learning_rates(cells[:1], quick, two)["r1"]["edge"] is None
    assert choose_learning_rates(cells[:1], quick, {})["r1"] == {"multiplier": 1.0, "val_bpb": {}, "edge": None}


def test_the_study_sets_loops_mode_depth_seed_and_learning_rate_itself(tmp_path: Path) -> None:
    quick = PRESETS["quick"]
    cell = Cell("r1-x2layers", 1, "parallel", ("parallel",), depth=2)
    recipe = recipe_for(Run(cell, quick.scales[0], seed=7, lr_multiplier=2.0), quick, tmp_path,
                        ["model.hidden_size=16", "train.lr=1e-3"])
    assert recipe.model["num_hidden_layers"] == 2 * quick.scales[0].model["num_hidden_layers"]
    assert recipe.model["hidden_size"] == 16 and recipe.model["plt_normalize_per_loop"] is True
    assert recipe.train.seed == 7 and recipe.train.lr == pytest.approx(2e-3)  # the multiplier scales --set's lr
    assert recipe.train.max_steps * recipe.train.batch_size * recipe.train.seq_len <= quick.scales[0].budget
    for override in ("model.plt_num_loops=3", "train.seed=1", "model.num_hidden_layers=5"):
        with pytest.raises(RecipeError, match=override.split("=")[0]):
            recipe_for(Run(cell, quick.scales[0], 0), quick, tmp_path, [override])


def test_quick_study_with_two_seeds_end_to_end_and_resumed(tmp_path: Path) -> None:
    out = tmp_path / "study"
    assert main(["study", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    cells = {"r1", "r1-x2layers"} | {f"{mode}-r2" for mode in ("parallel", "sequential_shared", "sequential")}
    models = {(m["scale"], m["name"], m["seed"]): m for m in results["models"]}
    assert set(models) == {(s, c, seed) for s in ("xs", "s") for c in cells for seed in (0, 1)}

    # matched models: the same token budget per scale; the seed is recorded, and two seeds are two models
    for scale in ("xs", "s"):
        assert len({m["training"]["tokens"] for (s, _, _), m in models.items() if s == scale}) == 1
    assert models["s", "r1-x2layers", 0]["layers"] == 2 * models["s", "r1", 0]["layers"]
    assert models["s", "sequential-r2", 0]["training"]["parameters"] == models["s", "r1", 0]["training"]["parameters"]
    weights = [load_file(out / "models" / "xs" / "r1" / f"seed{seed}" / "model" / "model.safetensors")
               for seed in (0, 1)]
    assert any(not np.array_equal(weights[0][k].numpy(), weights[1][k].numpy()) for k in weights[0])
    recipes = [yaml.safe_load((out / "models" / "xs" / "r1" / f"seed{seed}" / "recipe.yaml").read_text())
               for seed in (0, 1)]
    assert [r["train"]["seed"] for r in recipes] == [0, 1]
    for m in models.values():
        ev = m["evaluation"]
        assert 0 < ev["test_bpb"] < 12 and all(0 <= ev[k] <= 1 for k in ("code_reasoning", "line_completion"))
        assert ("diagnostics" in ev) == (m["loops"] >= 2)

    # the learning-rate sweep chose one of its multipliers per cell, and every seed of a cell trains at that rate
    for name, chosen in results["lr_sweep"].items():
        assert chosen["multiplier"] in PRESETS["quick"].lr_multipliers and len(chosen["val_bpb"]) == 2
        assert len({m["lr"] for (_, c, _), m in models.items() if c == name}) == 1
    # every difference is a mean over the two seeds with an interval around it
    gap = results["comparisons"]["s"]["parallel-r2"]["R = 1"]["test_bpb"]
    per_seed = [models["s", "parallel-r2", s]["evaluation"]["test_bpb"] - models["s", "r1", s]["evaluation"]["test_bpb"]
                for s in (0, 1)]
    assert gap["n"] == 2 and gap["mean"] == pytest.approx(np.mean(per_seed))
    assert gap["low"] <= gap["mean"] <= gap["high"]
    assert [p["scale"] for p in results["gap_vs_scale"]["2"]] == ["xs", "s"]
    assert results["offset_cost"]["s"]["2"]["test_bpb"]["n"] == 2
    assert results["recommendation"]["loops"] in (1, 2) and results["recommendation"]["scale"] == "s"

    report = (out / "report.md").read_text()
    assert "| model | val bits/byte | test bits/byte | code reasoning | line completion | HumanEval pass@1" in report
    assert f"**R = {results['recommendation']['loops']}.**" in report
    for png in ("evaluations.png", "gap_vs_scale.png", "offset_cost.png", "diagnostics.png"):
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
    kept = out / "models" / "s" / "parallel-r2" / "seed1" / "evaluation.json"
    kept_time = kept.stat().st_mtime_ns
    redo = out / "models" / "xs" / "r1" / "seed0"
    for name in ("final_metrics.json", "evaluation.json"):
        (redo / name).unlink()
    assert main(["study", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    assert kept.stat().st_mtime_ns == kept_time
    again = {(m["scale"], m["name"], m["seed"]): m for m in json.loads((out / "results.json").read_text())["models"]}
    assert again["xs", "r1", 0]["evaluation"]["test_bpb"] == pytest.approx(
        models["xs", "r1", 0]["evaluation"]["test_bpb"], rel=1e-6)
