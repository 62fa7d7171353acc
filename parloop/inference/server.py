"""`parloop serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Endpoints (see `routes.py`): `POST /v1/completions`, `POST /v1/chat/completions` (when the tokenizer has a chat
template), both with `stream: true` as server-sent events; `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`,
`GET /metrics` (Prometheus text). This module is the command: its options, and uvicorn configured so that slow or
hostile clients cannot hold the server (header and body deadlines, a connection limit, a bounded shutdown).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import torch
import uvicorn

from parloop.inference.engine import Engine
from parloop.inference.guard import AccessPolicy, default_hosts, header_deadline_protocol
from parloop.inference.loading import add_model_arguments, load_model
from parloop.inference.requests import RequestLimits
from parloop.inference.routes import create_app
from parloop.quant import QuantizationError
from parloop.threads import idle_cores, set_threads

__all__ = ["add_arguments", "create_app", "default_threads", "run", "uvicorn_config"]

log = logging.getLogger("parloop.serve")

API_KEY_ENV = "PARLOOP_API_KEY"
MOST_THREADS = 8
PUBLIC_WARNING = ("binding to a public address (0.0.0.0, ::, or a LAN address) lets anyone who can reach this "
                  "machine use the model, read what it generates and load it with work: set --api-key (or "
                  f"${API_KEY_ENV}) and --allowed-hosts, and prefer a reverse proxy with TLS in front")


def default_threads() -> int:
    """Intra-op threads for the engine: the cores other programs leave idle (measured at start), at most 8.
    Measured (docs/serving.md): on a busy machine a thread per CPU makes every op wait for the slowest, loaded
    core, so decoding slowed down 15-40x."""
    return min(MOST_THREADS, idle_cores())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    net = parser.add_argument_group("network and access")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: loopback, this machine only). WARNING: " + PUBLIC_WARNING)
    net.add_argument("--port", type=int, default=8000, help="port to listen on")
    # the environment variable is read in `run`, not here, so that --help never shows the key
    net.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on every /v1 route; unset: "
                                       f"${API_KEY_ENV}, else no key")
    net.add_argument("--allowed-hosts", nargs="+", metavar="HOST",
                     help="Host header names served, against DNS rebinding ('*': any); default: the loopback names "
                          "when bound to loopback, else any")
    net.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN", default=[],
                     help="web origins allowed to call from a browser (CORS); default: none")
    net.add_argument("--max-connections", type=int, default=256, help="most open connections (more get 503)")
    net.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a client has to send a request's headers, from the connection's opening or "
                          "the previous response")
    net.add_argument("--body-timeout", type=float, default=30.0, help="seconds a client has to send its body")
    net.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (more: 413)")
    net.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="on SIGTERM/SIGINT, seconds to let running requests finish before closing them")
    limits = parser.add_argument_group("request limits")
    limits.add_argument("--served-model-name",
                        help="the model name clients ask for; unset: the model directory's name")
    limits.add_argument("--max-batch-size", type=int, default=16,
                        help="most sequences decoding together, and most choices (n) per request; 1 disables "
                             "batching")
    limits.add_argument("--max-cached-tokens", type=int, default=None,
                        help="most prompt + max_tokens summed over running sequences; unset: max batch size x "
                             "max model length")
    limits.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longest prompt accepted; unset: the max model length")
    limits.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + max_tokens; unset: the config's max_position_embeddings")
    limits.add_argument("--max-queued-sequences", type=int, default=None,
                        help="most sequences waiting for a row (more: 429 with Retry-After); unset: the larger of "
                             "256 and 4 x max batch size")
    limits.add_argument("--max-prompts-per-request", type=int, default=RequestLimits.max_prompts,
                        help="most prompts in one completions request")
    limits.add_argument("--max-stop-strings", type=int, default=RequestLimits.max_stop_strings,
                        help="most stop strings per request")
    limits.add_argument("--max-stop-length", type=int, default=RequestLimits.max_stop_length,
                        help="longest stop string, in characters")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"CPU threads for the model's ops; unset: the cores other programs leave idle (measured "
                             f"over a second at start), at most {MOST_THREADS}")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def uvicorn_config(app: Any, host: str, port: int, *, header_timeout: float = 10.0, max_connections: int = 256,
                   shutdown_timeout: float = 30.0, log_level: str = "info") -> uvicorn.Config:
    """uvicorn for `app` with a deadline on request headers, a connection limit and a bounded graceful shutdown."""
    return uvicorn.Config(app, host=host, port=port, http=header_deadline_protocol(header_timeout),
                          limit_concurrency=max_connections, timeout_graceful_shutdown=shutdown_timeout,
                          log_level=log_level)


def _check_options(args: argparse.Namespace) -> None:
    positive = ("max_batch_size", "max_cached_tokens", "max_prompt_tokens", "max_model_len", "max_queued_sequences",
                "max_prompts_per_request", "max_stop_strings", "max_stop_length", "max_body_bytes",
                "max_connections", "threads", "header_timeout", "body_timeout")
    for option in positive:
        value = getattr(args, option)
        if value is not None and value <= 0:
            raise SystemExit(f"parloop serve: --{option.replace('_', '-')} must be > 0, got {value}")
    if args.api_key is not None and not args.api_key.strip():
        raise SystemExit(f"parloop serve: --api-key (or ${API_KEY_ENV}) is empty")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    _check_options(args)
    set_threads(args.threads, "serve", most=MOST_THREADS)
    try:
        model, tokenizer = load_model(args.model, args.device, args.dtype, args.weights)
    except QuantizationError as err:
        raise SystemExit(f"parloop serve: {err}") from err
    engine = Engine(model, max_batch_size=args.max_batch_size, max_cached_tokens=args.max_cached_tokens,
                    max_prompt_tokens=args.max_prompt_tokens, max_model_len=args.max_model_len,
                    max_queued_sequences=args.max_queued_sequences)
    name = args.served_model_name or args.model.resolve().name
    policy = AccessPolicy(api_key=args.api_key, allowed_hosts=default_hosts(args.host, args.allowed_hosts),
                          allowed_origins=tuple(args.allowed_origins), max_body_bytes=args.max_body_bytes,
                          body_timeout_s=args.body_timeout)
    limits = RequestLimits(args.max_prompts_per_request, args.max_stop_strings, args.max_stop_length)
    app = create_app(engine, tokenizer, name, policy, limits)
    if policy.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no API key while listening on %s: %s", args.host, PUBLIC_WARNING)
    lim = engine.limits
    log.info("serving %s as %r on http://%s:%d (max batch %d, max cached tokens %d, max prompt tokens %d, "
             "%d threads)", args.model, name, args.host, args.port, lim.max_batch_size, lim.max_cached_tokens,
             lim.max_prompt_tokens, torch.get_num_threads())
    uvicorn.Server(uvicorn_config(app, args.host, args.port, header_timeout=args.header_timeout,
                                  max_connections=args.max_connections, shutdown_timeout=args.shutdown_timeout,
                                  log_level=args.log_level)).run()
    return 0
