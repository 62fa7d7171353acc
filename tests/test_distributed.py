"""DDP and FSDP2 over 2 gloo processes on CPU (launched with torchrun) match a single process with the same batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_data import build_tiny_corpus
from test_training import RECIPE, tiny, train_losses

from parloop.train.trainer import train


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def single(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One process, global batch 4 in two micro-batches of 2 (gradient accumulation)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    return run_dir, train(tiny(corpus_dir), run_dir)


def torchrun(run_dir: Path, corpus_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores
    sets = [a for o in (f"data.dir={corpus_dir}", *overrides) for a in ("--set", o)]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "parloop.cli", "train", str(RECIPE), *sets, "--run-dir", str(run_dir)],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(strategy: str, single: tuple[Path, dict], corpus_dir: Path,
                                              tmp_path: Path) -> None:
    run_dir = tmp_path / strategy
    done = torchrun(run_dir, corpus_dir, f"distributed.strategy={strategy}")
    assert done.returncode == 0, done.stdout + done.stderr
    expected, got = train_losses(single[0]), train_losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step
    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["val_bpb"] == pytest.approx(single[1]["val_bpb"], abs=1e-4)
    # the saved weights are the full (gathered) model and equal the single-process weights
    ours, theirs = load_file(run_dir / "model" / "model.safetensors"), load_file(single[0] / "model" /
                                                                                   "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() < 1e-4, name

    # A checkpoint written by 2 processes resumes in 1: the format does not depend on the world size.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "model")
    (resumed / "final_metrics.json").unlink()
    (resumed / "recipe.yaml").write_text((single[0] / "recipe.yaml").read_text())
    train(tiny(corpus_dir), resumed, resume=True)
    for step, loss in train_losses(resumed).items():
        assert loss == pytest.approx(expected[step], abs=1e-4), step


def test_a_batch_that_does_not_split_over_the_processes_stops_every_rank_with_a_message(
        corpus_dir: Path, tmp_path: Path) -> None:
    done = torchrun(tmp_path / "run", corpus_dir, "train.batch_size=5", "train.micro_batch_size=1")
    assert done.returncode != 0
    assert "train.batch_size = 5 cannot be split evenly over 2 processes: use a multiple of 2" in done.stderr
    assert not (tmp_path / "run").exists()
