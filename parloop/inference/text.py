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


class NoChatTemplate(ValueError):
    """The tokenizer has no chat template."""


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("this model's tokenizer has no chat template, so chat is not available; use plain "
                         "completions, or add a chat_template to tokenizer_config.json")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokens_per_second(seqs: Sequence[EngineSequence], started_at: float) -> float:
    """Decode speed of a request's sequences, from the engine's own token times (not from when a consumer saw
    them, which may be in bursts): the tokens after each sequence's first one over the time from the first token
    to the last; when there are none, all tokens over the time since the request started."""
    tokens = sum(len(seq.output_ids) for seq in seqs)
    firsts = [seq.first_token_at for seq in seqs if seq.first_token_at is not None]
    if not firsts:
        return 0.0
    last = max(seq.last_token_at or seq.first_token_at or started_at for seq in seqs)
    later = tokens - len(firsts)
    if later > 0 and last > min(firsts):
        return later / (last - min(firsts))
    return tokens / max(last - started_at, 1e-9)


class StopMatcher:
    """Finds the first stop string in a text fed piece by piece, in time linear in the text (Knuth-Morris-Pratt:
    each stop string keeps the length of its longest prefix that ends the text so far)."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self._fallback = [_failure_function(s) for s in self.stop]
        self._matched = [0] * len(self.stop)
        self._fed = 0

    def feed(self, text: str) -> int | None:
        """Feed the text's next piece; return where the first completed stop string starts in the whole text, or
        None."""
        for offset, char in enumerate(text):
            longest = 0  # of the stop strings completed by this character, the one that started first
            for j, stop in enumerate(self.stop):
                k, fallback = self._matched[j], self._fallback[j]
                while k and stop[k] != char:
                    k = fallback[k - 1]
                k += stop[k] == char
                if k == len(stop):
                    longest = max(longest, k)
                self._matched[j] = k
            if longest:
                return self._fed + offset + 1 - longest
        self._fed += len(text)
        return None

    @property
    def pending(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        return max(self._matched, default=0)


def _failure_function(pattern: str) -> list[int]:
    """KMP: for each prefix of `pattern`, the length of its longest proper prefix that is also its suffix."""
    table, k = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = table[k - 1]
        k += pattern[i] == pattern[k]
        table[i] = k
    return table


class TextStream:
    """Tokens in, text out, incrementally: text is released once its bytes are complete (byte-level tokenizers
    split characters over tokens), and stop strings cut the text, never shown even in part.

    `push(token)` returns the text that became final; `stopped` turns True when a stop string appeared (the text
    ends before it); `finish()` returns whatever is still held back.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self._matcher = StopMatcher(stop)
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
            self._append(after[len(before):])
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            full = self._decode(self.ids)
            if full.startswith(self.text):
                self._append(full[len(self.text):])
            else:  # a decoder that rewrites earlier text once it sees the end
                self.text = full
        return self._release(final=True)

    def _append(self, new: str) -> None:
        hit = self._matcher.feed(new)
        self.text += new
        if hit is not None:
            self.text, self.stopped = self.text[:hit], True

    def _release(self, final: bool) -> str:
        hold = 0 if final or self.stopped else self._matcher.pending
        end = max(self._released, len(self.text) - hold)
        out = self.text[self._released:end]
        self._released = end
        return out


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

    def submit(self, prompts: list[list[int]], n: int, params: SamplingParams,
               listener_for: Callable[[int], Listener]) -> None:
        """Queue `n` choices per prompt (choice j of a prompt samples with `choice_params(params, j)`); the engine
        reports choice i's tokens to `listener_for(i)`. All or none are queued: raises the engine's `LimitError` or
        `QueueFull`."""
        requests = [(ids, choice_params(params, j), listener_for(len(self.seqs) + n * p + j))
                    for p, ids in enumerate(prompts) for j in range(n)]
        self.seqs += self.engine.submit_all(requests)
        self.prompt_tokens += sum(len(ids) for ids in prompts)
        self.streams += [TextStream(self.tokenizer, self.stop) for _ in requests]
        self.finish += [None] * len(requests)

    def feed(self, i: int, token: int | None, reason: str | None) -> tuple[str, str | None] | None:
        """Choice i's new text and finish reason ("stop" when a stop string appeared) for an engine event; None for
        an event after the choice finished (a token in flight when a stop string cancelled it)."""
        if self.finish[i] is not None:
            return None
        stream, delta = self.streams[i], ""
        if token is not None:
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

    @property
    def first_token_at(self) -> float | None:
        """When the engine produced the request's first token."""
        return min((seq.first_token_at for seq in self.seqs if seq.first_token_at is not None), default=None)

    def tokens_per_second(self) -> float:
        return tokens_per_second(self.seqs, self.started)

    def cancel(self) -> None:
        for seq in self.seqs:
            self.engine.cancel(seq)
