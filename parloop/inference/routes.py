"""The routes of `parloop serve`: OpenAI's completions and chat completions (plain or streamed as server-sent
events), models, health and metrics, over the continuous-batching engine.

Request handlers never do long work on the event loop: bodies are parsed and prompts tokenised on worker threads,
and a request's text and stop strings are processed in time linear in what it generates. Every error is
OpenAI-shaped JSON (`protocol.APIError`), unknown routes and methods included; every answer is counted in /metrics.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from parloop.inference.engine import Engine, LimitError, QueueFull, SamplingParams
from parloop.inference.guard import AccessPolicy, Guard, read_body
from parloop.inference.jobs import Event, Job
from parloop.inference.metrics import ServerStats, prometheus_text
from parloop.inference.protocol import (
    CHAT,
    COMPLETIONS,
    APIError,
    ChatRequest,
    CompletionRequest,
    Endpoint,
    EngineFailure,
    SamplingRequest,
    limit_error,
    parse_body,
)
from parloop.inference.requests import RequestLimits, sampling_params
from parloop.inference.text import NoChatTemplate, chat_prompt_ids

log = logging.getLogger("parloop.serve")

# formats the log-probabilities of a choice's tokens (ids, scores) for a response, or None when not asked for
LogprobFormat = Callable[[list[int], list[Any]], dict[str, Any] | None]


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"


class JobStream(StreamingResponse):
    """A streamed answer that cancels its job however the response ends, even if its body never started."""

    def __init__(self, content: AsyncIterator[str], job: Job) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


class Server:
    """The routes serving `engine` under the name `model_name`; `create_app` mounts them."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, policy: AccessPolicy,
                 limits: RequestLimits) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.policy, self.limits = policy, limits
        self.created = int(time.time())
        self.stats = ServerStats()
        self.token_text = functools.lru_cache(maxsize=1 << 16)(self._token_text)

    def _token_text(self, token: int) -> str:
        """A token's text; a token that is part of a character (byte-level vocabularies) gets its vocabulary
        entry instead, so that distinct alternatives never share a name in `top_logprobs`."""
        text = self.tokenizer.decode([token])
        return self.tokenizer.convert_ids_to_tokens(token) if "\ufffd" in text else text

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()

    # -- routes ----------------------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req = await self._parse(request, CompletionRequest)
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        prompts = await asyncio.to_thread(self._tokenize, raw)
        echo = (lambda: [p if isinstance(p, str) else self.tokenizer.decode(p) for p in raw]) if req.echo else None
        return await self._generate(request, COMPLETIONS, req, prompts, echo)

    def _tokenize(self, raw: list[str] | list[list[int]]) -> list[list[int]]:
        return [self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in raw]

    async def chat_completions(self, request: Request) -> Response:
        req = await self._parse(request, ChatRequest)
        ids = await asyncio.to_thread(self._chat_ids, req)
        return await self._generate(request, CHAT, req, [ids])

    def _chat_ids(self, req: ChatRequest) -> list[int]:
        try:
            return chat_prompt_ids(self.tokenizer, [m.as_template_input() for m in req.messages])
        except NoChatTemplate as err:
            raise APIError(400, str(err), param="messages", code="no_chat_template") from err
        except Exception as err:  # whatever the template raises, the messages are what it rejected
            raise APIError(400, f"the chat template rejected the messages: {type(err).__name__}: {err}",
                           param="messages", code="chat_template_error") from err

    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return self._model_card()

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "parloop"}

    async def health(self) -> JSONResponse:
        alive = self.engine.is_running()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    async def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(self.engine, self.stats), media_type="text/plain; version=0.0.4")

    # -- errors ----------------------------------------------------------------------------------------------------
    async def api_error(self, request: Request, err: APIError) -> JSONResponse:
        self.stats.count(request.url.path, err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def http_error(self, request: Request, err: HTTPException) -> JSONResponse:
        """Starlette's own 404 and 405, in OpenAI's shape."""
        message = (f"no route {request.url.path}" if err.status_code == 404
                   else f"{request.method} is not allowed on {request.url.path}" if err.status_code == 405
                   else str(err.detail))
        return await self.api_error(request, APIError(err.status_code, message, headers=err.headers,
                                                      code="not_found" if err.status_code == 404 else None))

    async def server_error(self, request: Request, err: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=err)
        return await self.api_error(request, APIError(500, f"internal server error ({type(err).__name__}); see the "
                                                      "server log", code="internal_error"))

    # -- generation ------------------------------------------------------------------------------------------------
    async def _parse(self, request: Request, body_type: type) -> Any:
        raw = await read_body(request, self.policy)
        req = await asyncio.to_thread(parse_body, body_type, raw)
        self._check_model(req.model)
        return req

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r} "
                           "(see GET /v1/models)", param="model", code="model_not_found")

    async def _generate(self, request: Request, endpoint: Endpoint, req: SamplingRequest, prompts: list[list[int]],
                        echo: Callable[[], list[str]] | None = None) -> Response:
        params = sampling_params(req, prompts, self.limits, self.engine.limits, self.engine.model.config.vocab_size)
        rid = f"{endpoint.id_prefix}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": endpoint.object, "created": int(time.time()), "model": self.model_name}
        job = self._start(prompts, req.n, params, req.stop_strings(), None if echo is None else echo())
        fmt = self._logprob_format(endpoint, params)
        finished = partial(self._finished, endpoint.name, rid)
        if req.stream:
            return JobStream(self._stream(job, head, endpoint, req.include_usage(), fmt, finished), job)
        return await self._answer(request, job, head, endpoint, fmt, finished)

    def _start(self, prompts: list[list[int]], n: int, params: SamplingParams, stop: list[str],
               echo_texts: list[str] | None) -> Job:
        """Queue the request's sequences; the engine checks their lengths and the queue's room (once)."""
        try:
            return Job(self.engine, self.tokenizer, prompts, n, params, stop, echo_texts)
        except LimitError as err:
            raise limit_error(err) from err
        except QueueFull as err:
            raise APIError(429, str(err), code="queue_full", headers={"Retry-After": str(err.retry_after)}) from err

    def _logprob_format(self, endpoint: Endpoint, params: SamplingParams) -> LogprobFormat:
        if params.logprobs is None and params.prompt_logprobs is None:
            return lambda ids, scored: None
        return lambda ids, scored: endpoint.logprobs(ids, scored, self.token_text)

    async def _answer(self, request: Request, job: Job, head: dict[str, Any], endpoint: Endpoint,
                      fmt: LogprobFormat, finished: Callable[[Job, int], None]) -> Response:
        """The whole completion once every choice has finished (499 when the client goes away first)."""
        events: list[list[Event]] = [[] for _ in job.seqs]

        async def collect() -> None:
            async for event in job.events():
                events[event.index].append(event)

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
        texts = ["".join(e.text for e in choice) for choice in events]
        logprobs = [fmt([i for e in choice for i in e.ids], [s for e in choice for s in e.scored])
                    for choice in events]
        return JSONResponse(endpoint.body(head, texts, job.finish, job.usage(), logprobs))

    async def _stream(self, job: Job, head: dict[str, Any], endpoint: Endpoint, include_usage: bool,
                      fmt: LogprobFormat, finished: Callable[[Job, int], None]) -> AsyncIterator[str]:
        """The completion as server-sent events: one chunk per new text and per finished choice."""
        head = {**head, "object": endpoint.chunk_object}
        extra = {"usage": None} if include_usage else {}

        def chunk(i: int, text: str | None, reason: str | None, opening: bool = False,
                  logprobs: dict[str, Any] | None = None) -> str:
            return sse({**head, "choices": [endpoint.chunk_choice(i, text, reason, opening, logprobs)], **extra})

        status = 499  # unless it runs to the end: the client went away
        try:
            if endpoint.chat:  # OpenAI opens each choice with its role
                for i in range(len(job.seqs)):
                    yield chunk(i, "", None, opening=True)
            async for event in job.events():
                logprobs = fmt(event.ids, event.scored) if event.scored else None
                if event.text or logprobs:
                    yield chunk(event.index, event.text, None, logprobs=logprobs)
                if event.reason is not None:
                    yield chunk(event.index, endpoint.closing_text(), event.reason)
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


def create_app(engine: Engine, tokenizer: Any, model_name: str, policy: AccessPolicy | None = None,
               limits: RequestLimits | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started and stopped with the app) under the name `model_name`, behind
    `policy` (default: loopback names only, no key, no CORS)."""
    policy = policy or AccessPolicy()
    server = Server(engine, tokenizer, model_name, policy, limits or RequestLimits())
    app = FastAPI(title="parloop", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(APIError, server.api_error)
    app.add_exception_handler(HTTPException, server.http_error)
    app.add_exception_handler(Exception, server.server_error)
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", server.model, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics, methods=["GET"])
    app.add_middleware(Guard, policy=policy, on_refused=server.stats.count)
    if policy.allowed_origins:  # outermost, so that it answers browsers' preflight requests itself
        app.add_middleware(CORSMiddleware, allow_origins=list(policy.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
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
