"""`parloop serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (when the tokenizer has a chat template), both with
`stream: true` as server-sent events; `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
The engine runs on its own thread; request handlers submit sequences to it and receive tokens through an asyncio
queue. A client that disconnects has its sequences cancelled, which frees their cache rows at the next step.
Errors are OpenAI-style JSON (see `protocol.py`) with a 4xx status that names the problem; the server keeps serving.
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
from functools import partial
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from parloop.inference.engine import FINISH_REASONS, Engine, LimitError, SamplingParams
from parloop.inference.loading import add_model_arguments, load_model
from parloop.inference.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EngineFailure,
    SamplingRequest,
    chunk_choice,
    completion_body,
    limit_error,
    parse_body,
)
from parloop.inference.text import TextChoices, chat_prompt_ids

log = logging.getLogger("parloop.serve")


# -- one API request running in the engine --------------------------------------------------------------------------
class Job(TextChoices):
    """The choices of one API request (n per prompt), their engine events carried to the event loop by a queue."""

    def __init__(self, engine: Engine, tokenizer: Any, prompts: list[list[int]], n: int, params: SamplingParams,
                 stop: list[str]) -> None:
        super().__init__(engine, tokenizer, stop)
        self._queue: asyncio.Queue[tuple[int, int | None, str | None]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.submit(prompts, n, params, lambda i: partial(self._post, loop, i))

    def _post(self, loop: asyncio.AbstractEventLoop, i: int, token: int | None, reason: str | None) -> None:
        # runs on the engine thread: hand the event over to the event loop
        loop.call_soon_threadsafe(self._queue.put_nowait, (i, token, reason))

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def events(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, new text, finish reason or None) until every choice has finished."""
        while not self.done:
            i, token, reason = await self._queue.get()
            update = self.feed(i, token, reason)
            if update is None:
                continue
            delta, reason = update
            if reason == "error":
                raise EngineFailure("the engine failed while generating; see the server log")
            if delta or reason is not None:
                yield i, delta, reason

    def summary(self) -> str:
        ttft = "-" if self.first_token_at is None else f"{1000 * (self.first_token_at - self.started):.1f} ms"
        return (f"{len(self.seqs)} choice(s), prompt {self.prompt_tokens} tokens, completion "
                f"{self.completion_tokens} tokens, time to first token {ttft}, {self.tokens_per_second():.1f} "
                f"tokens/s, finish {','.join(sorted({r or 'cancelled' for r in self.finish}))}")


# -- the app --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ServerStats:
    requests: Counter = dataclasses.field(default_factory=Counter)  # (endpoint, status code) -> count
    ttft_sum: float = 0.0
    ttft_count: int = 0


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"


class Server:
    """The routes serving `engine` under the name `model_name`; `create_app` mounts them."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.created = int(time.time())
        self.stats = ServerStats()

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()

    # -- routes ----------------------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req = parse_body(CompletionRequest, await request.body())
        self._check_model(req.model)
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise APIError(400, "prompt is an empty list; give a string, a list of strings or token ids",
                           param="prompt", code="invalid_request")
        prompts = [self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in raw]
        return await self._generate(request, "completions", req, prompts, req.max_tokens)

    async def chat_completions(self, request: Request) -> Response:
        req = parse_body(ChatRequest, await request.body())
        self._check_model(req.model)
        try:
            ids = chat_prompt_ids(self.tokenizer, [m.as_template_input() for m in req.messages])
        except ValueError as err:
            raise APIError(400, str(err), param="messages", code="no_chat_template") from err
        return await self._generate(request, "chat.completions", req, [ids],
                                    req.max_completion_tokens or req.max_tokens)

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "parloop"}]}

    async def health(self) -> JSONResponse:
        alive = self.engine.is_running()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    async def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(self.engine, self.stats), media_type="text/plain; version=0.0.4")

    async def api_error(self, request: Request, err: APIError) -> JSONResponse:
        endpoint = request.url.path.removeprefix("/v1/").replace("/", ".")
        self.stats.requests[endpoint, err.status] += 1
        return JSONResponse(err.body(), status_code=err.status)

    # -- generation ------------------------------------------------------------------------------------------------
    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r} "
                           "(see GET /v1/models)", param="model", code="model_not_found")

    def _sampling_params(self, req: SamplingRequest, max_tokens: int | None,
                         prompts: list[list[int]]) -> SamplingParams:
        """The request's sampling parameters, once every prompt is known to fit the engine's limits."""
        vocab = self.engine.model.config.vocab_size
        for ids in prompts:
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt",
                               code="invalid_token_id")
            try:
                self.engine.check(len(ids), max_tokens, req.n)
            except LimitError as err:
                raise limit_error(err) from err
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed)

    async def _generate(self, request: Request, endpoint: str, req: SamplingRequest, prompts: list[list[int]],
                        max_tokens: int | None) -> Response:
        params = self._sampling_params(req, max_tokens, prompts)
        chat = endpoint == "chat.completions"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name}
        start = partial(Job, self.engine, self.tokenizer, prompts, req.n, params, req.stop_strings())
        finished = partial(self._finished, endpoint, rid)
        if req.stream:
            # the job starts inside the stream, so that whatever ends the stream also cancels the job
            return StreamingResponse(self._stream(start, head, chat, req.include_usage(), finished),
                                     media_type="text/event-stream")
        return await self._answer(request, start(), head, chat, finished)

    async def _answer(self, request: Request, job: Job, head: dict[str, Any], chat: bool,
                      finished: Callable[[Job, int], None]) -> Response:
        """The whole completion once every choice has finished (499 when the client goes away first)."""
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
        return JSONResponse(completion_body(head, chat, texts, job.finish, job.usage()))

    async def _stream(self, start: Callable[[], Job], head: dict[str, Any], chat: bool, include_usage: bool,
                      finished: Callable[[Job, int], None]) -> AsyncIterator[str]:
        """The completion as server-sent events: one chunk per new text and per finished choice."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        extra = {"usage": None} if include_usage else {}

        def chunk(i: int, text: str | None, reason: str | None, opening: bool = False) -> str:
            return sse({**head, "choices": [chunk_choice(chat, i, text, reason, opening)], **extra})

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
                yield sse({**head, "choices": [], "usage": job.usage()})
            yield "data: [DONE]\n\n"
            status = 200
        except EngineFailure as err:
            status = 500
            yield sse(APIError(500, str(err), code="engine_error").body())
        finally:
            job.cancel()
            finished(job, status)

    def _finished(self, endpoint: str, rid: str, job: Job, status: int) -> None:
        self.stats.requests[endpoint, status] += 1
        if job.first_token_at is not None:
            self.stats.ttft_sum += job.first_token_at - job.started
            self.stats.ttft_count += 1
        log.info("%s %s: %s", endpoint, rid, job.summary())


def create_app(engine: Engine, tokenizer: Any, model_name: str) -> FastAPI:
    """The FastAPI app serving `engine` (started and stopped with the app) under the name `model_name`."""
    server = Server(engine, tokenizer, model_name)
    app = FastAPI(title="parloop", lifespan=server.lifespan)
    app.add_exception_handler(APIError, server.api_error)
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics, methods=["GET"])
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
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for option in ("max_batch_size", "max_cached_tokens", "max_prompt_tokens", "max_model_len"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise SystemExit(f"parloop serve: --{option.replace('_', '-')} must be >= 1, got {value}")
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    engine = Engine(model, max_batch_size=args.max_batch_size, max_cached_tokens=args.max_cached_tokens,
                    max_prompt_tokens=args.max_prompt_tokens, max_model_len=args.max_model_len)
    name = args.served_model_name or args.model.resolve().name
    limits = engine.limits
    log.info("serving %s as %r on http://%s:%d (max batch %d, max cached tokens %d, max prompt tokens %d)",
             args.model, name, args.host, args.port, limits.max_batch_size, limits.max_cached_tokens,
             limits.max_prompt_tokens)
    uvicorn.run(create_app(engine, tokenizer, name), host=args.host, port=args.port, log_level=args.log_level)
    return 0
