"""Held-out evaluation of a reasoning model: exact-match accuracy (greedy: an instance is right when the argmax at
every one of its answer positions is the answer, which is what greedy decoding would produce), the same read out
through the final norm and head after each loop (which loop solves it), the mean cross-entropy of the answer
tokens, and the study's per-loop diagnostics
(`parloop.eval.diagnostics`: gate weight on the global branch, relative update size) on held-out inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from parloop.eval.diagnostics import loop_diagnostics
from parloop.reasoning.batch import IGNORE, Batch


def _accuracy(correct: np.ndarray, labels: np.ndarray, per_position: bool) -> float:
    answer = labels != IGNORE
    if per_position:
        return float(correct[answer].mean())
    return float((correct | ~answer).all(axis=1).mean())


@torch.no_grad()
def evaluate(model: Any, held_out: Batch, batch_size: int = 256, diagnostic_rows: int = 64) -> dict[str, Any]:
    """Accuracy on `held_out`, per-loop accuracy, and (R >= 2) gate and update diagnostics."""
    loops = model.config.plt_num_loops
    device = next(model.parameters()).device
    preds: list[list[np.ndarray]] = [[] for _ in range(loops)]
    nats = 0.0
    for i in range(0, len(held_out), batch_size):
        ids = torch.from_numpy(held_out.inputs[i:i + batch_size]).to(device)
        out = model(input_ids=ids, use_cache=False, output_loop_states=loops > 1)
        labels = torch.from_numpy(held_out.labels[i:i + batch_size]).to(device)
        nats += float(F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                      reduction="sum"))
        states = out.loop_states if loops > 1 else None
        for r in range(loops):
            logits = out.logits if r == loops - 1 else model.lm_head(model.model.norm(states[r]))
            preds[r].append(logits.argmax(-1).cpu().numpy())
    labels = held_out.labels
    per_loop = [_accuracy(np.concatenate(p) == labels, labels, held_out.per_position) for p in preds]
    result: dict[str, Any] = {"accuracy": per_loop[-1], "instances": held_out.instances(),
                              "answer_loss": nats / int((labels != IGNORE).sum()), "per_loop_accuracy": per_loop}
    if loops > 1:
        ids = torch.from_numpy(held_out.inputs[:diagnostic_rows]).to(device)
        diag = loop_diagnostics(model, [(ids, None)])
        result["gate_mean"] = diag.gate_mean
        result["relative_update"] = diag.relative_update
    return result
