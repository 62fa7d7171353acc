"""Per-loop diagnostics of a looped model (the probes behind LoopCoder-v2's "loop 2 refines, later loops
oscillate"), measured on held-out text.

For a model with R loops, with `h_r` the hidden state after loop r (`loop_states`, before any norm):

- logit lens: the next-token loss (nats per token) when `h_r` is read out through the final norm and the LM
  head, for every loop (the last loop's value is the model's own loss);
- relative update size of loop r >= 1: `||h_r - h_{r-1}|| / ||h_{r-1}||` per token, averaged over tokens
  (states are compared at the same position; in `parallel` mode loop r at t was fed loop r-1 at t-1, but both
  states stand for position t and predict token t+1);
- update cosine of loop r >= 2: cosine between `h_r - h_{r-1}` and `h_{r-1} - h_{r-2}` per token, averaged
  (near -1: the loop undoes the previous one, i.e. oscillation; near +1: it keeps going the same way);
- attention change of loop r >= 1 in each layer: Jensen–Shannon divergence (bits, in [0, 1]) between the
  global attention distributions of loops r and r-1 for the same query position and head, averaged over heads
  and positions. The global distribution of loop r is softmax(q_r K_0^T) over loop 0's keys (the shared-KV
  branch of G-SWA; for loop 0 its own causal attention); in `sequential` mode, over the loop's own keys;
- representational diversity of token states per loop, pooled over all tokens: the effective rank
  (Roy & Vetterli 2007: exp of the entropy of the normalised singular values) and the mean pairwise cosine;
- the G-SWA gate: mean weight on the global branch per layer and loop r >= 1;
- offset cost at each R (`offset_cost`): how much worse `parallel` is than `sequential_shared`, the same model
  without the cross-loop offset.

Attention distributions and gate values are not part of the model's output: the model's attention probe
(`PLTModel.set_attention_probe`) hands over each call's post-RoPE queries, global-branch keys, mask and gate, and the
attention distributions are recomputed here from them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from parloop.eval.tokens import encode
from parloop.model import AttentionRecord

# -- the measures, on tensors -----------------------------------------------------------------------------------

def relative_update(prev: torch.Tensor, cur: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over valid tokens of `||cur - prev|| / ||prev||`; states `[B, T, d]`, mask `[B, T]` bool."""
    ratio = (cur - prev).float().norm(dim=-1) / prev.float().norm(dim=-1).clamp_min(1e-12)
    return float(ratio[mask].mean())


def update_cosine(before: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over valid tokens of the cosine between the updates `cur - prev` and `prev - before` (0 where an
    update is zero)."""
    cos = F.cosine_similarity((cur - prev).float(), (prev - before).float(), dim=-1, eps=1e-12)
    return float(cos[mask].mean())


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence in bits between distributions along the last axis (0 = same, 1 = disjoint)."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm) / math.log(2)).clamp_min(0.0)


def effective_rank(gram: torch.Tensor) -> float:
    """Effective rank of a matrix X from its Gram matrix `X^T X`: exp(entropy of σ / Σσ), σ the singular
    values of X (1 for rank one, n for n orthogonal rows of equal norm)."""
    sigma = torch.linalg.eigvalsh(gram.double()).clamp_min(0.0).sqrt()
    p = sigma / sigma.sum()
    return float(torch.exp(-torch.xlogy(p, p).sum()))


def mean_pairwise_cosine(unit_sum: torch.Tensor, count: int) -> float:
    """Mean cosine over all pairs of distinct vectors, from the sum of the unit vectors and their count:
    `sum_{i != j} u_i . u_j = ||sum u||^2 - n`."""
    if count < 2:
        return float("nan")
    return float((unit_sum.double().pow(2).sum() - count) / (count * (count - 1)))


def offset_cost(parallel: float, sequential_shared: float, higher_is_better: bool) -> float:
    """How much worse `parallel` is than `sequential_shared` (positive: the cross-loop offset costs). For
    accuracies this is metric(sequential_shared) - metric(parallel); for losses and bits per byte, the reverse."""
    return sequential_shared - parallel if higher_is_better else parallel - sequential_shared


# -- hooks on the attention layers ------------------------------------------------------------------------------

class _AttentionProbe:
    """Receives every attention call of a cache-less forward pass (loops one after another, one stream each, via
    `PLTModel.set_attention_probe`) and accumulates, per layer, the JS divergence of each loop's global attention
    from the previous loop's and the mean gate of each loop."""

    def __init__(self, model: nn.Module, loops: int) -> None:
        self.base = model.model
        layers = model.config.num_hidden_layers
        self.js_sum = torch.zeros(layers, max(loops - 1, 0), dtype=torch.float64)
        self.gate_sum = torch.zeros(layers, max(loops - 1, 0), dtype=torch.float64)
        self.gated = False  # set once a gate has been seen
        self.query_mask: torch.Tensor | None = None  # [B, T] bool, set per batch
        self._probs: dict[int, torch.Tensor] = {}
        self.base.set_attention_probe(self._on_attention)

    def close(self) -> None:
        self.base.set_attention_probe(None)

    def start_batch(self, query_mask: torch.Tensor) -> None:
        self.query_mask = query_mask
        self._probs.clear()

    def _on_attention(self, record: AttentionRecord) -> None:
        if record.queries.shape[1] != 1:
            raise RuntimeError("loop diagnostics need a cache-less forward pass (loops one after another)")
        layer, loop, q = record.layer, record.first_loop, record.queries[:, 0]
        keys = record.keys.repeat_interleave(q.shape[1] // record.keys.shape[1], dim=1)
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        probs = scores.float().masked_fill(~record.mask, float("-inf")).softmax(-1)
        if loop > 0:
            js = js_divergence(self._probs[layer], probs).mean(1)  # [B, T], mean over heads
            self.js_sum[layer, loop - 1] += float(js[self.query_mask].sum())
        self._probs[layer] = probs
        if record.gate is not None:
            g = record.gate[:, 0, :, :, 0].float().mean(1)  # [B, T], mean over heads
            self.gate_sum[layer, loop - 1] += float(g[self.query_mask].sum())
            self.gated = True


# -- the whole set, over batches --------------------------------------------------------------------------------

@dataclass
class LoopDiagnostics:
    """Per-loop measures (list index = loop, or layer then loop); see the module docstring. Lists over loops
    r >= 1 start at loop 1, `update_cosine` at loop 2."""

    loops: int
    tokens: int
    logit_lens_loss: list[float]
    relative_update: list[float]
    update_cosine: list[float]
    attention_js: list[list[float]]
    effective_rank: list[float]
    mean_pairwise_cosine: list[float]
    gate_mean: list[list[float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def loop_diagnostics(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                     desc: str | None = None) -> LoopDiagnostics:
    """All per-loop measures of a parloop model over batches of `(input_ids [B, T], attention_mask or None)`.

    Token averages are over the positions the mask marks real; the logit lens scores positions whose next
    position is also real.
    """
    loops = model.config.plt_num_loops
    d = model.config.hidden_size
    probe = _AttentionProbe(model, loops)
    lens_sum = torch.zeros(loops, dtype=torch.float64)
    upd_sum = torch.zeros(max(loops - 1, 0), dtype=torch.float64)
    cos_sum = torch.zeros(max(loops - 2, 0), dtype=torch.float64)
    grams = torch.zeros(loops, d, d, dtype=torch.float64)
    unit_sums = torch.zeros(loops, d, dtype=torch.float64)
    tokens = lens_tokens = 0
    try:
        for ids, mask in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            probe.start_batch(valid)
            states = model(ids, attention_mask=mask, use_cache=False, output_loop_states=True).loop_states
            n = int(valid.sum())
            tokens += n
            scored = valid[:, :-1] & valid[:, 1:]
            lens_tokens += int(scored.sum())
            for r, h in enumerate(states):
                logits = model.lm_head(model.model.norm(h[:, :-1])).float()
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                      reduction="none").view(ids.shape[0], -1)
                lens_sum[r] += float(nll[scored].sum())
                x = h[valid].double()
                grams[r] += x.T @ x
                unit_sums[r] += F.normalize(x, dim=-1, eps=1e-12).sum(0)
                if r >= 1:
                    upd_sum[r - 1] += relative_update(states[r - 1], h, valid) * n
                if r >= 2:
                    cos_sum[r - 2] += update_cosine(states[r - 2], states[r - 1], h, valid) * n
    finally:
        probe.close()
    if tokens == 0:
        raise ValueError("loop diagnostics need at least one real token")
    return LoopDiagnostics(
        loops=loops, tokens=tokens,
        logit_lens_loss=(lens_sum / max(lens_tokens, 1)).tolist(),
        relative_update=(upd_sum / tokens).tolist(),
        update_cosine=(cos_sum / tokens).tolist(),
        attention_js=(probe.js_sum / tokens).tolist(),
        effective_rank=[effective_rank(g) for g in grams],
        mean_pairwise_cosine=[mean_pairwise_cosine(u, tokens) for u in unit_sums],
        gate_mean=(probe.gate_sum / tokens).tolist() if probe.gated else [],
    )


def text_batches(tokenizer: Any, texts: Sequence[str], context: int, batch_size: int, max_sequences: int,
                 device: torch.device) -> list[tuple[torch.Tensor, None]]:
    """Held-out texts cut into full, non-overlapping windows of `context` tokens, batched (no padding)."""
    windows: list[list[int]] = []
    for text in texts:
        ids = encode(tokenizer, text)
        windows += [ids[i:i + context] for i in range(0, len(ids) - context + 1, context)]
        if len(windows) >= max_sequences:
            break
    windows = windows[:max_sequences]
    if not windows:
        raise ValueError(f"no held-out text is {context} tokens long; pass a shorter context")
    return [(torch.tensor(windows[i:i + batch_size], device=device), None)
            for i in range(0, len(windows), batch_size)]


def diagnose(model: nn.Module, tokenizer: Any, texts: Sequence[str], context: int = 256, batch_size: int = 8,
             max_sequences: int = 64) -> dict[str, Any]:
    """`loop_diagnostics` over up to `max_sequences` windows of held-out text, as a JSON-ready dict."""
    if not hasattr(model.config, "plt_num_loops"):
        raise ValueError("loop diagnostics need a parloop (PLT) model: this checkpoint has no plt_num_loops")
    device = next(model.parameters()).device
    batches = text_batches(tokenizer, texts, context, batch_size, max_sequences, device)
    return loop_diagnostics(model, batches, desc="loop diagnostics").to_dict()
