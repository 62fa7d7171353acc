"""The GPU check's study part: `parloop study --preset gpu` (re-sized to about a minute on one H100), then its
planned training compute against what trained, and the throughput the GPU reached.

The FLOP count comes from the recipes the study trains (`parloop.study.flops.plan_compute`), and the tokens each
run trained come from the trainer's own metrics, so the check says whether the printed estimate is what ran.

`--dry-run`: the same preset and code path on the CPU with tiny shapes: a 512-token vocabulary corpus of a few
standard-library files, width 32, 2 heads, 3 steps of 8 sequences of 32 tokens (the layer count and the grid are
the preset's), float32, one thread, smaller evaluations.

Run as `python -m parloop.gpucheck.study --out DIR --summary FILE [--dry-run]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from parloop.cli import main as parloop_main
from parloop.study.flops import plan_compute
from parloop.study.grid import PRESETS, STUDY_MODES
from parloop.study.plan import make_plan
from parloop.train.corpus import build_corpus, stdlib_root

PRESET = "gpu"
DRY_RUN_SET = ("model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
               "model.num_key_value_heads=1", "train.seq_len=32", "train.batch_size=8", "train.micro_batch_size=8",
               "train.device=cpu", "train.dtype=float32", "train.max_steps=3", "train.warmup_steps=1",
               "train.eval_interval=3", "train.checkpoint_interval=3", "train.log_interval=1", "train.eval_sequences=4")
DRY_RUN_EVALUATION = ("--eval-bytes", "3000", "--programs", "3", "--lines", "4", "--humaneval", "1", "--device", "cpu",
                      "--threads", "1")


def study_argv(out: Path, dry_run: bool) -> tuple[list[str], list[str]]:
    """`parloop study`'s arguments, and the `--set` overrides among them (which the FLOP count must see too)."""
    argv = ["study", "--preset", PRESET, "--out", str(out)]
    if not dry_run:
        return argv, []
    corpus = out.parent / "dry-run-corpus"
    build_corpus(f"{stdlib_root()}/[a-c]*.py", corpus, vocab_size=512, val_fraction=0.15, test_fraction=0.15)
    overrides = list(DRY_RUN_SET)
    argv += ["--data", str(corpus), *DRY_RUN_EVALUATION]
    for item in overrides:
        argv += ["--set", item]
    return argv, overrides


def compute_check(out: Path, overrides: list[str], results: dict[str, Any]) -> dict[str, Any]:
    """The plan's training compute (what the study printed) against the tokens its models trained."""
    preset = PRESETS[PRESET]
    plan = make_plan(preset, preset.scales, list(STUDY_MODES), compute_matched=True)
    planned = plan_compute(plan, preset, out / "corpus" / "mix", overrides)
    models = results["models"]
    trained = sum(m["training"]["tokens"] for m in models)
    seconds = sum(m["training"]["train_seconds"] for m in models)
    tflops = planned.flops / max(seconds, 1e-9) / 1e12
    return dict(runs=planned.runs, models_trained=len(models), planned_tokens=planned.tokens, trained_tokens=trained,
                tokens_match=planned.tokens == trained and planned.runs == len(models), planned_flops=planned.flops,
                train_seconds=round(seconds, 1), achieved_tflops=float(f"{tflops:.4g}"))


def summary(out: Path, overrides: list[str]) -> dict[str, Any]:
    """What the GPU check reports of the study: the compute check, test bits per byte per model and the verdict."""
    results = json.loads((out / "results.json").read_text())
    models = [dict(name=m["name"], seed=m["seed"], loops=m["loops"], mode=m["mode"],
                   test_bpb=m["evaluation"]["test_bpb"], tokens_per_s=round(m["training"]["tokens_per_s"]))
              for m in results["models"]]
    return dict(compute=compute_check(out, overrides, results), models=models,
                recommendation=results["recommendation"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parloop.gpucheck.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the study directory")
    parser.add_argument("--summary", type=Path, required=True, help="where to write the part's summary (JSON)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    study, overrides = study_argv(args.out, args.dry_run)
    code = parloop_main(study)
    if code != 0:
        return code
    args.summary.write_text(json.dumps(summary(args.out, overrides), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
