"""Issue 11's probes, one test per row: what a hostile or careless client sends to `parloop serve` (a real server
process on loopback, tiny R=2 model) and what must come of it: the attacker gets a 4xx or a correct answer, every
other request completes exactly as it would alone, and the server stays responsive and within its memory bound."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import tiny_model
from test_serve import build_tokenizer, metric, spawn_server

from parloop.inference import server
from parloop.inference.server import default_threads

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# a template that, like many real ones, raises on a role it does not know
STRICT_TEMPLATE = ("{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
                   "{{ raise_exception('unknown role: ' + m.role) }}{% endif %}<|{{ m.role }}|>{{ m.content }}\n"
                   "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
# memory the server process may gain (peak resident set) over a whole attack: bodies are refused at 1 MiB
MEMORY_BOUND_MB = 64


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log
        self.http = httpx.Client(base_url=url, headers=AUTH, timeout=60)

    def complete(self, **body: object) -> httpx.Response:
        return self.http.post("/v1/completions", json={"model": "tiny", **body})

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024

    def stream_text(self, body: dict) -> str:
        text = ""
        with self.http.stream("POST", "/v1/completions", json={"model": "tiny", "stream": True, **body}) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    text += chunk["choices"][0]["text"] if chunk["choices"] else ""
        return text


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("hostile")
    tokenizer = build_tokenizer(STRICT_TEMPLATE)
    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=4096, plt_window_size=[2, 0])
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    log = root / "server.log"
    proc, url = spawn_server(root / "tiny", 4, "--max-queued-sequences", "8", "--max-prompts-per-request", "16",
                             "--header-timeout", "1", "--body-timeout", "1", "--threads", "1",
                             "--log-level", "info", env={"PARLOOP_API_KEY": KEY}, log_path=log, headers=AUTH)
    srv = Served(proc, url, log)
    yield srv
    srv.http.close()
    proc.terminate()
    proc.wait(30)


def health_latency(url: str) -> float:
    start = time.perf_counter()
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    return time.perf_counter() - start


def assert_idle(url: str) -> None:
    deadline = time.monotonic() + 20
    while metric(url, "parloop_batch_size") or metric(url, "parloop_queue_length"):
        assert time.monotonic() < deadline, "sequences were left running"
        time.sleep(0.05)


# -- row 1: temperature 1e-40 while other requests stream --------------------------------------------------------
def test_tiny_temperature_hurts_nobody(served: Served) -> None:
    victims = [{"prompt": p, "max_tokens": 24, "temperature": 0} for p in ("The quick", "def add(", "for i in")]
    solo = [served.stream_text(body) for body in victims]
    greedy = served.complete(prompt="A sliding", max_tokens=12, temperature=0).json()["choices"][0]["text"]
    errors = metric(served.url, 'parloop_sequences_finished_total{reason="error"}')
    attack = {"prompt": "A sliding", "max_tokens": 12, "temperature": 1e-40, "n": 2}
    with ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(served.stream_text, body) for body in victims]
        attacks = [pool.submit(served.complete, **attack), pool.submit(served.stream_text, attack)]
        assert [s.result(60) for s in streams] == solo
        answer = attacks[0].result(60)
        attacks[1].result(60)
    # the attacker gets a correct answer: a temperature that small is greedy decoding
    assert answer.status_code == 200 and [c["text"] for c in answer.json()["choices"]] == [greedy, greedy]
    assert metric(served.url, 'parloop_sequences_finished_total{reason="error"}') == errors
    assert_idle(served.url)


# -- row 2: seed 2**64 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"stream": True}, {"n": 2}, {"n": 2, "stream": True}])
def test_seed_out_of_range_is_400(served: Served, extra: dict) -> None:
    response = served.complete(prompt="The quick", max_tokens=5, seed=2**64, **extra)
    assert response.status_code == 400 and response.json()["error"]["param"] == "seed"
    assert_idle(served.url)


def test_largest_seed_wraps_deterministically(served: Served) -> None:
    body = {"prompt": "The quick", "max_tokens": 8, "seed": 2**64 - 1, "n": 2}
    first, again = served.complete(**body).json(), served.complete(**body).json()
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    # choice 1 samples with seed (2**64 - 1) + 1, reduced modulo 2**64 to 0
    zero = served.complete(prompt="The quick", max_tokens=8, seed=0).json()
    assert first["choices"][1]["text"] == zero["choices"][0]["text"]


# -- row 3: a role the chat template rejects ---------------------------------------------------------------------
@pytest.mark.parametrize("role", ["developer", "tool"])
def test_template_error_is_400(served: Served, role: str) -> None:
    response = served.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": role, "content": "hi"}], "max_tokens": 3})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and f"unknown role: {role}" in error["message"]
    ok = served.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert ok.status_code == 200


# -- row 4: 5 MB / 50 MB bodies ----------------------------------------------------------------------------------
def raw_request(url: str, head: str, body: Iterator[bytes]) -> bytes:
    """Send `head` and then `body` on a raw socket while reading the answer (the server may answer, and close,
    before the body is all sent)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)

    def send() -> None:
        try:
            sock.sendall(head.encode())
            for piece in body:
                sock.sendall(piece)
        except OSError:
            pass  # the server closed the connection: it refused the body

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
    finally:
        sock.close()
    return answer


def post_head(url: str, length: int | None, content_type: str = "application/json") -> str:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: {content_type}\r\n{framing}\r\n\r\n")


PIECE = b'{"model": "tiny", "prompt": "' + b"x" * (1 << 20)


def big_body(megabytes: int, chunked: bool) -> Iterator[bytes]:
    piece = PIECE
    for _ in range(megabytes):
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece


@pytest.mark.parametrize("megabytes", [5, 50])
def test_huge_bodies_are_refused_without_reading_them(served: Served, megabytes: int,
                                                      capsys: pytest.CaptureFixture) -> None:
    before = served.peak_rss_mb()
    answers: list[bytes] = []
    latencies = []
    for chunked in (False, True):
        length = None if chunked else megabytes * len(PIECE)
        worker = threading.Thread(target=lambda c=chunked, n=length: answers.append(
            raw_request(served.url, post_head(served.url, n), big_body(megabytes, c))))
        worker.start()
        latencies.append(health_latency(served.url))
        worker.join(30)
    growth = served.peak_rss_mb() - before
    with capsys.disabled():
        print(f"\n[probe] {megabytes} MB body: {[a[:12].decode() for a in answers]}, /health in "
              f"{max(latencies) * 1000:.0f} ms, peak RSS +{growth:.1f} MB")
    assert all(a.startswith(b"HTTP/1.1 413") for a in answers), answers
    assert max(latencies) < 1.0
    assert growth < MEMORY_BOUND_MB
    assert served.complete(prompt="The quick", max_tokens=3).status_code == 200


# -- row 5: a 200,000-character stop string ----------------------------------------------------------------------
def test_huge_stop_string_is_400_and_long_ones_stay_cheap(served: Served, capsys: pytest.CaptureFixture) -> None:
    response = served.complete(prompt="The quick", max_tokens=5, stop="x" * 200_000)
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop"
    response = served.complete(prompt="The quick", max_tokens=5, stop=[str(i) for i in range(17)])
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop"
    # the most the server accepts: 16 stop strings of 1000 characters, none of which appears
    stops = [("ab" * 500)[:999] + str(i % 10) for i in range(16)]
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(served.complete, prompt="The quick", max_tokens=300, temperature=0, stop=stops)
        latencies = [health_latency(served.url) for _ in range(5)]
        answer = job.result(60)
    with capsys.disabled():
        print(f"\n[probe] 16 stop strings x 1000 chars, 300 tokens: /health in at most {max(latencies) * 1000:.0f} ms")
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 300
    assert max(latencies) < 1.0


# -- row 6: 100 prompts x n 16 -----------------------------------------------------------------------------------
def test_oversized_and_queue_filling_requests(served: Served) -> None:
    for body, param in (({"prompt": ["hi"] * 100, "n": 16}, "prompt"), ({"prompt": "hi", "n": 16}, "n"),
                        ({"prompt": ["hi"] * 10, "n": 2}, "n")):  # 20 sequences: more than the queue ever holds
        response = served.complete(max_tokens=2, **body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    # 4 rows run, the queue (8) fills up, the next request is told to come back
    long = {"max_tokens": 3000, "temperature": 0, "stream": True}
    http = served.http
    with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": ["The"] * 8, **long}) as first:
        lines = first.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)
        with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": ["A"] * 4, **long}):
            deadline = time.monotonic() + 20
            while metric(served.url, "parloop_queue_length") < 8:
                assert time.monotonic() < deadline, "the queue did not fill up"
                time.sleep(0.05)
            full = served.complete(prompt="The quick", max_tokens=2)
            assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
            assert full.json()["error"]["type"] == "rate_limit_error"
    assert_idle(served.url)
    assert served.complete(prompt="The quick", max_tokens=2).status_code == 200


# -- row 7: text/plain bodies, foreign Origin or Host ------------------------------------------------------------
@pytest.mark.parametrize(("headers", "status"), [
    ({"Content-Type": "text/plain"}, 415),
    ({"Content-Type": "text/plain", "Origin": "http://evil.example"}, 403),
    ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403),
    ({"Content-Type": "application/json", "Host": "evil.example:8000"}, 400),
])
def test_cross_site_requests_are_refused(served: Served, headers: dict, status: int) -> None:
    generated = metric(served.url, "parloop_generation_tokens_total")
    body = json.dumps({"model": "tiny", "prompt": "The quick", "max_tokens": 3})
    response = served.http.post("/v1/completions", content=body, headers=headers)
    assert response.status_code == status and "error" in response.json()
    assert response.headers.get("access-control-allow-origin") is None
    assert metric(served.url, "parloop_generation_tokens_total") == generated


# -- row 8: authentication ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x"])
def test_api_key_is_required_on_v1(served: Served, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
        response = httpx.request(method, f"{served.url}{path}", headers=headers, timeout=10,
                                 json={"model": "tiny", "prompt": "hi"})
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{served.url}/health").status_code == 200  # probes need no key


def test_help_warns_about_public_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLOOP_API_KEY", KEY)
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    server.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "--api-key" in text and "PARLOOP_API_KEY" in text and "lets anyone who can reach this machine" in text
    assert KEY not in text  # the key never shows


# -- row 9: 50 half-sent requests --------------------------------------------------------------------------------
def test_half_sent_requests_are_dropped(served: Served) -> None:
    host, port = served.url.removeprefix("http://").split(":")
    socks = []
    for i in range(50):
        sock = socket.create_connection((host, int(port)), timeout=10)
        # half of them stop inside the headers, half inside the body
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" if i % 2 else
                     post_head(served.url, 100).encode() + b'{"m')
        socks.append(sock)
    assert served.complete(prompt="The quick", max_tokens=3).status_code == 200
    assert health_latency(served.url) < 1.0
    deadline = time.monotonic() + 10  # header and body timeouts are 1 s
    for i, sock in enumerate(socks):
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        answer = sock.recv(4096)
        assert answer == b"" if i % 2 else answer.startswith(b"HTTP/1.1 408"), (i, answer)
        sock.close()


def test_a_kept_alive_connection_that_stops_inside_its_next_headers_is_dropped(served: Served) -> None:
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while b"}" not in answer:  # headers and body may come in separate segments
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the second request never ends its headers
        start = time.monotonic()
        assert sock.recv(4096) == b""  # closed by the server (header timeout 1 s), not by recv's 10 s timeout
        assert time.monotonic() - start < 5


# -- row 10: threads ---------------------------------------------------------------------------------------------
def test_threads_option_and_default(served: Served) -> None:
    assert 1 <= default_threads() <= min(8, os.cpu_count() or 1)
    log = served.log.read_text()
    assert ", 1 threads)" in log  # --threads 1 reached the engine
    served.complete(prompt="The quick", max_tokens=2, temperature=0)
    line = [ln for ln in served.log.read_text().splitlines() if "completions cmpl-" in ln][-1]
    tokens_per_s = float(line.split(" tokens/s")[0].rsplit(" ", 1)[1])
    assert 0 < tokens_per_s < 20000, line
