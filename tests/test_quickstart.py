"""`parloop quickstart`: end to end on a tiny recipe, its printed table against results.json, the comparison's
wording on constructed numbers, and the bigram baseline against a hand count."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_data import write_source_tree

from parloop import cli
from parloop.train.baseline import BigramCounts
from parloop.train.quickreport import PROJECT_SEED_SPREAD, comparison_lines

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    """One real quickstart run on the tiny recipe with two seeds: (run directory, stdout, results.json)."""
    tmp = tmp_path_factory.mktemp("quickstart")
    write_source_tree(tmp / "src", count=200)  # enough files for 5 % validation and test splits
    run_dir = tmp / "quick"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["quickstart", "--run-dir", str(run_dir), "--source", str(tmp / "src"), "--recipe",
                         str(RECIPE), "--seeds", "2", "--vocab-size", "300", "--max-new-tokens", "5",
                         "--bench-preset", "tiny", "--bench-context", "8", "--bench-new-tokens", "2",
                         "--reasoning-steps", "3", "--reasoning-seeds", "2", "--reasoning-held-out", "40"])
    assert code == 0
    return run_dir, stdout.getvalue(), json.loads((run_dir / "results.json").read_text())


def _table_rows(out: str) -> dict[str, list[str]]:
    """{label: cells} of the printed results table."""
    lines = out[out.index("model            parameters"):].splitlines()[1:]
    rows = {}
    for line in lines:
        if not (line.startswith("R = ") or line.startswith("bigram counts")):
            break
        label = line[:16].strip()
        rows[label] = line[16:].split()
    return rows


def test_printed_table_equals_results_file(quickstart: tuple[Path, str, dict]) -> None:
    _, out, results = quickstart
    rows = _table_rows(out)
    assert len(results["models"]) == 4 and set(rows) == {m["label"] for m in results["models"]} | {"bigram counts"}
    for m in results["models"]:
        params, val, test, speed, minutes = rows[m["label"]]
        assert int(params.replace(",", "")) == m["parameters"]
        assert float(val) == round(m["val_bpb"], 4) and float(test) == round(m["test_bpb"], 4)
        assert float(speed.replace(",", "")) == round(m["tokens_per_s"])
        assert float(minutes) == round(m["train_seconds"] / 60, 1)
    assert [float(x) for x in rows["bigram counts"]] == [round(results["bigram"]["val_bpb"], 4),
                                                         round(results["bigram"]["test_bpb"], 4)]
    assert results["table"] in out
    # the per-seed differences printed are those of the table's own numbers
    by = {(m["plt_num_loops"], m["seed"]): m["val_bpb"] for m in results["models"]}
    for d in results["differences"]:
        assert math.isclose(d["val_bpb"], by[2, d["seed"]] - by[1, d["seed"]])
        assert f"seed {d['seed']}: {d['val_bpb']:+.4f}" in out


def test_models_are_matched_pairs_per_seed(quickstart: tuple[Path, str, dict]) -> None:
    run_dir, _, results = quickstart
    assert sorted((m["plt_num_loops"], m["seed"]) for m in results["models"]) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert len({m["tokens"] for m in results["models"]}) == 1
    # matched: the two recipes of a seed differ only in the loop count and the name
    one, two = (yaml.safe_load((run_dir / name / "recipe.yaml").read_text()) for name in ("r1", "r2"))
    assert one["model"].pop("plt_num_loops") == 1 and two["model"].pop("plt_num_loops") == 2
    assert one.pop("name") != two.pop("name") and one == two
    seed1 = yaml.safe_load((run_dir / "r2-seed1" / "recipe.yaml").read_text())
    assert seed1["train"]["seed"] == 1 and seed1["model"]["plt_num_loops"] == 2


def test_output_is_numbered_names_the_figure_and_holds_no_library_noise(quickstart: tuple[Path, str, dict]) -> None:
    run_dir, out, results = quickstart
    numbers = re.findall(r"^== (\d+)/(\d+) ", out, flags=re.MULTILINE)
    assert numbers == [(str(k), "6") for k in range(1, 7)]
    assert "estimated training time for 4 model(s)" in out
    figure = Path(results["figure"])
    assert figure == run_dir / "curves.png" and figure.read_bytes()[:4] == b"\x89PNG"
    assert f"figure: {figure}" in out
    for name in ("r1", "r2", "r1-seed1", "r2-seed1"):
        assert (run_dir / name / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "Loading weights" not in out
    assert "wall-clock" in out and "parloop study" in out
    assert "--- R = 1, seed 0 ---" in out and "--- R = 2, seed 0 ---" in out
    assert "sequential_shared" in results["bench_table"] and results["bench_table"] in out
    assert re.search(rf"done in [\d.]+ min \(wall-clock; training took [\d.]+ min, estimated [\d.]+ min\); "
                     rf"everything is under {re.escape(str(run_dir))}/", out)
    assert results["estimated_training_seconds"] > 0 and results["training_seconds"] > 0


def test_reasoning_step_prints_its_paired_difference(quickstart: tuple[Path, str, dict]) -> None:
    run_dir, out, results = quickstart
    reasoning = results["reasoning"]
    assert reasoning["seeds"] == 2 and reasoning["held_out"] == 40 and reasoning["steps"] == 3
    records = {}
    for path in (run_dir / "reasoning" / "models" / "phop-1" / "L1").glob("*/seed*.json"):
        record = json.loads(path.read_text())
        records[record["name"], record["seed"]] = record["evaluation"]["accuracy"]
    assert sorted(records) == [("parallel-r2", 0), ("parallel-r2", 1), ("r1", 0), ("r1", 1)]
    # the difference printed is the mean of the per-seed differences of the saved models, with its interval
    gain = reasoning["r2_minus_r1"]
    assert math.isclose(gain["mean"], sum(records["parallel-r2", s] - records["r1", s] for s in (0, 1)) / 2)
    assert f"parallel R = 2 minus R = 1: {gain['mean']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]" in out
    assert reasoning["measurable"] == (gain["low"] > 0 or gain["high"] < 0)


def _models(*val_bpbs: tuple[int, int, float]) -> list[dict]:
    return [{"plt_num_loops": r, "seed": s, "val_bpb": v} for r, s, v in val_bpbs]


def test_one_seed_is_not_a_verdict() -> None:
    text = " ".join(comparison_lines(_models((1, 0, 2.20), (2, 0, 2.45))))
    assert "0.2500 bits per byte worse" in text and "one seed each" in text
    a, b = PROJECT_SEED_SPREAD["val_bpb"]
    assert f"{abs(a - b):.4f}" in text and "--seeds 2" in text
    # another recipe: the shipped recipe's measured spread says nothing about it, so it is not quoted
    other = " ".join(comparison_lines(_models((1, 0, 2.20), (2, 0, 2.45)), shipped_recipe=False))
    assert f"{abs(a - b):.4f}" not in other and "not the shipped" in other and "--seeds 2" in other


def test_seeds_that_disagree_in_sign_cannot_tell_the_models_apart() -> None:
    mixed = " ".join(comparison_lines(_models((1, 0, 2.2), (2, 0, 2.3), (1, 1, 2.1), (2, 1, 2.05))))
    assert "seed 0: +0.1000" in mixed and "seed 1: -0.0500" in mixed and "cannot tell" in mixed
    agree = " ".join(comparison_lines(_models((1, 0, 2.2), (2, 0, 2.3), (1, 1, 2.1), (2, 1, 2.15))))
    assert "did worse than R = 1 with every seed" in agree and "spread of R = 1 in this run: 0.1000" in agree
    # two seeds: t(0.975, 1) = 12.71, so +0.075 ± 12.71 * 0.0354 / sqrt 2 = ± 0.3177 includes zero
    assert "+0.0750 [-0.2427, +0.3927]" in agree and "interval includes zero: 2 seeds cannot tell" in agree


def test_a_verdict_needs_an_interval_that_excludes_zero() -> None:
    rows = [(1, s, 2.0 + 0.01 * s) for s in range(4)] + [(2, s, 2.1 + 0.01 * s + 0.002 * (s % 2)) for s in range(4)]
    text = " ".join(comparison_lines(_models(*rows)))
    # differences 0.100, 0.102, 0.100, 0.102: mean 0.101, sd 0.001155, t(0.975, 3) = 3.182 -> half-width 0.0018
    assert "+0.1010 [+0.0992, +0.1028]" in text and "the 95 % interval excludes zero" in text
    assert "cannot tell" not in text


def test_bigram_probabilities_match_a_hand_count() -> None:
    windows = np.array([[0, 1, 0, 1, 2], [1, 2, 0, 1, 0]])
    counts = BigramCounts(windows, vocab_size=4)
    # pairs: 0->1 x3, 1->0 x2, 1->2 x2, 2->0 x1; unigram of targets: 0:3, 1:3, 2:2, 3:0 (8 in all)
    p1 = np.array([4, 4, 3, 1]) / 12
    expected = {(0, 1): (3 + 1 * p1[1]) / (3 + 1), (1, 2): (2 + 2 * p1[2]) / (4 + 2),
                (1, 3): (0 + 2 * p1[3]) / (4 + 2), (3, 0): p1[0]}
    prev, nxt = np.array([k[0] for k in expected]), np.array([k[1] for k in expected])
    np.testing.assert_allclose(2 ** counts.log2_prob(prev, nxt), list(expected.values()))
    full = 2 ** counts.log2_prob(np.repeat(np.arange(4), 4), np.tile(np.arange(4), 4))
    np.testing.assert_allclose(full.reshape(4, 4).sum(1), 1.0)  # every row a distribution
