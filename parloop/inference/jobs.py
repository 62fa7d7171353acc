"""One API request running in the engine: its choices' tokens carried from the engine thread to the event loop,
turned into text, and paired with the log-probabilities the request asked for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from parloop.inference.engine import Engine, SamplingParams
from parloop.inference.protocol import EngineFailure
from parloop.inference.sampling import TokenLogprob
from parloop.inference.text import TextChoices


@dataclass
class Event:
    """New text of choice `index` (with the ids and log-probabilities of the tokens it came from, when asked for),
    or its finish reason."""

    index: int
    text: str
    reason: str | None
    ids: list[int] = field(default_factory=list)
    scored: list[TokenLogprob | None] = field(default_factory=list)


class Job(TextChoices):
    """The choices of one API request (n per prompt), their engine events carried to the event loop by a queue.

    With `echo_texts` (one per prompt) each choice's text starts with its prompt's, and, when the prompt was scored
    (`params.prompt_logprobs`), its log-probabilities with the prompt's tokens."""

    def __init__(self, engine: Engine, tokenizer: Any, prompts: list[list[int]], n: int, params: SamplingParams,
                 stop: list[str], echo_texts: list[str] | None = None) -> None:
        super().__init__(engine, tokenizer, stop)
        self._queue: asyncio.Queue[tuple[int, int | None, str | None]] = asyncio.Queue()
        self._echo = None if echo_texts is None else [text for text in echo_texts for _ in range(n)]
        self._scores = params.logprobs is not None or params.prompt_logprobs is not None
        loop = asyncio.get_running_loop()
        self.submit(prompts, n, params, lambda i: partial(self._post, loop, i))
        self._reported = [0] * len(self.seqs)  # per choice: generated tokens whose log-probabilities went out
        self._opened = [False] * len(self.seqs)

    def _post(self, loop: asyncio.AbstractEventLoop, i: int, token: int | None, reason: str | None) -> None:
        # runs on the engine thread: hand the event over to the event loop
        loop.call_soon_threadsafe(self._queue.put_nowait, (i, token, reason))

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def events(self) -> AsyncIterator[Event]:
        """Each choice's new text and finish reason until every choice has finished."""
        while not self.done:
            i, token, reason = await self._queue.get()
            update = self.feed(i, token, reason)
            if update is None:
                continue
            delta, reason = update
            if reason == "error":
                raise EngineFailure("the engine failed while generating this request; see the server log")
            if delta or reason is not None:
                yield self._event(i, delta, reason)

    def _event(self, i: int, text: str, reason: str | None) -> Event:
        event = Event(i, text, reason)
        seq = self.seqs[i]
        if not self._opened[i] and self._echo is not None:
            event.text = self._echo[i] + text
            if seq.prompt_logprobs is not None:
                event.ids, event.scored = list(seq.prompt_ids), list(seq.prompt_logprobs)
        self._opened[i] = True
        if self._scores and seq.params.logprobs is not None:
            seen = len(self.streams[i].ids)
            new = seq.output_logprobs[self._reported[i]:seen]
            event.ids += [entry.token for entry in new]
            event.scored += new
            self._reported[i] = seen
        return event

    def summary(self) -> str:
        ttft = "-" if self.first_token_at is None else f"{1000 * (self.first_token_at - self.started):.1f} ms"
        return (f"{len(self.seqs)} choice(s), prompt {self.prompt_tokens} tokens, completion "
                f"{self.completion_tokens} tokens, time to first token {ttft}, {self.tokens_per_second():.1f} "
                f"tokens/s, finish {','.join(sorted({r or 'cancelled' for r in self.finish}))}")
