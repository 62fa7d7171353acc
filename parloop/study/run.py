"""One model of the study: its recipe, its training (resumed or reused) and its evaluations (reused when made
with the same settings)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from parloop.eval.bpb import bits_per_byte
from parloop.eval.diagnostics import diagnose
from parloop.eval.held_out import held_out_texts
from parloop.eval.humaneval import humaneval
from parloop.eval.lines import line_completion
from parloop.eval.programs import Program
from parloop.eval.reasoning import code_reasoning
from parloop.inference.loading import load_model
from parloop.study.grid import Preset, Run
from parloop.train.errors import RecipeError
from parloop.train.recipe import Recipe, recipe_from_dict
from parloop.train.trainer import train


def recipe_for(run: Run, preset: Preset, corpus: Path, overrides: Sequence[str]) -> Recipe:
    """The training recipe of one run: the preset's with the user's overrides, at the run's scale, with its loop
    count, mode, depth and seed; the learning rates are the recipe's times the run's multiplier."""
    train_values = dict(preset.train)
    steps = max(1, run.scale.budget // (train_values["batch_size"] * train_values["seq_len"]))
    train_values.update(max_steps=steps, warmup_steps=max(1, steps // 20),
                        eval_interval=max(1, steps // preset.validations),
                        checkpoint_interval=max(1, steps // preset.checkpoints), seed=run.seed)
    model = {**preset.model, **run.scale.model, "plt_num_loops": run.cell.loops, "plt_loop_mode": run.cell.mode}
    model["num_hidden_layers"] = run.scale.model["num_hidden_layers"] * run.cell.depth
    values = {"name": run.name.replace("/", "-"), "data": {"dir": str(corpus)}, "model": model,
              "train": train_values}
    recipe = recipe_from_dict(values, overrides)
    fixed = {"model.plt_num_loops": (recipe.model.get("plt_num_loops"), run.cell.loops),
             "model.plt_loop_mode": (recipe.model.get("plt_loop_mode"), run.cell.mode),
             "model.num_hidden_layers": (recipe.model.get("num_hidden_layers"), model["num_hidden_layers"]),
             "train.seed": (recipe.train.seed, run.seed)}
    changed = [k for k, (got, wanted) in fixed.items() if got != wanted]
    if changed:
        raise RecipeError(f"--set may not change {', '.join(changed)}: the study sets them per model (use "
                          f"--loops, --modes, --seeds and --scales)")
    recipe.train.lr *= run.lr_multiplier
    recipe.train.min_lr *= run.lr_multiplier
    return recipe


def eval_settings(preset: Preset, seq_len: int) -> dict[str, Any]:
    """What an evaluation depends on besides the model: a saved evaluation with other settings is redone."""
    return {"eval_bytes": preset.eval_bytes, "programs": preset.programs, "lines": preset.lines,
            "humaneval": preset.humaneval, "humaneval_tokens": preset.humaneval_tokens,
            "diagnostic_sequences": preset.diagnostic_sequences, "context": seq_len, "batch": preset.eval_batch}


def evaluate_model(model_dir: Path, corpus: Path, held_out: Sequence[Program], settings: dict[str, Any],
                   device: str) -> dict[str, Any]:
    """Every evaluation of one model (and its per-loop diagnostics when R >= 2), on held-out data only."""
    model, tokenizer = load_model(model_dir, device, "float32")
    context, batch = settings["context"], settings["batch"]
    out: dict[str, Any] = {}
    test_texts = held_out_texts(corpus, "test", settings["eval_bytes"])
    for split, texts in (("val", held_out_texts(corpus, "val", settings["eval_bytes"])), ("test", test_texts)):
        bpb = bits_per_byte(model, tokenizer, texts, context, batch, desc=f"{split} bits/byte")
        out[f"{split}_bpb"] = bpb.bits_per_byte
        out[f"{split}_files"] = {"bits": bpb.text_bits, "bytes": bpb.text_bytes}
    lines = line_completion(model, tokenizer, test_texts, settings["lines"], context, batch_size=batch,
                            desc="line completion")
    out["line_completion"] = lines["exact_match"]
    reasoning = code_reasoning(model, tokenizer, held_out, batch_size=batch, desc="code reasoning")
    out["code_reasoning"] = reasoning["accuracy"]
    he = humaneval(model, tokenizer, limit=settings["humaneval"], max_new_tokens=settings["humaneval_tokens"],
                   batch_size=batch, desc="HumanEval")
    out["humaneval"] = he["pass@1"]
    out["counts"] = {"lines": lines["lines"], "programs": reasoning["programs"], "humaneval": he["problems"],
                     "val_files": len(out["val_files"]["bytes"]), "test_files": len(test_texts)}
    if model.config.plt_num_loops >= 2:
        out["diagnostics"] = diagnose(model, tokenizer, test_texts, context=context, batch_size=batch,
                                      max_sequences=settings["diagnostic_sequences"])
    return out


def _saved_or_new_evaluation(run_dir: Path, model_dir: Path, corpus: Path, held_out: Sequence[Program],
                             settings: dict[str, Any], device: str) -> dict[str, Any]:
    """The model's `evaluation.json` when it was made with `settings`, else a new evaluation, saved there."""
    eval_path = run_dir / "evaluation.json"
    saved = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    if saved.get("settings") == settings and saved.get("evaluation") is not None:
        return saved["evaluation"]
    evaluation = evaluate_model(model_dir, corpus, held_out, settings, device)
    # written whole or not at all, so an interrupted study never reads half an evaluation
    tmp = eval_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "evaluation": evaluation}) + "\n")
    os.replace(tmp, eval_path)
    return evaluation


def run_model(run: Run, study: Path, preset: Preset, corpus: Path, held_out: Sequence[Program],
              overrides: Sequence[str], device: str) -> dict[str, Any]:
    """Train (or resume, or reuse) and evaluate (or reuse) one model; returns its record for results.json."""
    run_dir = study / "models" / run.name
    started = time.perf_counter()
    recipe = recipe_for(run, preset, corpus, overrides)
    metrics = train(recipe, run_dir, resume=True)
    settings = eval_settings(preset, recipe.train.seq_len)
    evaluation = _saved_or_new_evaluation(run_dir, Path(metrics["model_dir"]), corpus, held_out, settings, device)
    print(f"{run.name}: test bits/byte {evaluation['test_bpb']:.4f}, code reasoning "
          f"{evaluation['code_reasoning']:.3f}, line completion {evaluation['line_completion']:.3f}, HumanEval "
          f"{evaluation['humaneval']:.3f}  ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return {"name": run.cell.name, "scale": run.scale.name, "seed": run.seed, "lr": recipe.train.lr,
            "loops": run.cell.loops, "mode": run.cell.mode, "modes": list(run.cell.modes), "depth": run.cell.depth,
            "layers": recipe.model["num_hidden_layers"],
            "training": {k: metrics.get(k) for k in ("val_bpb", "test_bpb", "train_loss", "tokens", "parameters",
                                                    "train_seconds", "tokens_per_s")},
            "evaluation": evaluation}
