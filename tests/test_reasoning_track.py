"""`parloop study --track reasoning`: the decision rules on made-up records, and `--quick` end to end (results.json
records task, difficulty, seed and accuracy per model; a second run resumes without training)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from parloop.cli import main
from parloop.study.command import add_arguments as add_study_arguments
from parloop.study.reasoning_analysis import (
    choose_multipliers,
    depth_hungry,
    group,
    loops_present,
    offset_and_filler,
    recommend,
    sweep_key,
    variants,
    verdict,
)
from parloop.study.reasoning_command import reasoning_preset
from parloop.study.reasoning_grid import REASONING_PRESETS, filler_cells, loop_cells


def _rec(name: str, seed: int, acc: float, loops: int = 1) -> dict:
    return {"point": "phop-1/L1", "name": name, "seed": seed, "loops": loops, "evaluation": {"accuracy": acc}}


def _cells(accuracies: dict[str, list[float]]) -> dict:
    records = [_rec(n, s, a, 1 if n.startswith("r1") else int(n.split("-r")[1][0]))
               for n, accs in accuracies.items() for s, a in enumerate(accs)]
    return group(records)["phop-1/L1"]


def test_depth_check_needs_an_interval_above_zero() -> None:
    assert depth_hungry(_cells({"r1": [0.5, 0.52, 0.49], "r1-x2layers": [0.8, 0.83, 0.79]}))[0]
    # a large mean gain whose seeds disagree is not enough
    hungry, diff = depth_hungry(_cells({"r1": [0.5, 0.5, 0.5], "r1-x2layers": [0.9, 0.45, 0.95]}))
    assert not hungry and diff.mean > 0 and diff.low < 0
    assert not depth_hungry(_cells({"r1": [0.8, 0.8, 0.8], "r1-x2layers": [0.6, 0.61, 0.59]}))[0]


def test_recommendation_is_the_smallest_r_not_measurably_below_the_best() -> None:
    cells = _cells({"r1": [0.5, 0.52, 0.51], "parallel-r2": [0.9, 0.91, 0.9], "parallel-r3": [0.91, 0.9, 0.92],
                    "parallel-r4": [0.7, 0.72, 0.71]})
    rec = recommend(cells)
    assert (rec["best"], rec["loops"]) == (3, 2) and "parallel-r3 minus r1" in rec["reason"]
    assert verdict({"a": rec, "b": {"loops": 4}, "c": {"loops": 2}}) == 2
    assert verdict({"a": {"loops": 4}, "b": {"loops": 2}}) == 2 and verdict({}) is None


def test_offset_cost_and_filler_comparisons_are_paired() -> None:
    cells = _cells({"parallel-r2": [0.6, 0.62, 0.61], "sequential_shared-r2": [0.8, 0.8, 0.81],
                    "parallel-r2-fill1": [0.79, 0.81, 0.8], "sequential_shared-r2-fill1": [0.8, 0.8, 0.81]})
    rows = offset_and_filler(cells)[2]
    assert rows["offset cost (sequential_shared - parallel)"].mean == pytest.approx(0.1933, abs=1e-3)
    assert rows["offset cost (sequential_shared - parallel)"].excludes_zero
    assert rows["filler gain for parallel (fill 1)"].mean == pytest.approx(0.19, abs=1e-3)
    assert not rows["cost left with filler (sequential_shared - parallel+fill)"].excludes_zero
    assert rows["sequential - parallel"] is None


def test_swept_models_lend_their_rate_and_ties_go_to_the_lower_loss() -> None:
    assert [sweep_key(n) for n in ("r1", "r1-x4layers", "parallel-r4", "sequential_shared-r3-fill2")] == [
        "r1", "r1-x2layers", "parallel-r2", "sequential_shared-r2"]
    sweep = [{"task": "phop", "name": "r1", "lr_multiplier": m, "evaluation": {"accuracy": a, "answer_loss": loss}}
             for m, a, loss in ((0.5, 0.7, 0.9), (1.0, 0.7, 0.8), (2.0, 0.6, 0.5))]
    chosen = choose_multipliers(sweep)["phop"]["r1"]
    assert chosen["multiplier"] == 1.0 and chosen["edge"] is None
    # every swept model exists in the grid the later stages train
    names = {c.name for c in loop_cells([2, 3, 4]) + filler_cells([2, 3, 4], 1)} | {"r1", "r1-x2layers"}
    assert {sweep_key(n) for n in names} <= {"r1", "r1-x2layers", "parallel-r2", "sequential_shared-r2",
                                             "sequential-r2"}


def test_quick_reasoning_track_runs_end_to_end_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "reasoning"
    assert main(["study", "--track", "reasoning", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    quick = REASONING_PRESETS["quick"]
    points = {(t.name, d) for t in quick.tasks for d in t.difficulties}
    models = results["models"]
    assert {(m["task"], m["difficulty"]) for m in models} == points
    assert {m["seed"] for m in models} == set(range(quick.seeds))
    assert all(0 <= m["evaluation"]["accuracy"] <= 1 and m["evaluation"]["instances"] >= quick.held_out
               for m in models)
    names = {m["name"] for m in models}
    assert {"r1", "r1-x2layers", "parallel-r2", "sequential_shared-r2", "sequential-r2", "parallel-r2-fill1"} <= names
    looped = next(m for m in models if m["name"] == "parallel-r2")
    assert len(looped["evaluation"]["per_loop_accuracy"]) == 2 and looped["evaluation"]["gate_mean"]
    report = (out / "report.md").read_text()
    assert "## Depth check" in report and (out / "accuracy_vs_difficulty.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["study", "--track", "reasoning", "--quick", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "depth check: 8 models, 8 already done" in err and ", 0 already done" not in err


def test_grid_trims_r_above_two_to_its_modes_and_one_compute_matched_model() -> None:
    cells = [c.name for c in loop_cells([2, 3, 4], more_modes=("parallel", "sequential_shared"))]
    assert cells == ["parallel-r2", "sequential_shared-r2", "sequential-r2", "parallel-r3", "sequential_shared-r3",
                     "r1-x4layers", "parallel-r4", "sequential_shared-r4"]
    assert [c.name for c in filler_cells([2, 3, 4], 1)] == ["parallel-r2-fill1", "sequential_shared-r2-fill1",
                                                           "parallel-r4-fill3", "sequential_shared-r4-fill3"]


def test_variants_are_compared_with_the_preset_settings_at_r2() -> None:
    cells = _cells({"parallel-r2": [0.8, 0.82, 0.81], "sequential_shared-r2": [0.7, 0.7, 0.72],
                    "parallel-r2-plain": [0.6, 0.63, 0.6], "sequential_shared-r2-plain": [0.7, 0.71, 0.7],
                    "parallel-r2-fill1": [0.9, 0.9, 0.9], "parallel-r3": [0.5, 0.5, 0.5]})
    rows = variants(cells)
    assert set(rows) == {"parallel R = 2 plain - parallel R = 2", "sequential_shared R = 2 plain - "
                         "sequential_shared R = 2", "offset cost with plain (sequential_shared - parallel)"}
    assert rows["parallel R = 2 plain - parallel R = 2"].mean == pytest.approx(-0.2, abs=1e-9)
    # a variant or filler model is not a loop count of its own
    assert loops_present(cells) == [2, 3]


def test_bits_per_byte_options_are_refused_not_ignored(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for extra in (["--estimate"], ["--set", "train.lr=1e-3"], ["--modes", "parallel"]):
        assert main(["study", "--track", "reasoning", "--quick", "--out", str(tmp_path), *extra]) == 2
        assert f"{extra[0]} belong(s) to the bits-per-byte track" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_a_reasoning_preset_is_refused_by_the_bpb_track(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["study", "--preset", "hard", "--out", str(tmp_path)]) == 2
    assert "--preset hard belongs to --track reasoning" in capsys.readouterr().err


def test_the_command_line_picks_the_preset_and_its_changes() -> None:
    parser = argparse.ArgumentParser()
    add_study_arguments(parser)
    default = reasoning_preset(parser.parse_args(["--track", "reasoning"]))  # no --preset: the default preset
    assert default.tasks == REASONING_PRESETS["default"].tasks and default.seeds == REASONING_PRESETS["default"].seeds
    changed = reasoning_preset(parser.parse_args(["--track", "reasoning", "--preset", "hard", "--seeds", "5",
                                                  "--loops", "1", "2", "3", "--no-lr-sweep"]))
    assert changed.tasks == REASONING_PRESETS["hard"].tasks and changed.seeds == 5
    assert changed.loops == (2, 3) and changed.lr_multipliers == (1.0,)
