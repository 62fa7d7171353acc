"""The model side of continuous batching: one `PLTCache` whose rows are sequences, and the forward calls on it.

Every row's tokens end at the cache's last slot; shorter rows are left-padded, so rows of different lengths decode
in one forward call, all R loops stacked (docs/design.md §3). Row and slot surgery is the `RowCache`'s
(`inference/rows.py`); the runner only says which rows, never reads its buffers. Which rows are in use is the
scheduler's to decide; the runner keeps no count of its own (the cache's `batch_size` is how many it holds).
"""

from __future__ import annotations

import torch

from parloop.cache import PLTCache
from parloop.inference.rows import RowCache
from parloop.inference.sampling import TokenLogprob, token_logprobs
from parloop.model import PLTForCausalLM
from parloop.padding import left_pad

# prompt positions scored at once for echo: bounds the [positions, vocab] logits held in memory
SCORE_CHUNK = 256


class ModelRunner:
    """Owns the model and the batched cache."""

    def __init__(self, model: PLTForCausalLM) -> None:
        self.model = model.eval()
        self.cache = RowCache(model.config, max_length=256)
        self.pad_token_id = model.config.pad_token_id or 0

    def prefill(self, prompts: list[list[int]], keep_hidden: bool = False
                ) -> tuple[torch.Tensor, PLTCache, torch.Tensor | None]:
        """Run `prompts` as one left-padded batch in a cache of their own; return each prompt's last-token logits
        `[B, V]`, that cache (from which `insert` moves sequences into rows) and, with `keep_hidden`, the final
        hidden states `[B, T, H]` from which `logits` scores every prompt position."""
        device = self.model.device
        ids, mask = left_pad(prompts, self.pad_token_id)
        prefilled = PLTCache(self.model.config, max_length=ids.shape[1])
        ids, mask = ids.to(device), mask.to(device)
        if not keep_hidden:
            logits = self.model(input_ids=ids, attention_mask=mask, past_key_values=prefilled, use_cache=True,
                                logits_to_keep=1).logits[:, -1]
            return logits, prefilled, None
        # the hidden states, not all logits: [B, T, V] logits of a large vocabulary would not fit in memory
        hidden = self.model.model(ids, mask, past_key_values=prefilled, use_cache=True).last_hidden_state
        return self.logits(hidden[:, -1]), prefilled, hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits for final hidden states (its language-model head)."""
        return self.model.lm_head(hidden)

    def score_prompt(self, prompt_ids: list[int], hidden: torch.Tensor, alternatives: int
                     ) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it, with `alternatives` most likely others
        (`hidden`: the row's final hidden states, the prompt at its end); the first token has none."""
        ids = torch.tensor(prompt_ids)
        states = hidden[hidden.shape[0] - len(ids):-1]
        scored: list[TokenLogprob | None] = [None]
        for start in range(0, len(states), SCORE_CHUNK):
            chunk = self.logits(states[start:start + SCORE_CHUNK])
            scored += token_logprobs(chunk, ids[start + 1:start + 1 + SCORE_CHUNK], alternatives)
        return scored

    def insert(self, row: int, prefilled: PLTCache, index: int) -> None:
        """Move sequence `index` of a `prefill` cache into `row`, adding rows up to it when the cache has fewer."""
        if not self.cache.allocated:
            self.cache.allocate(0, self.model.dtype, self.model.device)
        if row >= self.cache.batch_size:
            self.cache.resize_rows(row + 1)
        self.cache.insert_row(row, prefilled, index)

    def decode(self, tokens: list[int | None]) -> torch.Tensor:
        """One decode step: `tokens[row]` is the row's newest token (None: a free row); return logits `[rows, V]`."""
        ids = torch.tensor([[self.pad_token_id if t is None else t] for t in tokens], dtype=torch.long)
        # the mask makes a free row's new slot padding, so free rows stay empty and never block compaction
        mask = torch.tensor([[t is not None] for t in tokens], dtype=torch.long)
        device = self.model.device
        return self.model(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=self.cache,
                          use_cache=True).logits[:, -1]

    def free(self, row: int) -> None:
        self.cache.clear_row(row)

    def fit(self, rows: int) -> int:
        """Keep only the first `rows` rows and drop slots that are padding in every row (releasing the cache when
        no row is left); return the bytes of keys and values the rows' tokens hold."""
        if rows == 0:
            self.reset()
            return 0
        if self.cache.batch_size > rows:
            self.cache.resize_rows(rows)
        self.cache.compact()
        return self.cache.kv_bytes_in_use()

    def reset(self) -> None:
        """Release every buffer of the cache (after a failed step, or when idle)."""
        self.cache.reset()
