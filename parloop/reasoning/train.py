"""Training one model of the reasoning track: parloop's own `PLTForCausalLM`, the trainer's AdamW and warm-up +
cosine schedule (`parloop.train.trainer.build_optimizer`), batches drawn fresh from the task's generator every
step (never a held-out instance), and the loss on answer tokens only."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from parloop.config import PLTConfig
from parloop.model import PLTForCausalLM
from parloop.reasoning.batch import IGNORE
from parloop.reasoning.tasks import Task, training_batch
from parloop.train.recipe import TrainRecipe
from parloop.train.trainer import build_optimizer


@dataclass(frozen=True)
class ReasoningRun:
    """One training run. `model` holds the PLTConfig fields the preset fixes (width, heads, loop settings);
    `curriculum` > 0 ramps the difficulty from 1 up to `difficulty` over that share of the steps (for every model
    alike)."""

    task: str
    difficulty: int
    layers: int
    loops: int
    mode: str
    seed: int
    lr: float
    steps: int
    batch_size: int
    filler: int = 0
    curriculum: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    model: dict[str, Any] = field(default_factory=dict, compare=False)
    task_options: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer positions only (labels IGNORE elsewhere; logits[:, t] predict labels[:, t])."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def build_model(run: ReasoningRun, task: Task) -> PLTForCausalLM:
    """The run's model, initialised from its seed (models of the same shape and seed start from the same weights)."""
    length = task.seq_len(run.difficulty, run.filler)
    config = PLTConfig(**run.model, vocab_size=task.vocab_size, num_hidden_layers=run.layers,
                       plt_num_loops=run.loops, plt_loop_mode=run.mode, max_position_embeddings=max(length, 8),
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(run.seed)
    return PLTForCausalLM(config)


def step_difficulty(run: ReasoningRun, step: int) -> int:
    """The difficulty of step `step`'s batch: `run.difficulty`, or ramping up to it under a curriculum."""
    if run.curriculum <= 0:
        return run.difficulty
    ramp = max(1, int(run.curriculum * run.steps))
    return min(run.difficulty, 1 + step * run.difficulty // ramp)


def train_model(run: ReasoningRun, task: Task, device: str = "cpu",
                progress: bool = False) -> tuple[PLTForCausalLM, dict[str, Any]]:
    """Train `run` on `device`; returns the model (in eval mode) and its training figures."""
    model = build_model(run, task).to(device)
    recipe = TrainRecipe(lr=run.lr, min_lr=run.lr * run.min_lr_ratio, max_steps=run.steps,
                         warmup_steps=min(run.warmup_steps, run.steps // 2), weight_decay=run.weight_decay)
    optimizer, scheduler = build_optimizer(model, recipe)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    for step in tqdm(range(run.steps), desc=f"{run.task} {run.difficulty} R={run.loops} {run.mode}",
                     disable=not progress, leave=False):
        batch = training_batch(task, run.seed, step, run.batch_size, step_difficulty(run, step), run.filler)
        logits = model(input_ids=torch.from_numpy(batch.inputs).to(device), use_cache=False).logits
        loss = answer_loss(logits, torch.from_numpy(batch.labels).to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return model, {"train_loss": sum(tail) / len(tail), "train_seconds": time.perf_counter() - started,
                   "parameters": model.num_used_parameters(), "loss_curve": losses[:: max(1, run.steps // 50)]}
