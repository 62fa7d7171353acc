"""Continuous batching: many sequences decode together through one `PLTCache`, joining and leaving at any step.

The engine keeps one batched cache whose rows are sequences and whose slot axis is shared (DESIGN.md section 3):
every row's tokens end at the last slot, shorter rows are left-padded (`valid=False`). Masks and RoPE positions
come from `valid`/`real`, so rows of different lengths decode in one forward call, all R loops stacked.

A scheduler step (`Engine.step`), run by one thread:
1. frees the rows of cancelled sequences;
2. admits waiting sequences (FIFO) while a row and the cached-token budget allow, prefills them together in a
   left-padded batch, samples each one's first token and moves its cache into a free row (`PLTCache.insert_row`);
3. runs one decode step for all rows and samples the next token of every active sequence;
4. frees finished rows at once, drops trailing free rows and compacts the slot axis (`PLTCache.shift_slots`) so that no
   slot is padding in every row.

The row and slot surgery itself (`resize_rows`, `shift_slots`, `clear_row`, `insert_row`) is `PLTCache`'s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from parloop.cache import PLTCache
from parloop.model import PLTForCausalLM
from parloop.padding import left_pad

log = logging.getLogger(__name__)

# Why a sequence ended: an end-of-sequence token or a stop string its consumer saw, its max_tokens, cancelled by its
# consumer, or an engine failure.
FINISH_REASONS = ("stop", "length", "cancelled", "error")

# (token id or None, finish reason or None); called on the engine thread, so it must be quick and not block
Listener = Callable[[int | None, str | None], None]


# -- requests -------------------------------------------------------------------------------------------------------
class LimitError(ValueError):
    """A request the engine cannot take under its limits; `limit` names the limit (the server option)."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature` 0 is greedy; `max_tokens` None means as many as the limits allow."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(eq=False)
class Sequence:
    """One sequence in the engine: its prompt, its tokens so far, and timings (`time.perf_counter` seconds)."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    listener: Listener
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: str | None = None  # set by `Engine.cancel`: the finish reason to record
    generator: torch.Generator | None = None

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_tokens


# -- the engine -----------------------------------------------------------------------------------------------------
class Engine:
    """Continuous-batching decoder over a `PLTForCausalLM`.

    `submit` and `cancel` may be called from any thread; `step` (or the thread that `start` runs) does all model
    work. Limits: `max_batch_size` sequences decode together (1 disables batching); `max_cached_tokens` bounds
    the sum of prompt + max_tokens over running sequences; `max_prompt_tokens` and `max_model_len` (prompt +
    max_tokens) bound a single request.
    """

    def __init__(self, model: PLTForCausalLM, *, max_batch_size: int = 16, max_cached_tokens: int | None = None,
                 max_prompt_tokens: int | None = None, max_model_len: int | None = None,
                 eos_token_ids: set[int] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        config = model.config
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len or config.max_position_embeddings
        self.max_prompt_tokens = min(max_prompt_tokens or self.max_model_len, self.max_model_len)
        self.max_cached_tokens = max_cached_tokens or self.max_batch_size * self.max_model_len
        if eos_token_ids is None:
            eos = model.generation_config.eos_token_id
            eos_token_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = config.pad_token_id or 0

        self.cache = PLTCache(config, max_length=256)
        self.rows: list[Sequence | None] = []
        self._waiting: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

        # statistics, written by the engine thread only
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.finished_total: Counter[str] = Counter()
        self.kv_cache_bytes_in_use = 0

    # -- what callers use ------------------------------------------------------------------------------------------
    def check(self, prompt_tokens: int, max_tokens: int | None, n: int = 1) -> int:
        """Raise `LimitError` if `n` sequences of this size can never run; return the effective max_tokens."""
        if n > self.max_batch_size:
            raise LimitError("max_batch_size", f"n = {n} choices exceed the server's max batch size "
                             f"{self.max_batch_size}; ask for fewer choices or raise --max-batch-size")
        if prompt_tokens < 1:
            raise LimitError("prompt", "the prompt is empty: give at least one token")
        if prompt_tokens > self.max_prompt_tokens:
            raise LimitError("max_prompt_tokens", f"the prompt has {prompt_tokens} tokens, over the limit of "
                             f"{self.max_prompt_tokens} (--max-prompt-tokens); shorten the prompt")
        room = min(self.max_model_len, self.max_cached_tokens) - prompt_tokens
        if max_tokens is None:
            max_tokens = room
        if max_tokens < 1 or prompt_tokens + max_tokens > self.max_model_len:
            raise LimitError("max_model_len", f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) "
                             f"exceed the context length {self.max_model_len} (--max-model-len); lower max_tokens "
                             "or shorten the prompt")
        if prompt_tokens + max_tokens > self.max_cached_tokens:
            raise LimitError("max_cached_tokens", f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) "
                             f"exceed the cached-token budget {self.max_cached_tokens} (--max-cached-tokens); "
                             "lower max_tokens or shorten the prompt")
        return max_tokens

    def submit(self, prompt_ids: list[int], params: SamplingParams, listener: Listener) -> Sequence:
        """Queue a sequence; `listener(token, finish_reason)` receives each token as it is sampled (the last one
        with its finish reason). Raises `LimitError` if it can never run."""
        max_tokens = self.check(len(prompt_ids), params.max_tokens)
        seq = Sequence(list(prompt_ids), params, max_tokens, listener)
        if params.temperature > 0:
            seq.generator = torch.Generator(device=self.model.device)
            if params.seed is None:
                seq.generator.seed()
            else:
                seq.generator.manual_seed(params.seed)
        with self._wake:
            self._waiting.append(seq)
            self._wake.notify()
        return seq

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stop `seq`: its consumer went away ("cancelled") or saw a stop string ("stop"). Its row is freed at the
        next step boundary; a finished sequence stays as it is."""
        with self._wake:
            seq.cancelled = seq.cancelled or reason
            self._wake.notify()

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return sum(seq is not None for seq in self.rows)

    def is_running(self) -> bool:
        """Whether the background thread that `start` began is alive."""
        return self._thread is not None and self._thread.is_alive()

    def has_work(self) -> bool:
        return bool(self._waiting) or any(seq is not None for seq in self.rows)

    def step(self) -> None:
        """One scheduler step: free cancelled rows, admit and prefill waiting sequences, decode one token for
        every active row, free finished rows and tidy the cache."""
        with torch.inference_mode():
            with self._wake:
                dropped = [seq for seq in self._waiting if seq.cancelled]
                for seq in dropped:
                    self._waiting.remove(seq)
            for seq in dropped:
                self._finish(seq, seq.cancelled)
            for row, seq in enumerate(self.rows):
                if seq is not None and seq.cancelled:
                    self._finish(seq, seq.cancelled)
                    self._free(row)
            admitted = self._admit()
            if admitted:
                self._prefill(admitted)
            if any(seq is not None for seq in self.rows):
                self._decode()
            self._tidy()

    def run_until_done(self) -> None:
        """Step until nothing is waiting or running (for callers that do not run the engine thread)."""
        while self.has_work():
            self.step()

    def start(self) -> None:
        """Run the scheduler on a background thread until `stop`."""
        self._stopping = False
        # torch's intra-op thread count is per OS thread under OpenMP: carry the caller's setting over
        self._thread = threading.Thread(target=self._run, args=(torch.get_num_threads(),), name="parloop-engine",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- scheduling ------------------------------------------------------------------------------------------------
    def _run(self, threads: int) -> None:
        torch.set_num_threads(threads)
        while True:
            with self._wake:
                while not self._stopping and not self.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:
                # one bad step must not take the server down: fail what was running, start from an empty cache
                log.exception("engine step failed; failing %d running and waiting sequences", self._fail_all())

    def _fail_all(self) -> int:
        with self._wake:
            victims = [seq for seq in self.rows if seq is not None] + list(self._waiting)
            self._waiting.clear()
        for seq in victims:
            self._finish(seq, "error")
        self.rows = []
        self.cache.reset()
        return len(victims)

    def _admit(self) -> list[Sequence]:
        running = [seq for seq in self.rows if seq is not None]
        free_rows = self.max_batch_size - len(running)
        budget = self.max_cached_tokens - sum(seq.reserved_tokens for seq in running)
        admitted = []
        with self._wake:
            while self._waiting and len(admitted) < free_rows and self._waiting[0].reserved_tokens <= budget:
                seq = self._waiting.popleft()
                budget -= seq.reserved_tokens
                admitted.append(seq)
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` as one left-padded batch, sample their first tokens, move the unfinished ones into rows."""
        device = self.model.device
        ids, mask = left_pad([seq.prompt_ids for seq in seqs], self.pad_token_id)
        width = ids.shape[1]
        prefill = PLTCache(self.model.config, max_length=width)
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=prefill,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        self.prompt_tokens_total += int(mask.sum())
        for i, (seq, token) in enumerate(zip(seqs, self._sample(logits, seqs), strict=True)):
            if self._emit(seq, token):
                continue
            if not self.cache.allocated:
                self.cache.allocate(0, self.model.dtype, device)
            row = self._free_row()
            self.cache.insert_row(row, prefill, i)
            self.rows[row] = seq

    def _free_row(self) -> int:
        for row, seq in enumerate(self.rows):
            if seq is None:
                return row
        self.rows.append(None)
        self.cache.resize_rows(len(self.rows))
        return len(self.rows) - 1

    def _decode(self) -> None:
        rows = len(self.rows)
        ids = torch.full((rows, 1), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(self.rows):
            if seq is not None:
                ids[row, 0] = seq.output_ids[-1]
                mask[row, 0] = 1
        device = self.model.device
        # the mask makes a free row's new slot padding, so free rows stay empty and never block compaction
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=self.cache,
                            use_cache=True).logits[:, -1]
        active = [row for row, seq in enumerate(self.rows) if seq is not None]
        seqs = [self.rows[row] for row in active]
        for row, seq, token in zip(active, seqs, self._sample(logits[active], seqs), strict=True):
            if self._emit(seq, token):
                self._free(row)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Next token per row: argmax at temperature 0, else nucleus sampling with the sequence's own generator
        (so a seeded sequence draws the same tokens whatever else is in the batch)."""
        tokens = logits.argmax(-1).tolist()
        for i, seq in enumerate(seqs):
            params = seq.params
            if params.temperature == 0:
                continue
            probs = torch.softmax(logits[i].float() / params.temperature, dim=-1)
            if params.top_p < 1:
                sorted_probs, order = probs.sort(descending=True)
                # keep the smallest prefix whose mass reaches top_p (always at least the top token)
                outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
                probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0))
            tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
        return tokens

    def _emit(self, seq: Sequence, token: int) -> bool:
        """Hand `token` to the sequence's listener; return whether the sequence is finished."""
        if seq.cancelled:
            self._finish(seq, seq.cancelled)
            return True
        now = time.perf_counter()
        seq.output_ids.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = now
        self.generated_tokens_total += 1
        reason = ("stop" if token in self.eos_token_ids
                  else "length" if len(seq.output_ids) >= seq.max_tokens else None)
        if reason is not None:
            seq.finish_reason, seq.finished_at = reason, now
            self.finished_total[reason] += 1
        self._notify(seq, token, reason)
        if seq.cancelled:  # by its consumer, possibly on seeing this very token
            self._finish(seq, seq.cancelled)
        return seq.finish_reason is not None

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason, seq.finished_at = reason, time.perf_counter()
        self.finished_total[reason] += 1
        if reason == "error":
            self._notify(seq, None, reason)

    def _notify(self, seq: Sequence, token: int | None, reason: str | None) -> None:
        try:
            seq.listener(token, reason)
        except Exception:
            log.exception("a sequence's listener failed; cancelling the sequence")
            seq.cancelled = "cancelled"

    def _free(self, row: int) -> None:
        self.cache.clear_row(row)
        self.rows[row] = None

    def _tidy(self) -> None:
        """Drop trailing free rows and slots that are padding in every row; release the cache when idle."""
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
        if not self.rows:
            self.cache.reset()
            self.kv_cache_bytes_in_use = 0
            return
        if self.cache.batch_size > len(self.rows):
            self.cache.resize_rows(len(self.rows))
        self.cache.compact()
        self.kv_cache_bytes_in_use = self.cache.kv_bytes_in_use()
