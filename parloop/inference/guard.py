"""What stands between the network and the server's routes: who may call (API key, Host allow-list against DNS
rebinding, Origin against cross-site requests), what a request may look like (JSON only, a bounded body read
within a deadline) and how long a client may take to send its headers.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from parloop.inference.protocol import APIError

# the names a server bound to a loopback address answers to
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
LOOPBACK_ADDRESSES = ("127.0.0.1", "localhost", "::1")

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


@dataclass(frozen=True)
class AccessPolicy:
    """`api_key`: required as `Authorization: Bearer KEY` on every /v1 route (None: no key). `allowed_hosts`: the
    `Host` names served (None: any). `allowed_origins`: browser origins allowed to call (CORS; empty: none).
    Bodies over `max_body_bytes` are refused (413) before they are read; a body must arrive within `body_timeout_s`.
    """

    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0


def default_hosts(bind: str, hosts: list[str] | None) -> tuple[str, ...] | None:
    """The Host allow-list: the names given (`*`: any), else the loopback names when bound to loopback, else any
    (a public server's names are not known here)."""
    if hosts:
        return None if "*" in hosts else tuple(h.lower() for h in hosts)
    return LOOPBACK_HOSTS if bind in LOOPBACK_ADDRESSES else None


def host_name(host: str) -> str:
    """A Host header without its port (`[::1]:8000` -> `::1`)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware that refuses, before any route runs, a request the policy does not allow; `on_refused`
    hears (path, status) of each refusal."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy, on_refused: Callable[[str, int], None]) -> None:
        self.app, self.policy, self.on_refused = app, policy, on_refused

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self.check(scope["method"], scope["path"], Headers(scope=scope))
        if problem is None:
            await self.app(scope, receive, send)
            return
        self.on_refused(scope["path"], problem.status)
        await JSONResponse(problem.body(), problem.status, headers=problem.headers)(scope, receive, send)

    def check(self, method: str, path: str, headers: Headers) -> APIError | None:
        """Why this request is refused, or None."""
        policy = self.policy
        if policy.allowed_hosts is not None and host_name(headers.get("host", "")) not in policy.allowed_hosts:
            return APIError(400, "the Host header names a host this server does not serve (see --allowed-hosts)",
                            code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and origin not in policy.allowed_origins and "*" not in policy.allowed_origins:
            return APIError(403, f"requests from the web origin {origin!r} are not allowed (see --allowed-origins)",
                            code="origin_not_allowed")
        if policy.api_key is not None and path.startswith("/v1") and not self._authorized(headers):
            return APIError(401, "a valid API key is required: send it as 'Authorization: Bearer KEY'",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if method == "POST":
            return self._check_body(headers)
        return None

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        expected = (self.policy.api_key or "").encode()
        # constant time: how much of a guessed key matches must not show in the response time
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), expected)

    def _check_body(self, headers: Headers) -> APIError | None:
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return APIError(415, f"the body must be JSON sent as 'Content-Type: application/json', not "
                            f"{media_type or 'untyped'!r}", code="unsupported_media_type")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.policy.max_body_bytes):
            return body_too_large(self.policy.max_body_bytes)
        return None


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the limit of {limit} bytes (--max-body-bytes)",
                    code="body_too_large")


async def read_body(request: Request, policy: AccessPolicy) -> bytes:
    """The request's body, refused (413) as soon as it passes the size limit and (408) when it does not arrive
    within the deadline; a body without Content-Length is counted as it comes."""
    chunks, size = [], 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > policy.max_body_bytes:
                raise body_too_large(policy.max_body_bytes)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), policy.body_timeout_s)
    except asyncio.TimeoutError as err:
        raise APIError(408, f"the request body did not arrive within {policy.body_timeout_s:g} s",
                       code="body_timeout") from err
    return b"".join(chunks)


def header_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose next request's headers are not complete within
    `timeout_s` of the connection opening or of the previous response (uvicorn itself waits forever once a byte has
    arrived: 50 half-sent requests would hold 50 connections, new or kept alive)."""

    class HeaderDeadlineProtocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._deadline = None
            self._arm_deadline()

        def on_response_complete(self) -> None:
            self._arm_deadline()  # first: uvicorn may go straight on to a pipelined request's cycle
            super().on_response_complete()

        def _arm_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            # a request whose headers are complete gets a new cycle: the deadline is met when the cycle changes
            self._deadline = self.loop.call_later(timeout_s, self._headers_overdue, self.cycle)

        def _headers_overdue(self, cycle_before: Any) -> None:
            if self.cycle is cycle_before and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol
