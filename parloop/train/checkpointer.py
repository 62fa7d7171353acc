"""The run directory of a training run: checkpoints with integrity manifests, exact resume, the final outputs.

Run directory: `recipe.yaml`, `metrics.jsonl`, `tensorboard/`, `checkpoints/step_XXXXXXXX/` (a `save_pretrained`
model with its tokenizer, plus `trainer_state.pt` and `manifest.json`), `model/` (the final model and tokenizer),
`curves.png`, and `final_metrics.json`, written last: its presence marks the run finished.

Every directory is written under a temporary name and renamed into place, and a checkpoint's manifest (sizes and
sha256 of its files) is written last, so a crash leaves either a complete checkpoint or one that is skipped.
Saved states are full (unsharded), so a checkpoint resumes on any number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.optim.lr_scheduler import LRScheduler
from transformers.utils import logging as hf_logging

from parloop.model import PLTForCausalLM
from parloop.train.distributed import World
from parloop.train.errors import RecipeError
from parloop.train.metrics import say
from parloop.train.recipe import Recipe, TrainRecipe

CHECKPOINT_DIR = "checkpoints"
FINAL_METRICS = "final_metrics.json"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
RECIPE_FILE = "recipe.yaml"
MODEL_DIR = "model"


class TrainingState(Protocol):
    """What a checkpoint saves and restores (the trainer provides it)."""

    model: nn.Module  # as parallelized: its state dicts are gathered to full tensors
    raw_model: PLTForCausalLM  # the same model before parallelization: save_pretrained and tied weights
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    step: int
    train_seconds: float


# ------------------------------------------------------------------------------------------ the run directory


def prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool) -> dict[str, Any] | None:
    """Finished-run detection and the recipe / resume checks. Returns the final metrics of a finished run."""
    saved = run_dir / RECIPE_FILE
    if saved.is_file():
        old, new = yaml.safe_load(saved.read_text()), recipe.to_dict()
        if old != new:
            old, new = _flatten(old), _flatten(new)
            diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            raise RecipeError(f"{run_dir} holds a run of a different recipe (it differs in "
                              f"{', '.join(diffs)}): choose another run directory or delete that one")
        if (run_dir / FINAL_METRICS).is_file():
            return json.loads((run_dir / FINAL_METRICS).read_text())
    if list_checkpoints(run_dir) and not resume:
        raise RecipeError(f"{run_dir} already holds checkpoints: pass --resume (resume=True) to continue that "
                          f"run, or choose another run directory")
    return None


def start_run_dir(recipe: Recipe, run_dir: Path) -> None:
    """Create the run directory (or tidy a resumed one: half-written checkpoints go) and save the recipe."""
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (run_dir / CHECKPOINT_DIR).glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    (run_dir / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def write_final_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """`final_metrics.json`, atomically: the mark of a finished run."""
    (run_dir / ".tmp-final.json").write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(run_dir / ".tmp-final.json", run_dir / FINAL_METRICS)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()),
                  key=lambda p: int(p.name[5:]))


def _atomic_replace(tmp: Path, final: Path) -> None:
    """Move the finished directory `tmp` to `final`, replacing an older `final` without a moment of neither."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


# ------------------------------------------------------------------------------------------------ integrity


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(directory: Path, step: int) -> None:
    files = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")


def checkpoint_problem(directory: Path) -> str | None:
    """Why the checkpoint in `directory` cannot be used (None if every file matches its manifest)."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"{MANIFEST} is missing (the checkpoint was not completely written)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return f"{MANIFEST} is unreadable"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


# ------------------------------------------------------------------------------------------------ RNG state


def rng_state() -> dict[str, Any]:
    """The random states of this process (Python, numpy, torch and every CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Writing model shards" bar from save_pretrained inside the training bar."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------- checkpoints


class Checkpointer:
    """Saves and restores a `TrainingState` in `run_dir`. Every rank calls every method (they hold collectives);
    rank 0 alone reads and writes files. `train` gives the seed and global batch size (the data position)."""

    def __init__(self, run_dir: Path, world: World, train: TrainRecipe, tokenizer: Any) -> None:
        self.run_dir, self.world, self.train, self.tokenizer = run_dir, world, train, tokenizer

    @staticmethod
    def _full_state(state: TrainingState) -> tuple[dict[str, Any], dict[str, Any]]:
        # full (unsharded) state on CPU, the same layout whatever the strategy and world size
        return get_state_dict(state.model, state.optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _save_model(self, state: TrainingState, directory: Path, model_state: dict[str, Any]) -> None:
        if state.raw_model.config.tie_word_embeddings:
            # FSDP's gathered state holds tied weights as separate tensors; store them once, as save_pretrained
            # does for an unsharded model
            model_state = {k: v for k, v in model_state.items() if k not in state.raw_model._tied_weights_keys}
        with _quiet_transformers():
            state.raw_model.save_pretrained(directory, state_dict=model_state)
            self.tokenizer.save_pretrained(directory)

    def save(self, state: TrainingState) -> Path:
        """A checkpoint of `state` in `checkpoints/step_XXXXXXXX/`; older ones beyond `keep_checkpoints` go."""
        model_state, optim_state = self._full_state(state)
        rng = self.world.gather(rng_state())
        root = self.run_dir / CHECKPOINT_DIR
        final = root / f"step_{state.step:08d}"
        if self.world.main:
            tmp = root / f".tmp-{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._save_model(state, tmp, model_state)
            torch.save({"step": state.step, "optimizer": optim_state, "scheduler": state.scheduler.state_dict(),
                        "rng": rng, "train_seconds": state.train_seconds, "world_size": self.world.size,
                        "data": {"seed": self.train.seed, "next_sample": state.step * self.train.batch_size}},
                       tmp / TRAINER_STATE)
            _write_manifest(tmp, state.step)  # last: a checkpoint without a manifest is incomplete
            _atomic_replace(tmp, final)
            for old in list_checkpoints(self.run_dir)[:-self.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.world.barrier()
        return final

    def save_final_model(self, state: TrainingState) -> None:
        """The trained model and its tokenizer in `model/`."""
        model_state, _ = self._full_state(state)
        if self.world.main:
            tmp = self.run_dir / f".tmp-{MODEL_DIR}"
            shutil.rmtree(tmp, ignore_errors=True)
            self._save_model(state, tmp, model_state)
            _atomic_replace(tmp, self.run_dir / MODEL_DIR)

    def latest(self) -> Path | None:
        """Rank 0 picks the newest checkpoint that passes its manifest; the others follow."""
        verdict = (None, False)  # (usable checkpoint, any checkpoint at all)
        if self.world.main:
            candidates = list_checkpoints(self.run_dir)
            verdict = (None, bool(candidates))
            for candidate in reversed(candidates):
                problem = checkpoint_problem(candidate)
                if problem is None:
                    verdict = (candidate, True)
                    break
                say(f"skipping checkpoint {candidate}: {problem}")
        chosen, any_checkpoint = self.world.broadcast(verdict)
        if chosen is None and any_checkpoint:
            raise RecipeError(f"no usable checkpoint in {self.run_dir / CHECKPOINT_DIR} (all are incomplete or "
                              f"corrupt, see above): delete that directory to train from scratch")
        return chosen

    def _read(self, state: TrainingState, directory: Path) -> tuple[dict[str, Any], dict[str, Any], Any]:
        """Rank 0's model state, optimizer state and trainer state from `directory` (empty on other ranks)."""
        model_state: dict[str, Any] = {}
        for f in sorted(directory.glob("*.safetensors")):
            model_state.update(load_file(f))
        if state.raw_model.config.tie_word_embeddings:  # save_pretrained stores a tied weight once
            for tied, source in state.raw_model._tied_weights_keys.items():
                model_state.setdefault(tied, model_state[source])
        trainer_state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=False)
        return model_state, trainer_state.pop("optimizer"), trainer_state

    def load(self, state: TrainingState, directory: Path) -> None:
        """Restore `state` from the checkpoint in `directory`: weights, optimizer, schedule, progress, RNG."""
        # Only rank 0 reads the files; the other ranks receive their part through broadcast_from_rank0.
        model_state, optim_state, saved = self._read(state, directory) if self.world.main else ({}, {}, None)
        saved = self.world.broadcast(saved)
        set_state_dict(state.model, state.optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.world.size > 1))
        state.scheduler.load_state_dict(saved["scheduler"])
        state.step, state.train_seconds = saved["step"], saved["train_seconds"]
        if saved["data"]["next_sample"] != state.step * self.train.batch_size:
            raise RecipeError(f"checkpoint {directory} was written with another batch size; resume it with the "
                              f"recipe it was trained with")
        if len(saved["rng"]) == self.world.size:
            set_rng_state(saved["rng"][self.world.rank])
        elif self.world.main:
            say(f"checkpoint was written by {len(saved['rng'])} processes, now {self.world.size}: random "
                f"states start fresh (the data order does not depend on them)")
