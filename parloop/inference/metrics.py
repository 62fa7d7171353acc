"""The server's counters and the engine's gauges in Prometheus' text exposition format (`GET /metrics`)."""

from __future__ import annotations

import dataclasses
from collections import Counter

from parloop.inference.engine import FINISH_REASONS, Engine


@dataclasses.dataclass
class ServerStats:
    """What the server counts besides the engine: answers by (endpoint, HTTP status), refusals before any route
    included, and time to first token."""

    requests: Counter = dataclasses.field(default_factory=Counter)
    ttft_sum: float = 0.0
    ttft_count: int = 0

    def count(self, path: str, status: int) -> None:
        self.requests[endpoint_name(path), status] += 1


# the label of each path served; any other path is "other", so that clients cannot add label values at will
_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions", "/v1/models": "models",
              "/health": "health", "/metrics": "metrics"}


def endpoint_name(path: str) -> str:
    """The metrics label of a request path: `/v1/chat/completions` -> `chat.completions`."""
    if path.startswith("/v1/models/"):
        return "models"
    return _ENDPOINTS.get(path.rstrip("/"), "other")


def prometheus_text(engine: Engine, stats: ServerStats) -> str:
    """The metrics in Prometheus' text exposition format."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    metric("parloop_requests_total", "counter", "API requests answered, by endpoint and HTTP status.",
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
