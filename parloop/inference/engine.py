"""Continuous batching: many sequences decode together through one cache, joining and leaving at any step.

The engine ties three parts: the `Scheduler` (tensor-free: waiting queue, limits, rows), the `ModelRunner` (model
and cache: prefill, decode, row surgery) and `sample`. One scheduler step (`Engine.step`), run by one thread:
1. finishes cancelled sequences and frees their rows;
2. admits waiting sequences (FIFO) while a row and the cached-token budget allow, prefills them together, samples
   each one's first token and moves the unfinished ones into free rows;
3. runs one decode step for all rows and samples the next token of every running sequence;
4. frees finished rows at once, drops trailing free rows and compacts the cache's slot axis.
Tokens reach each sequence's consumer through its `Listener`, on the engine thread.

Nothing one sequence brings can fail another: its token is picked, scored and handed to its listener under its own
`try`, so a failure there finishes that sequence alone with "error". A failed prefill fails the sequences it was
prefilling (they have a cache of their own); only a failed decode call or cache update fails a whole step, and then
every sequence in it (running, waiting, or admitted and not yet placed in a row) finishes with "error".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from parloop.cache import PLTCache
from parloop.inference.runner import ModelRunner
from parloop.inference.sampling import (
    SamplingParams,
    TokenLogprob,
    greedy_tokens,
    make_generator,
    pick,
    token_logprobs,
)
from parloop.inference.scheduler import LimitError, Limits, QueueFull, Scheduler
from parloop.model import PLTForCausalLM

__all__ = ["FINISH_REASONS", "Engine", "LimitError", "Listener", "QueueFull", "SamplingParams", "Sequence"]

log = logging.getLogger(__name__)

# Why a sequence ended: an end-of-sequence token or a stop string its consumer saw, its max_tokens, cancelled by its
# consumer, or an engine failure.
FINISH_REASONS = ("stop", "length", "cancelled", "error")

# (token id or None, finish reason or None); called on the engine thread, so it must be quick and not block.
# A token's log-probability, when asked for, is in the sequence's `output_logprobs` before its listener hears of it.
Listener = Callable[[int | None, str | None], None]


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
    last_token_at: float | None = None
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # when params.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when params.prompt_logprobs is set; first is None

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_tokens

    def append(self, token: int, eos_token_ids: set[int]) -> str | None:
        """Record a new token; return the finish reason it brings ("stop": an end-of-sequence token, "length": the
        last of max_tokens), or None."""
        now = time.perf_counter()
        self.output_ids.append(token)
        self.last_token_at = now
        if self.first_token_at is None:
            self.first_token_at = now
        reason = "stop" if token in eos_token_ids else "length" if len(self.output_ids) >= self.max_tokens else None
        if reason is not None:
            self.finish_reason, self.finished_at = reason, now
        return reason

    def finish(self, reason: str) -> bool:
        """End the sequence with `reason` unless it has ended; return whether it ended now. Its consumer hears of an
        "error" or "length" here (nobody else tells it; "length": a prompt-only sequence)."""
        if self.finish_reason is not None:
            return False
        self.finish_reason, self.finished_at = reason, time.perf_counter()
        if reason in ("error", "length"):
            self.notify(None, reason)
        return True

    def notify(self, token: int | None, reason: str | None) -> None:
        """Tell the listener; a listener that fails cancels its sequence and nothing else."""
        try:
            self.listener(token, reason)
        except Exception:
            log.exception("a sequence's listener failed; cancelling the sequence")
            self.cancelled = "cancelled"


def _eos_token_ids(model: PLTForCausalLM) -> set[int]:
    """The end-of-sequence tokens of the model's generation config."""
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


class Engine:
    """Continuous-batching decoder over a `PLTForCausalLM`, within `Limits` (see there).

    `submit` and `cancel` may be called from any thread; `step` (or the thread that `start` runs) does all model
    work.
    """

    def __init__(self, model: PLTForCausalLM, *, max_batch_size: int = 16, max_cached_tokens: int | None = None,
                 max_prompt_tokens: int | None = None, max_model_len: int | None = None,
                 max_queued_sequences: int | None = None, eos_token_ids: set[int] | None = None) -> None:
        self.limits = Limits.resolve(model.config.max_position_embeddings, max_batch_size, max_cached_tokens,
                                     max_prompt_tokens, max_model_len, max_queued_sequences)
        self.scheduler: Scheduler[Sequence] = Scheduler(self.limits)
        self.runner = ModelRunner(model)
        self.eos_token_ids = _eos_token_ids(model) if eos_token_ids is None else eos_token_ids
        self._wake = threading.Condition()  # guards the waiting queue and wakes the engine thread
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._admitted: list[Sequence] = []  # admitted by the current step and not yet in a row

        # statistics, written by the engine thread only
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.finished_total: Counter[str] = Counter()
        self.kv_cache_bytes_in_use = 0

    # -- what callers use ------------------------------------------------------------------------------------------
    @property
    def model(self) -> PLTForCausalLM:
        return self.runner.model

    @property
    def cache(self) -> PLTCache:
        return self.runner.cache

    def check(self, prompt_tokens: int, max_tokens: int | None, n: int = 1) -> int:
        """Raise `LimitError` if `n` sequences of this size can never run; return the effective max_tokens."""
        return self.limits.check(prompt_tokens, max_tokens, n)

    def submit(self, prompt_ids: list[int], params: SamplingParams, listener: Listener) -> Sequence:
        """Queue a sequence; `listener(token, finish_reason)` receives each token as it is sampled (the last one
        with its finish reason). Raises `LimitError` if it can never run, `QueueFull` if the queue is full."""
        return self.submit_all([(prompt_ids, params, listener)])[0]

    def submit_all(self, requests: list[tuple[list[int], SamplingParams, Listener]]) -> list[Sequence]:
        """Queue several sequences (see `submit`), all or none."""
        self.limits.check_count(len(requests))
        seqs = [Sequence(list(ids), params, self.check(len(ids), params.max_tokens), listener,
                         generator=make_generator(params, self.model.device)) for ids, params, listener in requests]
        with self._wake:
            self.scheduler.add(seqs)
            self._wake.notify()
        return seqs

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stop `seq`: its consumer went away ("cancelled") or saw a stop string ("stop"). Its row is freed at the
        next step boundary; a finished sequence stays as it is."""
        with self._wake:
            seq.cancelled = seq.cancelled or reason
            self._wake.notify()

    @property
    def queue_length(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.scheduler.running())

    def is_running(self) -> bool:
        """Whether the background thread that `start` began is alive."""
        return self._thread is not None and self._thread.is_alive()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> None:
        """One scheduler step: free cancelled rows, admit and prefill waiting sequences, decode one token for
        every running row, free finished rows and tidy the cache."""
        with torch.inference_mode():
            with self._wake:
                dropped = self.scheduler.drop_cancelled_waiting()
            for seq in dropped:
                self._finish(seq, seq.cancelled)
            for row, seq in self.scheduler.running():
                if seq.cancelled:
                    self._finish(seq, seq.cancelled)
                    self._free(row)
            with self._wake:
                admitted = self.scheduler.admit()
            if admitted:
                self._prefill(admitted)
            if self.scheduler.running():
                self._decode()
            self.kv_cache_bytes_in_use = self.runner.fit(self.scheduler.trim())

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

    # -- the step's parts ------------------------------------------------------------------------------------------
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
            victims = self.scheduler.clear() + self._admitted
        self._admitted = []
        for seq in victims:
            self._finish(seq, "error")
        self.runner.reset()
        self.kv_cache_bytes_in_use = 0
        return len(victims)

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` (those that score their prompt apart), sample their first tokens, move the unfinished
        ones into rows."""
        self._admitted = list(seqs)
        scoring = [seq for seq in seqs if seq.params.prompt_logprobs is not None]
        for group in (scoring, [seq for seq in seqs if seq.params.prompt_logprobs is None]):
            if group:
                self._prefill_group(group, keep_hidden=group is scoring)
        self._admitted = []

    def _prefill_group(self, seqs: list[Sequence], keep_hidden: bool) -> None:
        try:
            logits, prefilled, hidden = self.runner.prefill([seq.prompt_ids for seq in seqs], keep_hidden)
        except Exception:
            # the prefill has a cache of its own: a failure here fails the sequences in it, not the running rows
            log.exception("prefilling %d sequences failed; finishing them with an error", len(seqs))
            for seq in seqs:
                self._finish(seq, "error")
            return
        self.prompt_tokens_total += sum(len(seq.prompt_ids) for seq in seqs)
        argmax = greedy_tokens(logits)
        for i, seq in enumerate(seqs):
            if hidden is not None:
                seq.prompt_logprobs = self._guarded(seq, self.runner.score_prompt, seq.prompt_ids, hidden[i],
                                                    seq.params.prompt_logprobs)
                if seq.prompt_logprobs is None:  # scoring failed: the sequence finished with an error
                    continue
            if seq.max_tokens == 0:  # only the prompt's log-probabilities were asked for
                self._finish(seq, "length")
            elif not self._advance(seq, logits[i], argmax[i]):
                self.runner.insert(self.scheduler.place(seq), prefilled, i)

    def _decode(self) -> None:
        running = self.scheduler.running()
        logits = self.runner.decode([None if seq is None else seq.output_ids[-1] for seq in self.scheduler.rows])
        argmax = greedy_tokens(logits)
        for row, seq in running:
            if self._advance(seq, logits[row], argmax[row]):
                self._free(row)

    def _advance(self, seq: Sequence, logits: torch.Tensor, argmax: int) -> bool:
        """Pick, score and emit the sequence's next token from its logits row; return whether it is finished."""
        token = self._guarded(seq, pick, logits, seq, argmax)
        if token is None:
            return True
        if seq.params.logprobs is not None and not seq.cancelled:
            scored = self._guarded(seq, token_logprobs, logits[None], torch.tensor([token]), seq.params.logprobs)
            if scored is None:
                return True
            seq.output_logprobs.append(scored[0])
        return self._emit(seq, token)

    def _guarded(self, seq: Sequence, work: Callable, *args: object) -> object:
        """`work(*args)` for `seq` alone: if it fails, `seq` finishes with "error" and the result is None."""
        try:
            return work(*args)
        except Exception:
            log.exception("processing one sequence failed; finishing it with an error")
            self._finish(seq, "error")
            return None

    def _emit(self, seq: Sequence, token: int) -> bool:
        """Hand `token` to the sequence's listener; return whether the sequence is finished."""
        if seq.cancelled:
            self._finish(seq, seq.cancelled)
            return True
        reason = seq.append(token, self.eos_token_ids)
        self.generated_tokens_total += 1
        if reason is not None:
            self.finished_total[reason] += 1
        seq.notify(token, reason)
        if seq.cancelled:  # by its consumer, possibly on seeing this very token
            self._finish(seq, seq.cancelled)
        return seq.finish_reason is not None

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish(reason):
            self.finished_total[reason] += 1

    def _free(self, row: int) -> None:
        self.runner.free(row)
        self.scheduler.free(row)
