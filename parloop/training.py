"""Training PLT models from recipes, on one process or many (`parloop train`; docs/training.md).

Python API (used by `parloop train`, the quickstart and the loop-count study):

    from parloop.training import load_recipe, train
    recipe = load_recipe("recipes/small.yaml", ["model.plt_num_loops=3", "train.max_steps=500"])
    metrics = train(recipe, "runs/small-r3", resume=True)
    metrics["val_bpb"], metrics["model_dir"]

- `load_recipe(path, overrides)`: a `Recipe` from a YAML or TOML file; overrides are `"section.field=value"`
  strings (values parsed as YAML) or a `{"section.field": value}` mapping. Unknown fields and wrong types raise
  `RecipeError` naming the field.
- `train(recipe, run_dir, resume=False) -> dict`: trains and returns the final metrics (`val_loss`, `val_bpb`,
  `test_loss`, `test_bpb`, `train_loss`, `tokens_per_s`, `parameters`, `model_dir`, ...). A finished run (its
  `final_metrics.json` exists and was made by the same recipe) is returned without training again. With
  `resume=True` an unfinished run continues from its latest complete checkpoint, and the following losses equal
  those of a run that was never stopped; without it, a run directory that holds checkpoints is an error.
- Under `torchrun` (WORLD_SIZE > 1) the same call trains with DDP or FSDP2 (`distributed.strategy`): every rank
  calls it, rank 0 writes the files, every rank gets the metrics.
- Ctrl-C (SIGINT) or SIGTERM: the current step finishes, a checkpoint is saved and `TrainingInterrupted` is raised.

Run directory: `recipe.yaml`, `metrics.jsonl`, `tensorboard/`, `checkpoints/step_XXXXXXXX/` (a `save_pretrained`
model with its tokenizer, plus `trainer_state.pt` and `manifest.json`), `model/` (the final model and tokenizer),
`curves.png`, and `final_metrics.json`, written last: its presence marks the run finished.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers.utils import logging as hf_logging

import parloop.config as config_module
from parloop.config import ConfigError, PLTConfig
from parloop.data import Corpus, DataError, TokenWindows
from parloop.model import PLTForCausalLM

CHECKPOINT_DIR = "checkpoints"
FINAL_METRICS = "final_metrics.json"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
# Filled from the corpus, so a recipe must not set them.
FROM_CORPUS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


class RecipeError(ValueError):
    """A recipe (or launch) that cannot train; the message names the field and says how to fix it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after Ctrl-C / SIGTERM once the checkpoint of the interrupted step is saved."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"training interrupted at step {step}; checkpoint saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


# --------------------------------------------------------------------------------------------------- recipes


@dataclass
class DataRecipe:
    dir: str = "runs/data/stdlib"  # a corpus built by `parloop data build`


@dataclass
class TrainRecipe:
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step, summed over all processes (the global batch)
    micro_batch_size: int = 16  # sequences per forward pass on one process; accumulation = batch / (micro * world)
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4  # the cosine schedule ends here
    warmup_steps: int = 50
    weight_decay: float = 0.1  # on matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast dtype; auto = bfloat16 on capable GPUs
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    log_interval: int = 10
    eval_interval: int = 100
    eval_sequences: int = 64  # validation windows scored at each evaluation (spread over the split)
    checkpoint_interval: int = 200
    keep_checkpoints: int = 2


@dataclass
class DistributedRecipe:
    strategy: Literal["ddp", "fsdp"] = "ddp"  # used when launched with torchrun (WORLD_SIZE > 1)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto = nccl on GPUs, gloo on CPUs


@dataclass
class Recipe:
    """A training run: the corpus, the model (any `PLTConfig` field) and the optimization."""

    name: str = "run"
    data: DataRecipe = field(default_factory=DataRecipe)
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    distributed: DistributedRecipe = field(default_factory=DistributedRecipe)

    def to_dict(self) -> dict[str, Any]:
        return _normalized(dataclasses.asdict(self))

    def model_config(self, corpus: Corpus) -> PLTConfig:
        """The `PLTConfig` of this recipe's model for `corpus` (vocabulary and special ids from its tokenizer)."""
        ids = {k: corpus.meta[k] for k in FROM_CORPUS if k != "vocab_size"}
        try:
            return PLTConfig(**self.model, vocab_size=corpus.vocab_size, **ids)
        except (ConfigError, TypeError, ValueError) as e:
            raise RecipeError(f"model: {e}") from None

    def check(self, world_size: int) -> None:
        """Raise `RecipeError` for values that cannot work with `world_size` processes."""
        recipe_from_dict(self.to_dict())  # field names and types, also for a Recipe built in Python
        t = self.train
        for name in ("seq_len", "batch_size", "micro_batch_size", "max_steps", "log_interval", "eval_interval",
                     "eval_sequences", "checkpoint_interval", "keep_checkpoints"):
            if getattr(t, name) < 1:
                raise RecipeError(f"train.{name} = {getattr(t, name)} is invalid: must be >= 1")
        for name in ("lr", "eps"):
            if getattr(t, name) <= 0:
                raise RecipeError(f"train.{name} = {getattr(t, name)} is invalid: must be > 0")
        if not 0 <= t.min_lr <= t.lr:
            raise RecipeError(f"train.min_lr = {t.min_lr} is invalid: must be between 0 and train.lr = {t.lr}")
        if t.warmup_steps < 0 or t.weight_decay < 0 or t.grad_clip < 0:
            raise RecipeError("train.warmup_steps, train.weight_decay and train.grad_clip must be >= 0")
        if t.batch_size % world_size:
            raise RecipeError(f"train.batch_size = {t.batch_size} cannot be split evenly over {world_size} "
                              f"processes: use a multiple of {world_size}")
        per_rank = t.batch_size // world_size
        if per_rank % t.micro_batch_size:
            raise RecipeError(f"train.batch_size / processes = {per_rank} is not a multiple of "
                              f"train.micro_batch_size = {t.micro_batch_size}: the gradient accumulation steps "
                              f"(batch_size / (micro_batch_size * processes)) must be a whole number")


def _model_fields() -> dict[str, Any]:
    """PLTConfig's own fields and their types (the base config's bookkeeping fields are not model settings)."""
    # get_type_hints(PLTConfig) fails on the base class's annotations (they name torch), so evaluate only these
    hints = {name: eval(annotation, vars(config_module)) if isinstance(annotation, str) else annotation
             for name, annotation in config_module.PLTConfig.__annotations__.items()
             if not name.startswith("_") and name not in FROM_CORPUS}
    return {k: v for k, v in hints.items() if k not in ("model_type", "keys_to_ignore_at_inference")}


def _normalized(value: Any) -> Any:
    """Plain YAML-able data (tuples become lists), so a recipe compares equal to its own saved copy."""
    return yaml.safe_load(yaml.safe_dump(value, sort_keys=True))


def _unknown_message(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown recipe field {name!r}{hint}; known fields here: {', '.join(known)}"


def _describe(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` checked against the type `hint` (ints pass as floats); raises `RecipeError` naming `name`."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            with contextlib.suppress(RecipeError):
                return _coerce(value, arg, name)
    elif origin is Literal:
        if value in args:
            return value
    elif hint is type(None):
        if value is None:
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 (PyYAML) reads `3e-4` (no dot) as a string
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
    elif hint in (int, str, bool, dict):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is tuple and len(args) != len(value):
            raise RecipeError(f"{name} = {value!r} has the wrong length: expected {len(args)} items")
        inner = args if origin is tuple else args * len(value)
        return [_coerce(v, h, f"{name}[{i}]") for i, (v, h) in enumerate(zip(value, inner, strict=True))]
    elif origin is dict and isinstance(value, dict):
        return value
    raise RecipeError(f"{name} = {value!r} has the wrong type: expected {_describe(hint)}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"{prefix or 'the recipe'} must be a mapping of fields, not {type(values).__name__}")
    hints = get_type_hints(cls)
    known = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise RecipeError(_unknown_message(name, known))
        hint = known[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{name}.")
        elif key == "model" and cls is Recipe:
            model_fields = _model_fields()
            if not isinstance(value, dict):
                raise RecipeError("model must be a mapping of PLTConfig fields")
            for k in value:
                if k in FROM_CORPUS:
                    raise RecipeError(f"model.{k} comes from the corpus's tokenizer: remove it from the recipe")
                if k not in model_fields:
                    raise RecipeError(_unknown_message(f"model.{k}", model_fields))
            kwargs[key] = {k: _coerce(v, model_fields[k], f"model.{k}") for k, v in value.items()}
        else:
            kwargs[key] = _coerce(value, hint, name)
    return cls(**kwargs)


def recipe_from_dict(values: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] = ()) -> Recipe:
    """A validated `Recipe` from nested fields plus dotted overrides (see `load_recipe`)."""
    values = json.loads(json.dumps(values))  # a deep copy: overrides must not touch the caller's mapping
    pairs = overrides.items() if isinstance(overrides, Mapping) else [_parse_override(o) for o in overrides]
    for key, value in pairs:
        *sections, last = key.split(".")
        node = values
        for i, section in enumerate(sections):
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise RecipeError(f"cannot set {key!r}: {'.'.join(sections[:i + 1])} is not a section")
        node[last] = value
    return _build(Recipe, values, "")


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r} is not of the form section.field=value (e.g. train.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_recipe(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Recipe:
    """A `Recipe` from a YAML (`.yaml`, `.yml`) or TOML (`.toml`) file, with `overrides` applied on top."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist (shipped recipes are in recipes/)")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        else:
            values = yaml.safe_load(text) or {}
    except Exception as e:
        raise RecipeError(f"cannot parse recipe {path}: {e}") from None
    try:
        return recipe_from_dict(values, overrides)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------ processes, devices


@dataclass(frozen=True)
class _World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> _World:
        try:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), size)
        except ValueError:
            raise RecipeError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (launch with torchrun)") from None


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


class _StopRequest:
    """SIGINT/SIGTERM handler: ask the loop to checkpoint and stop after the current step.

    torchrun forwards the terminal's Ctrl-C to its workers, so a worker may see two signals for one key press;
    only a third one aborts immediately, without saving.
    """

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count >= 3:
            raise KeyboardInterrupt
        if self.count == 1:
            _say(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopRequest]:
        if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
            yield self
            return
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


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


def _checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()),
                  key=lambda p: int(p.name[5:]))


def _lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then a cosine down to `min_ratio` at `max_steps` (times the peak lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plot_curves(metrics_path: Path, out: Path) -> None:
    """Training loss, validation loss and validation bits per byte against the step, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"], r["val_bpb"]) for r in records if r["kind"] == "eval"]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    loss_ax, bpb_ax = fig.subplots(1, 2)
    if train:
        loss_ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        steps, losses, bpbs = zip(*val, strict=True)
        loss_ax.plot(steps, losses, "o-", label="validation")
        bpb_ax.plot(steps, bpbs, "o-", color="tab:orange")
    loss_ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    loss_ax.legend()
    bpb_ax.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


# -------------------------------------------------------------------------------------------------- the run


class _Run:
    """One training run on this process: model, optimizer, data and the files of the run directory."""

    def __init__(self, recipe: Recipe, run_dir: Path, corpus: Corpus, world: _World) -> None:
        self.recipe, self.run_dir, self.corpus, self.world = recipe, run_dir, corpus, world
        t = recipe.train
        self.device = self._device(t.device, world)
        use_bf16 = t.dtype == "bfloat16" or (
            t.dtype == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_bf16)
        self.accumulation = t.batch_size // (world.size * t.micro_batch_size)
        self.config = recipe.model_config(corpus)
        self.train_windows = TokenWindows(corpus.tokens("train"), t.seq_len)
        self.eval_windows = {s: TokenWindows(corpus.tokens(s), t.seq_len) for s in ("val", "test")}
        self.token_bytes = torch.from_numpy(corpus.token_bytes()).to(self.device)
        self.tokenizer = corpus.tokenizer() if world.main else None
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.raw_model = PLTForCausalLM(self.config).to(self.device)
        self.parameters = sum(p.numel() for p in self.raw_model.parameters())
        self.model = self._wrap(self.raw_model)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: _lr_factor(s, t.warmup_steps, t.max_steps, t.min_lr / t.lr))
        self.step = 0
        self.train_seconds = 0.0

    @staticmethod
    def _device(name: str, world: _World) -> Any:
        if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise RecipeError("train.device = 'cuda' but no CUDA GPU is visible: use train.device=cpu")
            torch.cuda.set_device(world.local_rank)
            return torch.device("cuda", world.local_rank)
        return torch.device("cpu")

    def _wrap(self, model: Any) -> Any:
        if self.world.size == 1:
            return model
        if self.recipe.distributed.strategy == "ddp":
            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                           else None)
        mesh = init_device_mesh(self.device.type, (self.world.size,))
        # Each decoder layer is its own FSDP unit; embeddings, final norm and lm_head go with the root. The PLT
        # loops call a layer R times per forward, and FSDP2 gathers its weights for every call (and again in
        # backward): R times the all-gather traffic of a plain transformer, the usual memory savings.
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    # ------------------------------------------------------------------------------------------- batches
    def _micro_batches(self, step: int) -> Iterator[tuple[Any, Any]]:
        """This rank's micro-batches of global step `step`: rows of the step's global batch, a pure function of
        (seed, step), so any world size and any resume point see the same global batch."""
        t, micro = self.recipe.train, self.recipe.train.micro_batch_size
        per_rank = t.batch_size // self.world.size
        first = step * t.batch_size + self.world.rank * per_rank
        for m in range(self.accumulation):
            windows = self.train_windows.get(self.train_windows.shuffled(t.seed, first + m * micro, micro))
            batch = torch.from_numpy(windows).to(self.device)
            yield batch[:, :-1], batch[:, 1:]

    def _loss(self, inputs: Any, targets: Any, reduction: str = "mean") -> Any:
        with torch.autocast(**self.autocast):
            logits = self.model(input_ids=inputs).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction=reduction)

    def _all_reduce(self, tensor: Any, op: str = "sum") -> Any:
        if self.world.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch; returns its mean loss (over all ranks) and gradient norm."""
        self.model.train()
        total = torch.zeros((), device=self.device)
        for m, (inputs, targets) in enumerate(self._micro_batches(self.step)):
            last = m == self.accumulation - 1
            with self._gradient_sync(last):
                loss = self._loss(inputs, targets)
                (loss / self.accumulation).backward()
            total += loss.detach()
        grad_norm = float("nan")
        if self.recipe.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.train.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = self._all_reduce(total / self.accumulation) / self.world.size
        return {"loss": float(loss), "lr": lr, "grad_norm": grad_norm}

    def _gradient_sync(self, sync: bool) -> Any:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if self.world.size == 1:
            return contextlib.nullcontext()
        if self.recipe.distributed.strategy == "ddp":
            return contextlib.nullcontext() if sync else self.model.no_sync()
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def evaluate(self, split: str) -> dict[str, float]:
        """Mean loss (nats/token) and bits per byte over the fixed evaluation windows of `split`.

        bpb = total nats / ln 2 / UTF-8 bytes of the scored target tokens. Every rank runs the same number of
        forward passes (FSDP needs that); padding windows get zero weight.
        """
        t = self.recipe.train
        windows = self.eval_windows[split]
        indices = windows.spread(t.eval_sequences)
        mine = indices[self.world.rank::self.world.size]
        per_rank = -(-len(indices) // self.world.size)
        weights = np.r_[np.ones(len(mine)), np.zeros(per_rank - len(mine))]
        mine = np.r_[mine, np.repeat(indices[:1], per_rank - len(mine))]
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, tokens, bytes
        self.model.eval()
        with torch.no_grad():
            for i in range(0, per_rank, t.micro_batch_size):
                batch = torch.from_numpy(windows.get(mine[i:i + t.micro_batch_size])).to(self.device)
                w = torch.from_numpy(weights[i:i + t.micro_batch_size]).to(self.device)
                targets = batch[:, 1:]
                nats = self._loss(batch[:, :-1], targets, reduction="none").view(targets.shape).double()
                sums[0] += (nats.sum(1) * w).sum()
                sums[1] += (w * targets.shape[1]).sum()
                sums[2] += (self.token_bytes[targets].sum(1).double() * w).sum()
        self._all_reduce(sums)
        nats, tokens, nbytes = sums.tolist()
        return {f"{split}_loss": nats / tokens, f"{split}_bpb": nats / math.log(2) / nbytes}

    # ---------------------------------------------------------------------------------------- checkpoints
    def _full_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        # full (unsharded) state on CPU, the same layout whatever the strategy and world size
        return get_state_dict(self.model, self.optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _save_model(self, directory: Path, state: dict[str, Any]) -> None:
        if self.config.tie_word_embeddings:
            # FSDP's gathered state holds tied weights as separate tensors; store them once, as save_pretrained
            # does for an unsharded model
            state = {k: v for k, v in state.items() if k not in self.raw_model._tied_weights_keys}
        with _quiet_transformers():
            self.raw_model.save_pretrained(directory, state_dict=state)
            self.tokenizer.save_pretrained(directory)

    def save_checkpoint(self) -> Path:
        model_state, optim_state = self._full_state()
        rng = [None] * self.world.size
        if self.world.size > 1:
            dist.all_gather_object(rng, _rng_state())
        else:
            rng[0] = _rng_state()
        root = self.run_dir / CHECKPOINT_DIR
        final = root / f"step_{self.step:08d}"
        if self.world.main:
            tmp = root / f".tmp-{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._save_model(tmp, model_state)
            torch.save({"step": self.step, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                        "rng": rng, "train_seconds": self.train_seconds, "world_size": self.world.size,
                        "data": {"seed": self.recipe.train.seed,
                                 "next_sample": self.step * self.recipe.train.batch_size}},
                       tmp / TRAINER_STATE)
            _write_manifest(tmp, self.step)  # last: a checkpoint without a manifest is incomplete
            _atomic_replace(tmp, final)
            for old in _checkpoints(self.run_dir)[:-self.recipe.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def _barrier(self) -> None:
        if self.world.size > 1:
            dist.barrier()

    def _broadcast(self, value: Any) -> Any:
        if self.world.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _choose_checkpoint(self) -> Path | None:
        """Rank 0 picks the newest checkpoint that passes its manifest and loads; the others follow."""
        verdict = (None, False)  # (usable checkpoint, any checkpoint at all)
        if self.world.main:
            candidates = _checkpoints(self.run_dir)
            verdict = (None, bool(candidates))
            for candidate in reversed(candidates):
                problem = checkpoint_problem(candidate)
                if problem is None:
                    verdict = (candidate, True)
                    break
                _say(f"skipping checkpoint {candidate}: {problem}")
        chosen, any_checkpoint = self._broadcast(verdict)
        if chosen is None and any_checkpoint:
            raise RecipeError(f"no usable checkpoint in {self.run_dir / CHECKPOINT_DIR} (all are incomplete or "
                              f"corrupt, see above): delete that directory to train from scratch")
        return chosen

    def load_checkpoint(self, directory: Path) -> None:
        # Only rank 0 reads the files; the other ranks receive their part through broadcast_from_rank0.
        model_state, optim_state, state = {}, {}, None
        if self.world.main:
            for f in sorted(directory.glob("*.safetensors")):
                model_state.update(load_file(f))
            if self.config.tie_word_embeddings:  # save_pretrained stores a tied weight once
                for tied, source in self.raw_model._tied_weights_keys.items():
                    model_state.setdefault(tied, model_state[source])
            state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=False)
            optim_state = state.pop("optimizer")
        state = self._broadcast(state)
        set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.world.size > 1))
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.train_seconds = state["step"], state["train_seconds"]
        expected = self.step * self.recipe.train.batch_size
        if state["data"]["next_sample"] != expected:
            raise RecipeError(f"checkpoint {directory} was written with another batch size; resume it with the "
                              f"recipe it was trained with")
        if len(state["rng"]) == self.world.size:
            _set_rng_state(state["rng"][self.world.rank])
        elif self.world.main:
            _say(f"checkpoint was written by {len(state['rng'])} processes, now {self.world.size}: random "
                 f"states start fresh (the data order does not depend on them)")

    def stop_requested(self, stop: _StopRequest) -> bool:
        """Do all ranks agree to stop? (Any rank that saw the signal decides, so all save the same step.)"""
        flag = torch.tensor([float(stop.count > 0)], device=self.device)
        return bool(self._all_reduce(flag, op="max").item())


def _prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool) -> dict[str, Any] | None:
    """Finished-run detection and the recipe / resume checks. Returns the final metrics of a finished run."""
    saved = run_dir / "recipe.yaml"
    if saved.is_file():
        old = yaml.safe_load(saved.read_text())
        new = recipe.to_dict()
        if old != new:
            diffs = [k for k in sorted(set(_flatten(old)) | set(_flatten(new)))
                     if _flatten(old).get(k) != _flatten(new).get(k)]
            raise RecipeError(f"{run_dir} holds a run of a different recipe (it differs in "
                              f"{', '.join(diffs)}): choose another run directory or delete that one")
        if (run_dir / FINAL_METRICS).is_file():
            return json.loads((run_dir / FINAL_METRICS).read_text())
    if _checkpoints(run_dir) and not resume:
        raise RecipeError(f"{run_dir} already holds checkpoints: pass --resume (resume=True) to continue that "
                          f"run, or choose another run directory")
    return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _metrics_writer(run_dir: Path, resumed_step: int) -> Any:
    """metrics.jsonl opened for appending, without records past the step the run resumes from."""
    path = run_dir / "metrics.jsonl"
    kept = []
    if resumed_step and path.is_file():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resumed_step]
    path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def train(recipe: Recipe, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train `recipe` into `run_dir` and return the final metrics (see the module docstring)."""
    world = _World.from_env()
    recipe.check(world.size)
    corpus = Corpus(recipe.data.dir)
    config = recipe.model_config(corpus)
    t = recipe.train
    if t.seq_len > config.max_position_embeddings:
        raise RecipeError(f"train.seq_len = {t.seq_len} is longer than model.max_position_embeddings = "
                          f"{config.max_position_embeddings}: lower train.seq_len or raise "
                          f"model.max_position_embeddings")
    for split in ("train", "val", "test"):
        have = corpus.meta["splits"][split]["tokens"]
        if have < t.seq_len + 1:
            raise DataError(f"the {split} split of {corpus.path} has {have} tokens, fewer than train.seq_len + 1 = "
                            f"{t.seq_len + 1}: lower train.seq_len or build a larger corpus")
    run_dir = Path(run_dir)
    finished = _prepare_run_dir(recipe, run_dir, resume)
    if finished is not None:
        if world.main:
            _say(f"{run_dir} is already trained; returning its final metrics")
        return finished
    if world.size > 1:
        if "MASTER_ADDR" not in os.environ:
            raise RecipeError(f"WORLD_SIZE = {world.size} but MASTER_ADDR is not set: launch with torchrun")
        backend = recipe.distributed.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() and t.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    try:
        return _train(recipe, run_dir, corpus, world, resume)
    finally:
        if world.size > 1:
            dist.destroy_process_group()


def _train(recipe: Recipe, run_dir: Path, corpus: Corpus, world: _World, resume: bool) -> dict[str, Any]:
    t = recipe.train
    if world.main:
        (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / CHECKPOINT_DIR).glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    run = _Run(recipe, run_dir, corpus, world)
    checkpoint = run._choose_checkpoint() if resume else None
    if checkpoint is not None:
        run.load_checkpoint(checkpoint)
        if world.main:
            _say(f"resuming from {checkpoint} (step {run.step})")
    tokens_per_step = t.batch_size * t.seq_len
    metrics_file = writer = None
    if world.main:
        from torch.utils.tensorboard import SummaryWriter

        metrics_file = _metrics_writer(run_dir, run.step)
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=run.step + 1 if run.step else None)
        _say(f"{recipe.name}: {run.parameters / 1e6:.2f}M parameters, R = {run.config.plt_num_loops} "
             f"({run.config.plt_loop_mode}), {world.size} process(es) on {run.device}, "
             f"{run.accumulation} accumulation step(s), {t.max_steps} steps of {tokens_per_step:,} tokens")

    def log(record: dict[str, Any]) -> None:
        if world.main:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, float) and math.isfinite(value):
                    writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    bar = tqdm(total=t.max_steps, initial=run.step, desc=recipe.name, unit="step", disable=not world.main,
               dynamic_ncols=True, file=sys.stderr)
    last: dict[str, float] = {}
    val: dict[str, float] = {}
    try:
        with _StopRequest().installed() as stop:
            while run.step < t.max_steps:
                started = time.perf_counter()
                last = run.train_step()
                run.train_seconds += time.perf_counter() - started
                tokens = run.step * tokens_per_step
                speed = tokens_per_step / max(time.perf_counter() - started, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{speed:,.0f}")
                if run.step % t.log_interval == 0 or run.step == t.max_steps:
                    log({"kind": "train", "step": run.step, **last, "tokens": tokens, "tokens_per_s": speed,
                         "train_seconds": run.train_seconds})
                if run.step % t.eval_interval == 0 or run.step == t.max_steps:
                    val = {"step": run.step, **run.evaluate("val")}
                    log({"kind": "eval", **val})
                    bar.set_postfix(loss=f"{last['loss']:.4f}", val_bpb=f"{val['val_bpb']:.3f}",
                                    tok_s=f"{speed:,.0f}")
                stopping = run.stop_requested(stop)
                if stopping or (run.step % t.checkpoint_interval == 0 and run.step < t.max_steps):
                    saved = run.save_checkpoint()
                    if stopping:
                        raise TrainingInterrupted(run.step, saved)
    finally:
        bar.close()
        if world.main:
            metrics_file.close()
            writer.close()

    if val.get("step") != run.step:  # resumed from a checkpoint of the last step
        val = {"step": run.step, **run.evaluate("val")}
    metrics: dict[str, Any] = {"name": recipe.name, "train_loss": last.get("loss"), **val, **run.evaluate("test"),
                               "parameters": run.parameters, "plt_num_loops": run.config.plt_num_loops,
                               "plt_loop_mode": run.config.plt_loop_mode,
                               "tokens": run.step * tokens_per_step, "train_seconds": run.train_seconds,
                               "tokens_per_s": run.step * tokens_per_step / max(run.train_seconds, 1e-9),
                               "world_size": world.size, "run_dir": str(run_dir),
                               "model_dir": str(run_dir / "model")}
    model_state, _ = run._full_state()
    if world.main:
        tmp = run_dir / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        run._save_model(tmp, model_state)
        _atomic_replace(tmp, run_dir / "model")
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        (run_dir / ".tmp-final.json").write_text(json.dumps(metrics, indent=2) + "\n")
        os.replace(run_dir / ".tmp-final.json", run_dir / FINAL_METRICS)
    run._barrier()
    return metrics


# ------------------------------------------------------------------------------------------------------ CLI


def format_metrics(metrics: dict[str, Any]) -> str:
    return (f"val loss {metrics['val_loss']:.4f}  val bpb {metrics['val_bpb']:.4f}  test bpb "
            f"{metrics['test_bpb']:.4f}  {metrics['tokens_per_s']:,.0f} tokens/s  "
            f"({metrics['tokens']:,} tokens in {metrics['train_seconds']:.0f} s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe file (.yaml or .toml), e.g. recipes/small.yaml")
    parser.add_argument("--run-dir", default=argparse.SUPPRESS, help="where checkpoints, metrics and the final "
                        "model go (default: runs/<recipe name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=argparse.SUPPRESS,
                        metavar="SECTION.FIELD=VALUE",
                        help="override a recipe field, e.g. --set train.lr=3e-4 --set model.plt_num_loops=1 "
                        "(values are YAML: [64, 0], true, null); repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its latest complete checkpoint")
    parser.epilog = ("Multi-process: torchrun --nproc-per-node N -m parloop.cli train RECIPE ... "
                     "(distributed.strategy=ddp or fsdp); see docs/training.md.")


def run(args: argparse.Namespace) -> int:
    main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    try:
        overrides = getattr(args, "overrides", [])
        recipe = load_recipe(args.recipe, overrides)
        run_dir = Path(getattr(args, "run_dir", None) or Path("runs") / recipe.name)
        metrics = train(recipe, run_dir, resume=args.resume)
    except (RecipeError, DataError) as e:
        if main:
            print(f"parloop train: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        if main:
            print(f"{e}\ncontinue with: parloop train {args.recipe} --run-dir {run_dir} --resume "
                  + " ".join(f"--set {o}" for o in overrides), file=sys.stderr)
        return 130
    if main:
        print(f"{recipe.name}: {format_metrics(metrics)}")
        print(f"run directory: {run_dir}  (final model: {metrics['model_dir']})")
    return 0
