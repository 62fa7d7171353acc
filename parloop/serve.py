"""`parloop serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (when the tokenizer has a chat template), both with
`stream: true` as server-sent events; `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
The engine runs on its own thread; request handlers submit sequences to it and receive tokens through an asyncio
queue. A client that disconnects has its sequences cancelled, which frees their cache rows at the next step.
Errors are OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`) with a 4xx status that names
the problem; the server keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from parloop.engine import FINISH_REASONS, Engine, LimitError, SamplingParams
from parloop.generation import TextStream, add_model_arguments, chat_prompt_ids, load_model, tokens_per_second

log = logging.getLogger("parloop.serve")


# -- request bodies (strict: a string is not a number; unknown fields are ignored, as OpenAI does) ----------------
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: Literal[False] = False
    logprobs: None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class APIError(Exception):
    """An error answered as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


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
            name = ".".join(str(p) for p in e["loc"][:1]) or "body"
            if e["type"] == "missing":
                message = "field required"
            elif e["type"] == "literal_error" or name in ("echo", "logprobs"):
                message = "not supported by this server"
            else:
                message = e["msg"]
            if message not in by_field.setdefault(name, []):
                by_field[name].append(message)
        details = "; ".join(f"{name}: must be {_UNIONS[name]}" if len(msgs) > 1 and name in _UNIONS
                            else f"{name}: {'; '.join(msgs)}" for name, msgs in by_field.items())
        raise APIError(400, f"invalid request: {details}", param=next(iter(by_field)), code="invalid_request") from err


# -- one API request running in the engine --------------------------------------------------------------------------
class EngineFailure(RuntimeError):
    pass


class Job:
    """The choices of one API request (n per prompt) in the engine, turned into text as tokens arrive."""

    def __init__(self, engine: Engine, tokenizer: Any, prompts: list[list[int]], n: int, params: SamplingParams,
                 stop: list[str]) -> None:
        loop = asyncio.get_running_loop()
        self.engine = engine
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at = self.started
        self._queue: asyncio.Queue[tuple[int, int | None, str | None]] = asyncio.Queue()
        choices = [(ids, j) for ids in prompts for j in range(n)]
        self.streams = [TextStream(tokenizer, stop) for _ in choices]
        self.finish: list[str | None] = [None] * len(choices)
        self.seqs = []
        for i, (ids, j) in enumerate(choices):
            seed = None if params.seed is None else params.seed + j

            def listener(token: int | None, reason: str | None, i: int = i) -> None:
                loop.call_soon_threadsafe(self._queue.put_nowait, (i, token, reason))

            self.seqs.append(engine.submit(ids, dataclasses.replace(params, seed=seed), listener))

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.ids) for s in self.streams)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def cancel(self) -> None:
        for seq in self.seqs:
            self.engine.cancel(seq)

    async def events(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, new text, finish reason or None) until every choice has finished."""
        pending = len(self.seqs)
        while pending:
            i, token, reason = await self._queue.get()
            if self.finish[i] is not None:
                continue  # a token that was in flight when a stop string cancelled the choice
            if reason == "error":
                raise EngineFailure("the engine failed while generating; see the server log")
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
                pending -= 1
            if delta or reason is not None:
                yield i, delta, reason

    def summary(self) -> str:
        ttft = "-" if self.first_token_at is None else f"{1000 * (self.first_token_at - self.started):.1f} ms"
        rate = tokens_per_second(self.completion_tokens, self.first_token_at or self.started, self.last_token_at,
                                 self.started, len(self.seqs))
        return (f"{len(self.seqs)} choice(s), prompt {self.prompt_tokens} tokens, completion "
                f"{self.completion_tokens} tokens, time to first token {ttft}, {rate:.1f} tokens/s, finish "
                f"{','.join(sorted({r or 'cancelled' for r in self.finish}))}")


# -- the app --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ServerStats:
    requests: Counter = dataclasses.field(default_factory=Counter)  # (endpoint, status code) -> count
    ttft_sum: float = 0.0
    ttft_count: int = 0


def create_app(engine: Engine, tokenizer: Any, model_name: str) -> FastAPI:
    """The FastAPI app serving `engine` (started and stopped with the app) under the name `model_name`."""
    created = int(time.time())
    stats = ServerStats()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="parloop", lifespan=lifespan)

    def error_response(endpoint: str, err: APIError) -> JSONResponse:
        stats.requests[endpoint, err.status] += 1
        return JSONResponse(err.body(), status_code=err.status)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r} "
                           "(see GET /v1/models)", param="model", code="model_not_found")

    def sampling(req: _Sampling, max_tokens: int | None, prompts: list[list[int]]) -> SamplingParams:
        vocab = engine.model.config.vocab_size
        for ids in prompts:
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt",
                               code="invalid_token_id")
            try:
                engine.check(len(ids), max_tokens, req.n)
            except LimitError as err:
                param = {"max_batch_size": "n", "prompt": "prompt", "max_prompt_tokens": "prompt"}
                raise APIError(400, str(err), param=param.get(err.limit, "max_tokens"), code=err.limit) from err
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed)

    async def generate(request: Request, endpoint: str, req: _Sampling, prompts: list[list[int]],
                       max_tokens: int | None) -> Response:
        params = sampling(req, max_tokens, prompts)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        chat = endpoint == "chat.completions"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name}

        def start() -> Job:
            return Job(engine, tokenizer, prompts, req.n, params, stop)

        def finished(job: Job, status: int) -> None:
            stats.requests[endpoint, status] += 1
            if job.first_token_at is not None:
                stats.ttft_sum += job.first_token_at - job.started
                stats.ttft_count += 1
            log.info("%s %s: %s", endpoint, rid, job.summary())

        if req.stream:
            # the job starts inside the stream, so that whatever ends the stream also cancels the job
            return StreamingResponse(stream_events(start, head, chat, req, finished), media_type="text/event-stream")

        job = start()
        texts = [""] * len(job.seqs)

        async def collect() -> None:
            async for i, delta, _ in job.events():
                texts[i] += delta

        try:
            if not await until_disconnected(request, collect()):
                finished(job, 499)
                return Response(status_code=499)
        except EngineFailure as err:
            finished(job, 500)
            return JSONResponse(APIError(500, str(err), code="engine_error").body(), status_code=500)
        finally:
            job.cancel()
        finished(job, 200)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": job.finish[i]} for i, text in enumerate(texts)]
        else:
            choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": job.finish[i]}
                       for i, text in enumerate(texts)]
        return JSONResponse({**head, "choices": choices, "usage": job.usage()})

    async def stream_events(start: Callable[[], Job], head: dict, chat: bool, req: _Sampling,
                            finished: Callable[[Job, int], None]) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        extra = {"usage": None} if include_usage else {}

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        def chunk(i: int, text: str | None, reason: str | None, opening: bool = False) -> str:
            if chat:
                delta = {} if text is None else {"role": "assistant", "content": text} if opening else {"content": text}
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            return event({**head, "choices": [choice], **extra})

        job = start()
        status = 499  # unless it runs to the end: the client went away
        try:
            if chat:  # OpenAI opens each choice with its role
                for i in range(len(job.seqs)):
                    yield chunk(i, "", None, opening=True)
            async for i, delta, reason in job.events():
                if delta:
                    yield chunk(i, delta, None)
                if reason is not None:
                    yield chunk(i, None if chat else "", reason)
            if include_usage:
                yield event({**head, "choices": [], "usage": job.usage()})
            yield "data: [DONE]\n\n"
            status = 200
        except EngineFailure as err:
            status = 500
            yield event(APIError(500, str(err), code="engine_error").body())
        finally:
            job.cancel()
            finished(job, status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        endpoint = request.url.path.removeprefix("/v1/").replace("/", ".")
        return error_response(endpoint, err)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_body(CompletionRequest, await request.body())
        check_model(req.model)
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise APIError(400, "prompt is an empty list; give a string, a list of strings or token ids",
                           param="prompt", code="invalid_request")
        prompts = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in raw]
        return await generate(request, "completions", req, prompts, req.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse_body(ChatRequest, await request.body())
        check_model(req.model)
        try:
            ids = chat_prompt_ids(tokenizer, [m.as_template_input() for m in req.messages])
        except ValueError as err:
            raise APIError(400, str(err), param="messages", code="no_chat_template") from err
        return await generate(request, "chat.completions", req, [ids], req.max_completion_tokens or req.max_tokens)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "parloop"}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = engine.is_running()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine, stats), media_type="text/plain; version=0.0.4")

    return app


async def until_disconnected(request: Request, work: Awaitable[None], poll_s: float = 0.25) -> bool:
    """Await `work` unless the client disconnects first (then cancel it); return whether it completed."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_s)
        if done:
            task.result()
            return True
        if await request.is_disconnected():
            task.cancel()
            return False


def prometheus_text(engine: Engine, stats: ServerStats) -> str:
    """The metrics in Prometheus' text exposition format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    metric("parloop_requests_total", "counter", "API generation requests answered, by endpoint and HTTP status.",
           [(f'{{endpoint="{e}",status="{s}"}}', v) for (e, s), v in sorted(stats.requests.items())] or [("", 0)])
    metric("parloop_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
           [("", engine.prompt_tokens_total)])
    metric("parloop_generation_tokens_total", "counter", "Tokens generated.", [("", engine.generated_tokens_total)])
    metric("parloop_sequences_finished_total", "counter", "Sequences finished, by reason.",
           [(f'{{reason="{r}"}}', engine.finished_total[r]) for r in FINISH_REASONS])
    metric("parloop_queue_length", "gauge", "Sequences waiting to be admitted.", [("", engine.queue_length)])
    metric("parloop_batch_size", "gauge", "Sequences decoding together.", [("", engine.batch_size)])
    metric("parloop_kv_cache_bytes", "gauge", "Bytes of keys and values held for the running sequences' tokens.",
           [("", engine.kv_cache_bytes_in_use)])
    metric("parloop_time_to_first_token_seconds", "summary", "Time from request to its first token.",
           [("_sum", stats.ttft_sum), ("_count", stats.ttft_count)])
    return "\n".join(lines) + "\n"


# -- the command ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--served-model-name", help="the model name clients ask for; unset: the model directory's name")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="most sequences decoding together; 1 disables batching")
    parser.add_argument("--max-cached-tokens", type=int, default=None,
                        help="most prompt + max_tokens summed over running sequences; unset: max batch size x "
                             "max model length")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longest prompt accepted; unset: the max model length")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + max_tokens; unset: the config's max_position_embeddings")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def run(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for option in ("max_batch_size", "max_cached_tokens", "max_prompt_tokens", "max_model_len"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise SystemExit(f"parloop serve: --{option.replace('_', '-')} must be >= 1, got {value}")
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    engine = Engine(model, max_batch_size=args.max_batch_size, max_cached_tokens=args.max_cached_tokens,
                    max_prompt_tokens=args.max_prompt_tokens, max_model_len=args.max_model_len)
    name = args.served_model_name or args.model.resolve().name
    log.info("serving %s as %r on http://%s:%d (max batch %d, max cached tokens %d, max prompt tokens %d)",
             args.model, name, args.host, args.port, engine.max_batch_size, engine.max_cached_tokens,
             engine.max_prompt_tokens)
    uvicorn.run(create_app(engine, tokenizer, name), host=args.host, port=args.port, log_level=args.log_level)
    return 0
