"""Recipes: the schema of a training run, read from YAML or TOML with dotted overrides (docs/training.md).

- `load_recipe(path, overrides)`: a `Recipe` from a YAML or TOML file; overrides are `"section.field=value"`
  strings (values parsed as YAML) or a `{"section.field": value}` mapping. Unknown fields and wrong types raise
  `RecipeError` naming the field.
- `Recipe.check(world_size)` and `check_corpus(recipe, corpus)`: the values that cannot train, refused before any
  work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

import parloop.config as config_module
from parloop.config import ConfigError, PLTConfig
from parloop.train.corpus import SPLITS, Corpus
from parloop.train.errors import DataError, RecipeError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# Filled from the corpus, so a recipe must not set them.
FROM_CORPUS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


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
    gradient_checkpointing: bool = False  # recompute each layer in the backward pass: less memory, ~1/3 more compute
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast dtype; auto = bfloat16 on capable GPUs
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False  # torch.compile the model for training (worth it on GPUs)
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
        values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
    except Exception as e:
        raise RecipeError(f"cannot parse recipe {path}: {e}") from None
    try:
        return recipe_from_dict(values, overrides)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def check_corpus(recipe: Recipe, corpus: Corpus) -> None:
    """Raise `RecipeError` / `DataError` if the recipe's model or windows do not fit `corpus`."""
    config = recipe.model_config(corpus)
    seq_len = recipe.train.seq_len
    if seq_len > config.max_position_embeddings:
        raise RecipeError(f"train.seq_len = {seq_len} is longer than model.max_position_embeddings = "
                          f"{config.max_position_embeddings}: lower train.seq_len or raise "
                          f"model.max_position_embeddings")
    for split in SPLITS:
        have = corpus.meta["splits"][split]["tokens"]
        if have < seq_len + 1:
            raise DataError(f"the {split} split of {corpus.path} has {have} tokens, fewer than train.seq_len + 1 = "
                            f"{seq_len + 1}: lower train.seq_len or build a larger corpus")
