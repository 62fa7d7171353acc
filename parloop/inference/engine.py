"""Continuous batching: many sequences decode together through one cache, joining and leaving at any step.

The engine ties three parts: the `Scheduler` (tensor-free: waiting queue, limits, rows), the `ModelRunner` (model
and cache: prefill, decode, row surgery) and `sample`. One scheduler step (`Engine.step`), run by one thread:
1. finishes cancelled sequences and frees their rows;
2. admits waiting sequences (FIFO) while a row and the cached-token budget allow, prefills them together, samples
   each one's first token and moves the unfinished ones into free rows;
3. runs one decode step for all rows and samples the next token of every running sequence;
4. frees finished rows at once, drops trailing free rows and compacts the cache's slot axis.
Tokens reach each sequence's consumer through its `Listener`, on the engine thread.
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
from parloop.inference.sampling import SamplingParams, make_generator, sample
from parloop.inference.scheduler import LimitError, Limits, Scheduler
from parloop.model import PLTForCausalLM

__all__ = ["FINISH_REASONS", "Engine", "LimitError", "Listener", "SamplingParams", "Sequence"]

log = logging.getLogger(__name__)

# Why a sequence ended: an end-of-sequence token or a stop string its consumer saw, its max_tokens, cancelled by its
# consumer, or an engine failure.
FINISH_REASONS = ("stop", "length", "cancelled", "error")

# (token id or None, finish reason or None); called on the engine thread, so it must be quick and not block
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

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_tokens


class Engine:
    """Continuous-batching decoder over a `PLTForCausalLM`, within `Limits` (see there).

    `submit` and `cancel` may be called from any thread; `step` (or the thread that `start` runs) does all model
    work.
    """

    def __init__(self, model: PLTForCausalLM, *, max_batch_size: int = 16, max_cached_tokens: int | None = None,
                 max_prompt_tokens: int | None = None, max_model_len: int | None = None,
                 eos_token_ids: set[int] | None = None) -> None:
        self.limits = Limits.resolve(model.config.max_position_embeddings, max_batch_size, max_cached_tokens,
                                     max_prompt_tokens, max_model_len)
        self.scheduler: Scheduler[Sequence] = Scheduler(self.limits)
        self.runner = ModelRunner(model)
        if eos_token_ids is None:
            eos = model.generation_config.eos_token_id
            eos_token_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.eos_token_ids = eos_token_ids
        self._wake = threading.Condition()  # guards the waiting queue and wakes the engine thread
        self._thread: threading.Thread | None = None
        self._stopping = False

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
        with its finish reason). Raises `LimitError` if it can never run."""
        max_tokens = self.check(len(prompt_ids), params.max_tokens)
        seq = Sequence(list(prompt_ids), params, max_tokens, listener,
                       generator=make_generator(params, self.model.device))
        with self._wake:
            self.scheduler.add(seq)
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
            victims = self.scheduler.clear()
        for seq in victims:
            self._finish(seq, "error")
        self.runner.reset()
        self.kv_cache_bytes_in_use = 0
        return len(victims)

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` together, sample their first tokens, move the unfinished ones into rows."""
        logits, prefilled = self.runner.prefill([seq.prompt_ids for seq in seqs])
        self.prompt_tokens_total += sum(len(seq.prompt_ids) for seq in seqs)
        for i, (seq, token) in enumerate(zip(seqs, sample(logits, seqs), strict=True)):
            if not self._emit(seq, token):
                self.runner.insert(self.scheduler.place(seq), prefilled, i)

    def _decode(self) -> None:
        running = self.scheduler.running()
        logits = self.runner.decode([None if seq is None else seq.output_ids[-1] for seq in self.scheduler.rows])
        rows, seqs = [row for row, _ in running], [seq for _, seq in running]
        for row, seq, token in zip(rows, seqs, sample(logits[rows], seqs), strict=True):
            if self._emit(seq, token):
                self._free(row)

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
        self.runner.free(row)
        self.scheduler.free(row)
