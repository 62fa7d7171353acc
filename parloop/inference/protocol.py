"""The OpenAI API as this server speaks it: request bodies (pydantic), response and stream-chunk bodies, and errors
answered as OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`) with a status naming the problem.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from parloop.inference.sampling import TokenLogprob
from parloop.inference.scheduler import LimitError

# the most alternatives per token a client may ask for (OpenAI's chat limit)
MAX_LOGPROBS = 20


# -- request bodies (strict: a string is not a number; a field this server does not implement is a 400 naming it,
# never silently ignored) -------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingRequest(_Body):
    """The fields that completions and chat completions share."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # an extension (vLLM's): 0 or -1 keeps every token
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    # JSON allows any integer: the range of torch's generators, signed or not (reduced modulo 2**64)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the client's own records; it changes nothing

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: score the prompt, generate nothing
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Literal[1] | None = None  # more than one choice to pick from is not implemented
    suffix: Literal[""] | None = None  # insertion is not implemented

    def new_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(alternatives per generated token, per prompt token) asked for; None: no log-probabilities."""
        return self.logprobs, self.logprobs if self.echo else None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message = {"role": self.role, "content": content}
        return message if self.name is None else {**message, "name": self.name}


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(alternatives per generated token, per prompt token) asked for; None: no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None, None


# -- errors ---------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        kind = ("authentication_error" if self.status == 401 else "rate_limit_error" if self.status == 429
                else "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class EngineFailure(RuntimeError):
    """The engine failed while a request's choices were generating."""


# the request field each engine limit is about (the rest are about max_tokens)
_LIMIT_PARAMS = {"max_batch_size": "n", "prompt": "prompt", "max_prompt_tokens": "prompt",
                 "max_queued_sequences": "n"}


def limit_error(err: LimitError) -> APIError:
    """A 400 naming the request field that broke an engine limit."""
    return APIError(400, str(err), param=_LIMIT_PARAMS.get(err.limit, "max_tokens"), code=err.limit)


# what a field of several accepted types must be, for error messages (pydantic reports each type's failure)
_UNIONS = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
           "stop": "a string or a list of strings", "content": "a string or a list of text parts"}


def parse_body(model: type[_Body], raw: bytes) -> Any:
    """Validate a JSON body; a `ValidationError` becomes a 400 naming each bad field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        by_field: dict[str, list[str]] = {}
        for e in err.errors():
            if e["type"] == "json_invalid":
                raise APIError(400, f"malformed JSON body: {e['msg']}", code="invalid_json") from err
            # an unknown field is named in full (messages.0.tool_calls), any other error by its top-level field
            name = ".".join(str(p) for p in e["loc"][:None if e["type"] == "extra_forbidden" else 1]) or "body"
            if e["type"] == "missing":
                message = "field required"
            elif e["type"] in ("literal_error", "extra_forbidden"):
                message = "not supported by this server"
            else:
                message = e["msg"]
            if message not in by_field.setdefault(name, []):
                by_field[name].append(message)
        details = "; ".join(f"{name}: must be {_UNIONS[name]}" if len(msgs) > 1 and name in _UNIONS
                            else f"{name}: {'; '.join(msgs)}" for name, msgs in by_field.items())
        raise APIError(400, f"invalid request: {details}", param=next(iter(by_field)), code="invalid_request") from err


# -- response bodies ------------------------------------------------------------------------------------------------
TokenText = Callable[[int], str]  # a token id's text, for log-probability listings


def completion_logprobs(ids: list[int], scored: list[TokenLogprob | None], token_text: TokenText,
                        offset: int = 0) -> dict[str, Any]:
    """A completion choice's `logprobs`: per token its text, log-probability (None for the first prompt token of an
    echo), the most likely alternatives and its character offset (counted from `offset`)."""
    texts = [token_text(t) for t in ids]
    offsets = list(itertools.accumulate([len(t) for t in texts[:-1]], initial=offset))
    return {"tokens": texts, "token_logprobs": [None if e is None else e.logprob for e in scored],
            "top_logprobs": [None if e is None else {token_text(t): lp for t, lp in e.top} for e in scored],
            "text_offset": offsets}


def chat_logprobs(scored: list[TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    """A chat choice's `logprobs`: per token its text, bytes, log-probability and the most likely alternatives."""
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in scored]}


@dataclass(frozen=True)
class Endpoint:
    """What differs between the answers of /v1/completions and /v1/chat/completions."""

    name: str  # as counted in /metrics
    id_prefix: str
    object: str
    chunk_object: str
    chat: bool  # choices carry messages with a role (chat) or plain text

    def choice(self, i: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
        """Choice `i` of a whole (non-streamed) answer."""
        if self.chat:
            return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def chunk_choice(self, i: int, text: str | None, reason: str | None, opening: bool = False,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """One choice of a stream chunk: new text (None: none, as in a chat's closing chunk) or the finish reason; a
        chat opens each choice with its role."""
        if self.chat:
            delta = {} if text is None else {"role": "assistant", "content": text} if opening else {"content": text}
            return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": reason}

    def closing_text(self) -> str | None:
        """The text of a choice's last chunk, which carries its finish reason."""
        return None if self.chat else ""

    def logprobs(self, ids: list[int], scored: list[Any], token_text: TokenText) -> dict[str, Any]:
        """A choice's `logprobs` for its tokens `ids` and their scores."""
        return chat_logprobs(scored, token_text) if self.chat else completion_logprobs(ids, scored, token_text)

    def body(self, head: dict[str, Any], texts: list[str], finish: list[str | None], usage: dict[str, int],
             logprobs: list[dict[str, Any] | None]) -> dict[str, Any]:
        """A whole (non-streamed) answer."""
        choices = [self.choice(i, text, logprobs[i], finish[i]) for i, text in enumerate(texts)]
        return {**head, "choices": choices, "usage": usage}


COMPLETIONS = Endpoint("completions", "cmpl", "text_completion", "text_completion", chat=False)
CHAT = Endpoint("chat.completions", "chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)
