"""The text layer that `parloop serve` and `parloop generate` share: prompts become token ids (chat templates),
engine tokens become text (`TextStream`), stop strings end a choice, and `TextChoices` ties them to the engine for
the choices of one request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from parloop.inference.engine import Engine, Listener
from parloop.inference.engine import Sequence as EngineSequence
from parloop.inference.sampling import SamplingParams, choice_params


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template, so chat is not available; use plain "
                         "completions, or add a chat_template to tokenizer_config.json")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokens_per_second(tokens: int, first_token_at: float, last_token_at: float, started_at: float,
                      choices: int = 1) -> float:
    """Decode speed: the tokens after each choice's first one over the time after the first token; when there are
    none, all tokens over the whole time."""
    if tokens > choices and last_token_at > first_token_at:
        return (tokens - choices) / (last_token_at - first_token_at)
    return tokens / max(last_token_at - started_at, 1e-9)


class TextStream:
    """Tokens in, text out, incrementally: text is released once its bytes are complete (byte-level tokenizers
    split characters over tokens), and stop strings cut the text, never shown even in part.

    `push(token)` returns the text that became final; `stopped` turns True when a stop string appeared (the text
    ends before it); `finish()` returns whatever is still held back.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = 0  # tokens before this index are in `text`; decode from it for context (as TGI does)
        self._read = 0
        self._released = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text = self._decode(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            start = max(0, self._released - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = final = True
        hold = 0 if final else self._stop_prefix_length()
        end = max(self._released, len(self.text) - hold)
        out = self.text[self._released:end]
        self._released = end
        return out

    def _stop_prefix_length(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        return max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)


class TextChoices:
    """The choices of one request in the engine, turned into text as their tokens arrive.

    `submit` queues the choices; the caller routes choice i's engine events to `feed(i, token, reason)` (on the
    engine thread or, through a queue, on another), which returns the new text and the choice's finish reason, and
    cancels the choice in the engine once a stop string appears.
    """

    def __init__(self, engine: Engine, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.engine, self.tokenizer, self.stop = engine, tokenizer, list(stop)
        self.streams: list[TextStream] = []
        self.seqs: list[EngineSequence] = []
        self.finish: list[str | None] = []
        self.prompt_tokens = 0
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at = self.started

    def submit(self, prompts: list[list[int]], n: int, params: SamplingParams,
               listener_for: Callable[[int], Listener]) -> None:
        """Queue `n` choices per prompt (choice j of a prompt samples with `choice_params(params, j)`); the engine
        reports choice i's tokens to `listener_for(i)`. Raises the engine's `LimitError`."""
        for ids in prompts:
            self.prompt_tokens += len(ids)
            for j in range(n):
                self.streams.append(TextStream(self.tokenizer, self.stop))
                self.finish.append(None)
                self.seqs.append(self.engine.submit(ids, choice_params(params, j), listener_for(len(self.seqs))))

    def feed(self, i: int, token: int | None, reason: str | None) -> tuple[str, str | None] | None:
        """Choice i's new text and finish reason ("stop" when a stop string appeared) for an engine event; None for
        an event after the choice finished (a token in flight when a stop string cancelled it)."""
        if self.finish[i] is not None:
            return None
        stream, delta = self.streams[i], ""
        if token is not None:
            self.last_token_at = time.perf_counter()
            self.first_token_at = self.first_token_at or self.last_token_at
            delta = stream.push(token)
            if stream.stopped:
                self.engine.cancel(self.seqs[i], "stop")
                reason = "stop"
        if reason is not None:
            delta += stream.finish()
            self.finish[i] = reason
        return delta, reason

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish)

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.ids) for s in self.streams)

    def tokens_per_second(self) -> float:
        return tokens_per_second(self.completion_tokens, self.first_token_at or self.started, self.last_token_at,
                                 self.started, len(self.seqs))

    def cancel(self) -> None:
        for seq in self.seqs:
            self.engine.cancel(seq)
