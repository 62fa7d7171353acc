"""Training PLT models from recipes, on one process or many (`parloop train`; docs/training.md).

Python API (used by `parloop train`, the quickstart and the loop-count study):

    from parloop.train.recipe import load_recipe
    from parloop.train.trainer import train
    recipe = load_recipe("recipes/small.yaml", ["model.plt_num_loops=3", "train.max_steps=500"])
    metrics = train(recipe, "runs/small-r3", resume=True)
    metrics["val_bpb"], metrics["model_dir"]

- `train(recipe, run_dir, resume=False) -> dict`: trains and returns the final metrics (`val_loss`, `val_bpb`,
  `test_loss`, `test_bpb`, `train_loss`, `tokens_per_s`, `parameters`, `model_dir`, ...). A finished run (its
  `final_metrics.json` exists and was made by the same recipe) is returned without training again. With
  `resume=True` an unfinished run continues from its latest complete checkpoint, and the following losses equal
  those of a run that was never stopped; without it, a run directory that holds checkpoints is an error.
- Under `torchrun` (WORLD_SIZE > 1) the same call trains with DDP or FSDP2 (`distributed.strategy`): every rank
  calls it, rank 0 writes the files, every rank gets the metrics.
- Ctrl-C (SIGINT) or SIGTERM: the current step finishes, a checkpoint is saved and `TrainingInterrupted` is raised.

The run directory's layout is described in `parloop.train.checkpointer`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from tqdm import tqdm

from parloop.config import PLTConfig
from parloop.model import PLTForCausalLM
from parloop.train.checkpointer import (
    MODEL_DIR,
    Checkpointer,
    prepare_run_dir,
    start_run_dir,
    write_final_metrics,
)
from parloop.train.corpus import Corpus, TokenWindows
from parloop.train.distributed import StopRequest, World, gradient_sync, parallelize, pick_device, process_group
from parloop.train.errors import TrainingInterrupted
from parloop.train.metrics import METRICS_FILE, MetricsLog, plot_curves, say
from parloop.train.recipe import Recipe, TrainRecipe, check_corpus


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then a cosine down to `min_ratio` at `max_steps` (times the peak lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, t: TrainRecipe) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """AdamW (weight decay on matrices and embeddings only) and its warm-up + cosine LR schedule."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    scheduler = LambdaLR(optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, t.min_lr / t.lr))
    return optimizer, scheduler


class Trainer:
    """The model, optimizer and data of one training run on this process: `train_step` and `evaluate`.

    It is the `TrainingState` a `Checkpointer` saves: `model` (parallelized), `raw_model`, `optimizer`,
    `scheduler`, `step` and `train_seconds`.
    """

    def __init__(self, recipe: Recipe, corpus: Corpus, world: World) -> None:
        self.recipe, self.world = recipe, world
        t = recipe.train
        self.device = pick_device(t.device, world)
        use_bf16 = t.dtype == "bfloat16" or (
            t.dtype == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_bf16)
        self.accumulation = t.batch_size // (world.size * t.micro_batch_size)
        self.config = recipe.model_config(corpus)
        self.train_windows = TokenWindows(corpus.tokens("train"), t.seq_len)
        self.eval_windows = {s: TokenWindows(corpus.tokens(s), t.seq_len) for s in ("val", "test")}
        self.token_bytes = torch.from_numpy(corpus.token_bytes()).to(self.device)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.raw_model = PLTForCausalLM(self.config).to(self.device)
        if t.gradient_checkpointing:
            self.raw_model.gradient_checkpointing_enable()
        self.parameters = self.raw_model.num_used_parameters()
        if t.compile:
            self.raw_model.compile()  # in place: parameter names and checkpoints stay those of the eager model
        self.model = parallelize(self.raw_model, world, recipe.distributed.strategy)
        self.optimizer, self.scheduler = build_optimizer(self.model, t)
        self.step = 0
        self.train_seconds = 0.0

    def _micro_batches(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of global step `step`: rows of the step's global batch, a pure function of
        (seed, step), so any world size and any resume point see the same global batch."""
        t, micro = self.recipe.train, self.recipe.train.micro_batch_size
        per_rank = t.batch_size // self.world.size
        first = step * t.batch_size + self.world.rank * per_rank
        for m in range(self.accumulation):
            windows = self.train_windows.get(self.train_windows.shuffled(t.seed, first + m * micro, micro))
            batch = torch.from_numpy(windows).to(self.device)
            yield batch[:, :-1], batch[:, 1:]

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        with torch.autocast(**self.autocast):
            logits = self.model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction=reduction)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch; returns its mean loss (over all ranks) and gradient norm."""
        self.model.train()
        total = torch.zeros((), device=self.device)
        for m, (inputs, targets) in enumerate(self._micro_batches(self.step)):
            with gradient_sync(self.model, sync=m == self.accumulation - 1):
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
        loss = self.world.all_reduce(total / self.accumulation) / self.world.size
        return {"loss": float(loss), "lr": lr, "grad_norm": grad_norm}

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
        self.world.all_reduce(sums)
        nats, tokens, nbytes = sums.tolist()
        return {f"{split}_loss": nats / tokens, f"{split}_bpb": nats / math.log(2) / nbytes}


# ------------------------------------------------------------------------------------------------- the loop


def train(recipe: Recipe, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train `recipe` into `run_dir` and return the final metrics (see the module docstring)."""
    world = World.from_env()
    recipe.check(world.size)
    corpus = Corpus(recipe.data.dir)
    check_corpus(recipe, corpus)
    run_dir = Path(run_dir)
    finished = prepare_run_dir(recipe, run_dir, resume)
    if finished is not None:
        if world.main:
            say(f"{run_dir} is already trained; returning its final metrics")
        return finished
    with process_group(world, recipe.distributed.backend, recipe.train.device):
        return _train(recipe, run_dir, corpus, world, resume)


def _train(recipe: Recipe, run_dir: Path, corpus: Corpus, world: World, resume: bool) -> dict[str, Any]:
    if world.main:
        start_run_dir(recipe, run_dir)
    trainer = Trainer(recipe, corpus, world)
    checkpointer = Checkpointer(run_dir, world, recipe.train, corpus.tokenizer() if world.main else None)
    checkpoint = checkpointer.latest() if resume else None
    if checkpoint is not None:
        checkpointer.load(trainer, checkpoint)
        if world.main:
            say(f"resuming from {checkpoint} (step {trainer.step})")
    t = recipe.train
    if world.main:
        say(f"{recipe.name}: {trainer.parameters / 1e6:.2f}M parameters, {_loops(trainer.config)}, "
            f"{world.size} process(es) on {trainer.device}, "
            f"{trainer.accumulation} accumulation step(s), {t.max_steps} steps of {t.batch_size * t.seq_len:,} "
            f"tokens")
    last, val = _loop(trainer, checkpointer, MetricsLog(run_dir, trainer.step, enabled=world.main))
    if val.get("step") != trainer.step:  # resumed from a checkpoint of the last step
        val = {"step": trainer.step, **trainer.evaluate("val")}
    metrics = _final_metrics(trainer, run_dir, last, val)
    checkpointer.save_final_model(trainer)
    if world.main:
        plot_curves(run_dir / METRICS_FILE, run_dir / "curves.png",
                    f"{recipe.name}: {_loops(trainer.config)}, seed {t.seed}")
        write_final_metrics(run_dir, metrics)
    world.barrier()
    return metrics


def _loops(config: PLTConfig) -> str:
    """"R = 1" (a plain model: no loop mode), or e.g. "R = 2 (parallel)"."""
    return "R = 1" if config.plt_num_loops == 1 else f"R = {config.plt_num_loops} ({config.plt_loop_mode})"


def _loop(trainer: Trainer, checkpointer: Checkpointer, log: MetricsLog) -> tuple[dict[str, float], dict[str, Any]]:
    """Train to `max_steps`, logging, evaluating and checkpointing; returns the last step's and evaluation's
    metrics. A stop request saves a checkpoint and raises `TrainingInterrupted`."""
    t = trainer.recipe.train
    bar = tqdm(total=t.max_steps, initial=trainer.step, desc=trainer.recipe.name, unit="step",
               disable=not trainer.world.main, dynamic_ncols=True, file=sys.stderr)
    last: dict[str, float] = {}
    val: dict[str, Any] = {}
    try:
        with StopRequest().installed() as stop:
            while trainer.step < t.max_steps:
                started = time.perf_counter()
                last = trainer.train_step()
                elapsed = time.perf_counter() - started
                trainer.train_seconds += elapsed
                val = _report(trainer, last, t.batch_size * t.seq_len / max(elapsed, 1e-9), log, bar) or val
                stopping = stop.agreed(trainer.world, trainer.device)
                if stopping or (trainer.step % t.checkpoint_interval == 0 and trainer.step < t.max_steps):
                    saved = checkpointer.save(trainer)
                    if stopping:
                        raise TrainingInterrupted(trainer.step, saved)
    finally:
        bar.close()
        log.close()
    return last, val


def _report(trainer: Trainer, last: dict[str, float], speed: float, log: MetricsLog,
            bar: tqdm) -> dict[str, Any] | None:
    """Progress bar and logs after a step; evaluates on the validation split when due and returns the result."""
    t, step = trainer.recipe.train, trainer.step
    bar.update(1)
    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{speed:,.0f}")
    if step % t.log_interval == 0 or step == t.max_steps:
        log.write({"kind": "train", "step": step, **last, "tokens": step * t.batch_size * t.seq_len,
                   "tokens_per_s": speed, "train_seconds": trainer.train_seconds})
    if step % t.eval_interval and step != t.max_steps:
        return None
    val = {"step": step, **trainer.evaluate("val")}
    log.write({"kind": "eval", **val})
    bar.set_postfix(loss=f"{last['loss']:.4f}", val_bpb=f"{val['val_bpb']:.3f}", tok_s=f"{speed:,.0f}")
    return val


def _final_metrics(trainer: Trainer, run_dir: Path, last: dict[str, float], val: dict[str, Any]) -> dict[str, Any]:
    """The metrics `train` returns and saves: last training loss, validation and test scores, speed, sizes."""
    tokens = trainer.step * trainer.recipe.train.batch_size * trainer.recipe.train.seq_len
    return {"name": trainer.recipe.name, "train_loss": last.get("loss"), **val, **trainer.evaluate("test"),
            "parameters": trainer.parameters, "plt_num_loops": trainer.config.plt_num_loops,
            "plt_loop_mode": trainer.config.plt_loop_mode,
            "tokens": tokens, "train_seconds": trainer.train_seconds,
            "tokens_per_s": tokens / max(trainer.train_seconds, 1e-9),
            "world_size": trainer.world.size, "run_dir": str(run_dir), "model_dir": str(run_dir / MODEL_DIR)}
