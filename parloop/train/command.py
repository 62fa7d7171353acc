"""`parloop train`: train a model from a recipe file, on one process or many (torchrun); docs/training.md."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from parloop.train.errors import USER_ERRORS, exit_code
from parloop.train.metrics import format_metrics
from parloop.train.recipe import load_recipe
from parloop.train.trainer import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe file (.yaml or .toml), e.g. recipes/small.yaml")
    parser.add_argument("--run-dir", default=None, help="where checkpoints, metrics and the final "
                        "model go (default: runs/<recipe name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE",
                        help="override a recipe field, e.g. --set train.lr=3e-4 --set model.plt_num_loops=1 "
                        "(values are YAML: [64, 0], true, null); repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its latest complete checkpoint")
    parser.epilog = ("Multi-process: torchrun --nproc-per-node N -m parloop.cli train RECIPE ... "
                     "(distributed.strategy=ddp or fsdp); see docs/training.md.")


def run(args: argparse.Namespace) -> int:
    main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    overrides, run_dir = args.overrides, args.run_dir
    try:
        recipe = load_recipe(args.recipe, overrides)
        run_dir = Path(run_dir or Path("runs") / recipe.name)
        metrics = train(recipe, run_dir, resume=args.resume)
    except USER_ERRORS as e:
        resume = f"continue with: parloop train {args.recipe} --run-dir {run_dir} --resume " + " ".join(
            f"--set {o}" for o in overrides)
        return exit_code(e, "parloop train", resume, echo=main)
    if main:
        print(f"{recipe.name}: {format_metrics(metrics)}")
        print(f"run directory: {run_dir}  (final model: {metrics['model_dir']})")
    return 0
