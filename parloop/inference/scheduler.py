"""Who runs: the waiting queue, admission under the engine's limits, and which row each running sequence holds.

Plain Python, no tensors: the scheduler decides, the model runner (`runner.py`) does the work on the cache rows it
names. Not thread-safe: the engine serialises every call that touches the waiting queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class LimitError(ValueError):
    """A request the engine cannot take under its limits; `limit` names the limit (the server option)."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class QueueFull(RuntimeError):
    """The waiting queue has no room for a request's sequences now; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Limits:
    """`max_batch_size` sequences decode together (1 disables batching); `max_cached_tokens` bounds the sum of
    prompt + max_tokens over running sequences; `max_prompt_tokens` and `max_model_len` (prompt + max_tokens)
    bound a single request; at most `max_queued` sequences wait for admission (more: `QueueFull`)."""

    max_batch_size: int
    max_model_len: int
    max_prompt_tokens: int
    max_cached_tokens: int
    max_queued: int = 256

    @classmethod
    def resolve(cls, context_length: int, max_batch_size: int = 16, max_cached_tokens: int | None = None,
                max_prompt_tokens: int | None = None, max_model_len: int | None = None,
                max_queued: int | None = None) -> Limits:
        """The limits with every unset one derived from the others and the model's `context_length`."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        model_len = max_model_len or context_length
        return cls(max_batch_size=max_batch_size, max_model_len=model_len,
                   max_prompt_tokens=min(max_prompt_tokens or model_len, model_len),
                   max_cached_tokens=max_cached_tokens or max_batch_size * model_len,
                   max_queued=max_queued or max(256, 4 * max_batch_size))

    def check_count(self, sequences: int) -> None:
        """Raise `LimitError` if a request of this many sequences could never be queued."""
        if sequences > self.max_queued:
            raise LimitError("max_queued_sequences", f"the request asks for {sequences} sequences (prompts x n), "
                             f"more than the server ever queues ({self.max_queued}, --max-queued-sequences); "
                             "split it into smaller requests")

    def check_choices(self, n: int) -> None:
        """Raise `LimitError` if a request asks for more choices of one prompt than decode together."""
        if n > self.max_batch_size:
            raise LimitError("max_batch_size", f"n = {n} choices exceed the server's max batch size "
                             f"{self.max_batch_size}; ask for fewer choices or raise --max-batch-size")

    def check(self, prompt_tokens: int, max_tokens: int | None, n: int = 1) -> int:
        """Raise `LimitError` if `n` sequences of this size can never run; return the effective max_tokens."""
        self.check_choices(n)
        if prompt_tokens < 1:
            raise LimitError("prompt", "the prompt is empty: give at least one token")
        if prompt_tokens > self.max_prompt_tokens:
            raise LimitError("max_prompt_tokens", f"the prompt has {prompt_tokens} tokens, over the limit of "
                             f"{self.max_prompt_tokens} (--max-prompt-tokens); shorten the prompt")
        room = min(self.max_model_len, self.max_cached_tokens) - prompt_tokens
        derived = max_tokens is None  # an explicit 0 only scores the prompt; a derived one must leave room
        if max_tokens is None:
            max_tokens = room
        if max_tokens < int(derived) or prompt_tokens + max_tokens > self.max_model_len:
            raise LimitError("max_model_len", f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) "
                             f"exceed the context length {self.max_model_len} (--max-model-len); lower max_tokens "
                             "or shorten the prompt")
        if prompt_tokens + max_tokens > self.max_cached_tokens:
            raise LimitError("max_cached_tokens", f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) "
                             f"exceed the cached-token budget {self.max_cached_tokens} (--max-cached-tokens); "
                             "lower max_tokens or shorten the prompt")
        return max_tokens


class Schedulable(Protocol):
    """What the scheduler needs of a sequence."""

    cancelled: str | None

    @property
    def reserved_tokens(self) -> int: ...


S = TypeVar("S", bound=Schedulable)


class Scheduler(Generic[S]):
    """FIFO admission into at most `max_batch_size` rows while the cached-token budget allows.

    `rows[i]` is the sequence that cache row i holds (None: free). Rows are reused lowest first; trailing free rows
    are dropped by `trim`, so the cache never holds more rows than the highest running sequence needs.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.rows: list[S | None] = []
        self.waiting: deque[S] = deque()

    def running(self) -> list[tuple[int, S]]:
        """(row, sequence) of every running sequence, in row order."""
        return [(row, seq) for row, seq in enumerate(self.rows) if seq is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(seq is not None for seq in self.rows)

    def add(self, seqs: list[S]) -> None:
        """Queue `seqs` behind every waiting sequence, all or none: `QueueFull` when the queue has no room."""
        if len(self.waiting) + len(seqs) > self.limits.max_queued:
            raise QueueFull(f"the server is busy: {len(self.waiting)} sequences are waiting (at most "
                            f"{self.limits.max_queued}); retry later")
        self.waiting.extend(seqs)

    def drop_cancelled_waiting(self) -> list[S]:
        """Remove and return the waiting sequences that were cancelled before they ran."""
        dropped = [seq for seq in self.waiting if seq.cancelled]
        for seq in dropped:
            self.waiting.remove(seq)
        return dropped

    def admit(self) -> list[S]:
        """Take waiting sequences, oldest first, while a row and the token budget are free for the next one."""
        running = [seq for _, seq in self.running()]
        free_rows = self.limits.max_batch_size - len(running)
        budget = self.limits.max_cached_tokens - sum(seq.reserved_tokens for seq in running)
        admitted = []
        while self.waiting and len(admitted) < free_rows and self.waiting[0].reserved_tokens <= budget:
            seq = self.waiting.popleft()
            budget -= seq.reserved_tokens
            admitted.append(seq)
        return admitted

    def place(self, seq: S) -> int:
        """Give `seq` the lowest free row (a new last row when none is free) and return it."""
        for row, held in enumerate(self.rows):
            if held is None:
                self.rows[row] = seq
                return row
        self.rows.append(seq)
        return len(self.rows) - 1

    def free(self, row: int) -> None:
        self.rows[row] = None

    def trim(self) -> int:
        """Drop trailing free rows; return how many rows remain."""
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
        return len(self.rows)

    def clear(self) -> list[S]:
        """Forget every running and waiting sequence; return them."""
        victims = [seq for _, seq in self.running()] + list(self.waiting)
        self.rows, self.waiting = [], deque()
        return victims
